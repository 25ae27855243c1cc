"""Run a model over task files, write predictions as they come (so an interrupted run resumes), score them.

Prompts are the task record's conversation up to its first assistant turn; decoding is greedy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from unillava.data.images import load_image
from unillava.data.llava_format import ConversationFile
from unillava.errors import DataError, UnillavaError
from unillava.evaluation.scoring import TASKS, score_files, write_results
from unillava.inference import InferenceModel

SUITES = {"shapes": TASKS}

# What the model is shown in place of each record's own image, to measure how much of a score comes from
# seeing: a flat mid-grey image of the same size, or the image of another record of the same file.
IMAGE_SOURCES = ("own", "blank", "other")
BLANK_GREY = (128, 128, 128)

# The headline metric of each task, for one-line summaries.
HEADLINE = {
    "vqa": "accuracy",
    "fine_text": "accuracy",
    "fine_count": "accuracy",
    "region_vqa": "accuracy",
    "mc": "accuracy",
    "pope": "f1",
    "caption": "CIDEr",
    "detail": "CIDEr",
    "refseg": "cIoU",
    "reasonseg": "cIoU",
    "region_caption": "attribute_accuracy",
    "gcg": "mIoU",
}


def _done_ids(path: Path) -> set[str]:
    """Ids already predicted; a final partial line from a killed run is dropped and rewritten."""
    if not path.is_file():
        return set()
    done, good_lines = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            done.add(str(record["id"]))
            good_lines.append(line)
    path.write_text("".join(f"{line}\n" for line in good_lines), encoding="utf-8")
    return done


def predict_task(
    model: InferenceModel,
    task_file: Path,
    out_path: Path,
    *,
    image_root: Path,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    images_from: str = "own",
) -> int:
    """Append predictions for records not yet in `out_path`; returns how many were generated now.

    `images_from` (one of IMAGE_SOURCES) replaces every image for the image ablation."""
    data = ConversationFile(task_file, image_root=image_root)
    indices = range(min(len(data), limit) if limit else len(data))
    done = _done_ids(out_path)
    todo = [data[i] for i in indices if data[i].id not in done]
    swap = _image_swap(data, images_from)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"eval {task_file.stem}", unit="sample", disable=not todo)
    with out_path.open("a", encoding="utf-8") as sink:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            conversations, images = [], []
            for sample in chunk:
                first_answer = next(i for i, m in enumerate(sample.messages) if m.role == "assistant")
                conversations.append(sample.messages[:first_answer])
                images.append([swap(data.image_path(sample, k)) for k in range(len(sample.images))])
            if model.supports_segmentation:
                prompts = [s.extra.get("visual_prompts") for s in chunk]
                answers = model.generate_with_masks(
                    conversations,
                    images,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    visual_prompts=prompts if any(prompts) else None,
                )
                records = [
                    {"id": s.id, "text": text, "masks": masks}
                    for s, (text, masks) in zip(chunk, answers, strict=True)
                ]
            else:
                texts = model.generate_conversations(
                    conversations, images, batch_size=batch_size, max_new_tokens=max_new_tokens
                )
                records = [{"id": s.id, "text": text} for s, text in zip(chunk, texts, strict=True)]
            for record in records:
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            bar.update(len(chunk))
    bar.close()
    return len(todo)


def _image_swap(data: ConversationFile, images_from: str) -> Callable[[Path], Path | Image.Image]:
    """The image shown instead of a record's own: itself, a grey image of its size, or the image halfway
    round the file's list of distinct images (so a scene never meets its own picture)."""
    if images_from == "own":
        return lambda path: path
    if images_from == "blank":
        return lambda path: Image.new("RGB", load_image(path).size, BLANK_GREY)
    if images_from != "other":
        raise UnillavaError(f"images_from: expected one of {', '.join(IMAGE_SOURCES)}, got {images_from!r}")
    samples = (data[i] for i in range(len(data)))
    distinct = list(dict.fromkeys(data.image_path(s, k) for s in samples for k in range(len(s.images))))
    if len(distinct) < 2:
        raise UnillavaError(f"{data.path}: the 'other image' ablation needs at least two distinct images")
    position = {path: i for i, path in enumerate(distinct)}
    return lambda path: distinct[(position[path] + len(distinct) // 2) % len(distinct)]


def _task_file(data_dir: Path, split: str, task: str) -> Path:
    path = data_dir / "tasks" / split / f"{task}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no task file (generate one with `unillava data shapes --out {data_dir}`)")
    return path


def evaluate(
    model: InferenceModel,
    data_dir: str | Path,
    tasks: Sequence[str],
    out_dir: str | Path,
    *,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    report_samples: int = 4,
    images_from: str = "own",
) -> dict[str, Any]:
    """Predict and score each task; writes predictions, results JSON and a markdown report.

    `images_from="blank"` / `"other"` asks the same questions about a grey image / another record's image
    (the image ablation: what the model answers without seeing the right picture)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UnillavaError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    all_results: dict[str, Any] = {}
    for task in tasks:
        ann = _task_file(data_dir, split, task)
        preds = out_dir / f"predictions_{task}.jsonl"
        predict_task(
            model,
            ann,
            preds,
            image_root=data_dir,
            limit=limit,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            images_from=images_from,
        )
        results = score_files(task, preds, _limited(ann, out_dir, limit))
        write_results(results, out_dir)
        all_results[task] = results
    summary = {
        "data": str(data_dir),
        "split": split,
        "limit": limit,
        "images_from": images_from,
        "tasks": all_results,
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_report(out_dir, data_dir, split, all_results, report_samples)
    return summary


def _limited(ann: Path, out_dir: Path, limit: int | None) -> Path:
    """With --limit, score against the first `limit` annotations only (written beside the predictions)."""
    if not limit:
        return ann
    lines = [line for line in ann.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    path = out_dir / f"annotations_{ann.stem}.jsonl"
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def summary_table(all_results: dict[str, Any]) -> Table:
    table = Table(title="unillava eval")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    for task, results in all_results.items():
        name = HEADLINE.get(task)
        metrics = results["metrics"]
        key = next((k for k in metrics if name and k.lower() == name.lower()), next(iter(metrics), None))
        value = metrics.get(key) if key is not None else None
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        label = name if key is not None and name and key.lower() == name.lower() else (key or "")
        table.add_row(task, label, shown, str(results["counts"]["annotations"]))
    return table


def write_report(
    out_dir: Path, data_dir: Path, split: str, all_results: dict[str, Any], n_samples: int
) -> Path:
    """A markdown report: the metrics table, then a few samples with image, question, answer and truth."""
    images_dir = out_dir / "report_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# unillava evaluation report", "", f"Data: `{data_dir}` split `{split}`", ""]
    lines += ["| task | metric | value | n |", "|---|---|---|---|"]
    for task, results in all_results.items():
        for name, value in results["metrics"].items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {task} | {name} | {shown} | {results['counts']['annotations']} |")
    for task in all_results:
        preds = {}
        pred_file = out_dir / f"predictions_{task}.jsonl"
        for line in pred_file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            preds[str(record["id"])] = record.get("text", "")
        data = ConversationFile(_task_file(data_dir, split, task), image_root=data_dir)
        lines += ["", f"## {task}", ""]
        for sample in data[: min(n_samples, len(data))]:
            if sample.id not in preds:
                continue
            question = next(m.text for m in sample.messages if m.role == "user").strip()
            truth = next(m.text for m in sample.messages if m.role == "assistant").strip()
            if sample.images:
                source = data.image_path(sample, 0)
                target = images_dir / f"{task}_{source.name}"
                shutil.copyfile(source, target)
                lines.append(f"![{sample.id}]({target.relative_to(out_dir).as_posix()})")
                lines.append("")
            lines += [
                f"- **question**: {question}",
                f"- **answer**: {preds[sample.id]}",
                f"- **truth**: {truth}",
                "",
            ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def print_summary(all_results: dict[str, Any]) -> None:
    Console().print(summary_table(all_results))
