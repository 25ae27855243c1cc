"""The procedural shapes tasks (`unillava data shapes`) as benchmarks, one per task, so they are predicted,
resumed, scored and reported by the same runner as the papers' benchmarks.

A task file is `DATA/tasks/SPLIT/TASK.jsonl` in the LLaVA conversation format plus the task's answer fields;
the question asked is the record's conversation up to its first assistant turn, and scoring is
`evaluation.scoring`'s (what `unillava score` computes). Their files keep the flat layout `unillava eval
--task` has always written: `OUT/predictions_TASK.jsonl` and `OUT/results_TASK.json`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unillava.data.llava_format import parse_record
from unillava.errors import DataError, UnillavaError
from unillava.evaluation.benchmarks.base import (
    Benchmark,
    Column,
    Item,
    LoadResult,
    Prediction,
    Problems,
    read_jsonl,
    where,
)
from unillava.evaluation.benchmarks.common import dedupe
from unillava.evaluation.scoring import SEG_TASKS, TASKS, check_annotation, score_records

PREFIX = "shapes-"

# The metric each task is summarised by, named exactly as `evaluation.scoring` reports it.
HEADLINE = {
    "vqa": "accuracy",
    "fine_text": "accuracy",
    "fine_count": "accuracy",
    "region_vqa": "accuracy",
    "mc": "accuracy",
    "pope": "f1",
    "caption": "cider",
    "detail": "cider",
    "refseg": "ciou",
    "reasonseg": "ciou",
    "region_caption": "attribute_accuracy",
    "gcg": "miou",
}

# Tasks whose records carry `visual_prompts` for their `<region>` / `<mark>` markers.
REGION_TASKS = ("region_caption", "region_vqa")


class ShapesTask(Benchmark):
    """One procedural task; `name` is "shapes-TASK" because task names (pope, ...) repeat benchmark names."""

    default_split = "test"
    max_new_tokens = 128

    def __init__(self, task: str) -> None:
        if task not in TASKS:
            raise UnillavaError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        self.task = task
        self.name = f"{PREFIX}{task}"
        self.title = f"Shapes {task}"
        metric = HEADLINE[task]
        self.columns = (Column(metric, task, scale=1.0),)
        self.metric_note = (
            f"{metric} of the procedural task {task!r}, as `unillava score --task {task}` computes it"
        )
        self.download = f"generate it: `unillava data shapes --out DIR --tasks {task}` writes DIR/tasks/SPLIT/{task}.jsonl"
        self.segmentation = task in (*SEG_TASKS, "gcg")
        self.visual_prompt = task in REGION_TASKS

    def output_dir(self, out_dir: Path) -> Path:
        return out_dir

    def predictions_path(self, out_dir: Path, split: str) -> Path:
        return out_dir / f"predictions_{self.task}.jsonl"

    def results_path(self, out_dir: Path) -> Path:
        return out_dir / f"results_{self.task}.json"

    def recognises(self, root: Path) -> bool:
        return any((root / "tasks").glob(f"*/{self.task}.jsonl"))

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        split = split or self.default_split
        path = root / "tasks" / split / f"{self.task}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: no task file (generate one with `unillava data shapes --out {root}`)")
        problems = Problems()
        items = []
        for line, record in read_jsonl(path, problems):
            at = where(path, line)
            try:
                sample = parse_record(record, source=at)
                check_annotation(self.task, record, str(path), line)
            except DataError as err:  # both name "FILE line N" already
                problems.messages.append(str(err))
                continue
            first_answer = next(i for i, m in enumerate(sample.messages) if m.role == "assistant")
            items.append(
                Item(
                    sample.id,
                    next(m.text for m in sample.messages if m.role == "user").strip(),
                    [root / name for name in sample.images],
                    record,
                    {
                        "at": at,
                        "line": line,
                        "file": str(path),
                        "truth": sample.messages[first_answer].text.strip(),
                    },
                    conversation=sample.messages[:first_answer],
                    visual_prompts=sample.extra.get("visual_prompts"),
                )
            )
        return LoadResult(dedupe(items, problems), split, problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        """The scorer's results; every prediction is passed, so ids outside `items` are counted as unknown."""
        records = [
            {"id": item_id, "text": p.text, **({"masks": p.masks} if p.masks is not None else {})}
            for item_id, p in predictions.items()
        ]
        return score_records(
            self.task,
            enumerate(records, start=1),
            [(item.meta["line"], item.answer) for item in items],
            pred_source="predictions",
            ann_source=items[0].meta["file"] if items else self.name,
            meteor=meteor,
        )

    def reference(self, item: Item) -> str | None:
        return item.meta["truth"]


SHAPES_TASKS: tuple[ShapesTask, ...] = tuple(ShapesTask(task) for task in TASKS)


def task_benchmarks(tasks: Sequence[str]) -> list[str]:
    """The benchmark names of procedural task names; UnillavaError lists the unknown ones."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UnillavaError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return [f"{PREFIX}{t}" for t in tasks]
