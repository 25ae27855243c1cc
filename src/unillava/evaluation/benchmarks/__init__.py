"""The papers' real benchmarks: a registry of loaders and official scorers, the three papers' suites and
their results tables with the published reference numbers (`PAPER_TABLES`, each titled with its paper;
docs/evaluation.md, "Reference numbers"). The procedural shapes tasks are the "shapes" suite, one benchmark
"shapes-TASK" per task, so they run through the same runner.

    from unillava.evaluation.benchmarks import BENCHMARKS
    bench = BENCHMARKS["pope"]
    loaded = bench.load(bench.find_root(Path("playground/data/eval")))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unillava.errors import UnillavaError
from unillava.evaluation.benchmarks.base import Benchmark, Column, Item, LoadResult, Prediction
from unillava.evaluation.benchmarks.choice import MMMU, MMBench, MMBenchCN, RealWorldQA, ScienceQA, SEEDBench
from unillava.evaluation.benchmarks.grounding import (
    GCG,
    RefCOCOgREC,
    RefCOCOPlusREC,
    RefCOCOREC,
    RefSeg,
    RefSegG,
    RefSegPlus,
    RegionCaption,
)
from unillava.evaluation.benchmarks.judged import JudgeClient, LLaVABench, MMVet
from unillava.evaluation.benchmarks.shapes import SHAPES_TASKS, ShapesTask, task_benchmarks
from unillava.evaluation.benchmarks.vqa import GQA, DocVQA, TextVQA, VizWiz, VQAv2
from unillava.evaluation.benchmarks.yesno import MME, POPE

__all__ = [
    "BENCHMARKS",
    "SUITES",
    "PAPER_TABLES",
    "Benchmark",
    "Column",
    "Item",
    "JudgeClient",
    "LoadResult",
    "PaperTable",
    "Prediction",
    "ShapesTask",
    "get_benchmark",
    "task_benchmarks",
]

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        VQAv2(),
        GQA(),
        VizWiz(),
        ScienceQA(),
        TextVQA(),
        POPE(),
        MME(),
        MMBench(),
        MMBenchCN(),
        SEEDBench(),
        LLaVABench(),
        MMVet(),
        DocVQA(),
        RealWorldQA(),
        MMMU(),
        RefCOCOREC(),
        RefCOCOPlusREC(),
        RefCOCOgREC(),
        RefSeg(),
        RefSegPlus(),
        RefSegG(),
        GCG(),
        RegionCaption(),
        *SHAPES_TASKS,
    )
}

SUITES: dict[str, tuple[str, ...]] = {
    "shapes": tuple(b.name for b in SHAPES_TASKS),
    "llava-1.5": (
        "vqav2",
        "gqa",
        "vizwiz",
        "scienceqa",
        "textvqa",
        "pope",
        "mme",
        "mmbench",
        "mmbench-cn",
        "seed",
        "llava-bench",
        "mm-vet",
    ),
    "convllava": (
        "mme",
        "mmbench",
        "seed",
        "textvqa",
        "docvqa",
        "pope",
        "rec-refcoco",
        "rec-refcoco+",
        "rec-refcocog",
        "realworldqa",
        "mmmu",
    ),
    "omg-llava": (
        "refcoco",
        "refcoco+",
        "refcocog",
        "gcg",
        "refcocog-regcap",
        "mme",
        "mmbench",
        "seed",
        "pope",
    ),
}


@dataclass(frozen=True)
class TableColumn:
    """A paper column: the mean of `metric` over whichever of `benchmarks` ran, times `scale`."""

    label: str
    benchmarks: tuple[str, ...]
    metric: str
    scale: float = 100.0


@dataclass(frozen=True)
class PaperTable:
    suite: str
    title: str
    columns: tuple[TableColumn, ...]
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    note: str = ""


def _col(label: str, bench: str | tuple[str, ...], metric: str, scale: float = 100.0) -> TableColumn:
    return TableColumn(label, (bench,) if isinstance(bench, str) else bench, metric, scale)


PAPER_TABLES: dict[str, PaperTable] = {
    "llava-1.5": PaperTable(
        "llava-1.5",
        "LLaVA-1.5 (Improved Baselines with Visual Instruction Tuning), Tables 4-5",
        (
            _col("VQAv2", "vqav2", "accuracy"),
            _col("GQA", "gqa", "accuracy"),
            _col("VizWiz", "vizwiz", "accuracy"),
            _col("SQA-IMG", "scienceqa", "accuracy"),
            _col("TextVQA", "textvqa", "accuracy"),
            _col("POPE", "pope", "f1"),
            _col("MME", "mme", "perception", 1.0),
            _col("MMB", "mmbench", "circular_accuracy"),
            _col("MMB-CN", "mmbench-cn", "circular_accuracy"),
            _col("SEED", "seed", "accuracy"),
            _col("LLaVA-W", "llava-bench", "relative_score", 1.0),
            _col("MM-Vet", "mm-vet", "total"),
        ),
        {
            "LLaVA-1.5-7B (paper)": {
                "VQAv2": 78.5,
                "GQA": 62.0,
                "VizWiz": 50.0,
                "SQA-IMG": 66.8,
                "TextVQA": 58.2,
                "POPE": 85.9,
                "MME": 1510.7,
                "MMB": 64.3,
                "MMB-CN": 58.3,
                "SEED": 58.6,
                "LLaVA-W": 63.4,
                "MM-Vet": 30.5,
            },
            "LLaVA-1.5-13B (paper)": {
                "VQAv2": 80.0,
                "GQA": 63.3,
                "VizWiz": 53.6,
                "SQA-IMG": 71.6,
                "TextVQA": 61.3,
                "POPE": 85.9,
                "MME": 1531.3,
                "MMB": 67.7,
                "MMB-CN": 63.6,
                "SEED": 61.6,
                "LLaVA-W": 70.7,
                "MM-Vet": 35.4,
            },
        },
        "VQAv2 and VizWiz are test-dev/test (server) numbers, MMBench/MMB-CN test (server); local runs on val/dev "
        "splits are not directly comparable. MME is the perception score.",
    ),
    "convllava": PaperTable(
        "convllava",
        "ConvLLaVA (Hierarchical Backbones as Visual Encoder for Large Multimodal Models)",
        (
            _col("MME", "mme", "perception", 1.0),
            _col("MMBench", "mmbench", "circular_accuracy"),
            _col("SEED", "seed", "accuracy"),
            _col("TextVQA", "textvqa", "accuracy"),
            _col("DocVQA", "docvqa", "anls"),
            _col("POPE", "pope", "f1"),
            _col("RefCOCO avg", ("rec-refcoco", "rec-refcoco+", "rec-refcocog"), "accuracy"),
            _col("RealWorldQA", "realworldqa", "accuracy"),
            _col("MMMU", "mmmu", "accuracy"),
        ),
        {
            "ConvLLaVA-768 (paper)": {
                "MME": 1541,
                "MMBench": 68.0,
                "SEED": 68.8,
                "TextVQA": 59.1,
                "DocVQA": 44.8,
                "POPE": 87.3,
                "RefCOCO avg": 80.6,
            },
            "ConvLLaVA-1024 (paper)": {
                "MME": 1553,
                "MMBench": 68.8,
                "SEED": 69.3,
                "TextVQA": 62.5,
                "DocVQA": 48.5,
                "POPE": 87.7,
                "RefCOCO avg": 81.4,
            },
            "ConvLLaVA-1536 (paper)": {
                "MME": 1575,
                "MMBench": 68.7,
                "SEED": 70.2,
                "TextVQA": 65.8,
                "DocVQA": 59.0,
                "POPE": 87.3,
                "RefCOCO avg": 82.3,
            },
            "LLaVA-1.5-7B (as cited)": {"RefCOCO avg": 71.1},
        },
        "RefCOCO avg is the mean REC Acc@0.5 over the RefCOCO/+/g splits that ran (the paper averages all their "
        "val/test splits). No reference numbers are recorded for RealWorldQA and MMMU.",
    ),
    "omg-llava": PaperTable(
        "omg-llava",
        "OMG-LLaVA (Bridging Image-level, Object-level, Pixel-level Reasoning and Understanding)",
        (
            _col("RefCOCO cIoU", "refcoco", "ciou"),
            _col("RefCOCO+ cIoU", "refcoco+", "ciou"),
            _col("RefCOCOg cIoU", "refcocog", "ciou"),
            _col("GCG METEOR", "gcg", "meteor"),
            _col("GCG CIDEr", "gcg", "cider"),
            _col("GCG AP50", "gcg", "ap50"),
            _col("GCG mIoU", "gcg", "miou"),
            _col("RegCap METEOR", "refcocog-regcap", "meteor"),
            _col("MME", "mme", "perception", 1.0),
            _col("MMBench", "mmbench", "circular_accuracy"),
            _col("SEED", "seed", "accuracy"),
            _col("POPE", "pope", "f1"),
        ),
        {
            "OMG-LLaVA (paper)": {
                "RefCOCO cIoU": 78.0,
                "RefCOCO+ cIoU": 69.1,
                "RefCOCOg cIoU": 72.9,
                "GCG METEOR": 14.5,
                "GCG CIDEr": 38.5,
                "GCG AP50": 28.6,
                "GCG mIoU": 64.7,
                "RegCap METEOR": 15.3,
                "MME": 1448,
                "MMBench": 67.5,
                "SEED": 68.9,
                "POPE": 89.7,
            },
            "LLaVA-1.5, same data (as cited)": {"MME": 1422, "MMBench": 68.5, "SEED": 65.9, "POPE": 86.7},
        },
        "RefCOCO/+/g are val cIoU (best variant); GCG on the GranDf test split.",
    ),
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; UnillavaError listing the known names otherwise."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UnillavaError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None
