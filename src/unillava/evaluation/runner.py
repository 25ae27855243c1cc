"""Run a model on benchmarks (the papers' and the procedural shapes tasks): predict (resumable), score or
judge, write results and one report. Every benchmark goes through the same path; only where its files live
is the benchmark's choice.

Layout of the output directory:

    OUT/results.json                      the run: every benchmark's results, skipped benchmarks and why;
                                          shapes tasks also by task name under "tasks"
    OUT/report.md                         the papers' table(s) with the reference numbers, then details and a
                                          few sample answers per benchmark (their images in report_images/)
    OUT/<benchmark>/predictions_<split>.jsonl   {"id", "text", "masks"?} per answered question, appended as
                                          they come, so an interrupted run continues where it stopped
    OUT/<benchmark>/results.json          this benchmark's results
    OUT/<benchmark>/judge_requests.jsonl  judged benchmarks: OpenAI batch-format requests
    OUT/<benchmark>/judge_replies.jsonl   judged benchmarks: the judge's replies (also resumable)
    OUT/<benchmark>/<submission files>    the evaluation server's format, where a server scores the split
    OUT/predictions_<task>.jsonl, OUT/results_<task>.json   the shapes tasks' files (their historical layout)

Decoding is greedy. A model that can segment exposes
`generate_with_masks(conversations, images, *, batch_size, max_new_tokens, progress) -> list[(text, masks)]`
(masks as COCO RLE dicts); any other model is run for its text and its mask metrics are flagged. A model
whose `supports_visual_prompts` is true takes the marked regions of region benchmarks through the same hook's
`visual_prompts=` (one list of box / point / mask dicts in image pixels per conversation); any other model
is asked the prompt text alone and the result is flagged.

The image ablation (`images_from`: "blank" or "other") asks the same questions about a flat grey image of the
same size, or about the image of another question, to measure how much of a score comes from seeing.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from unillava.conversation import user_message
from unillava.errors import DataError, UnillavaError
from unillava.evaluation.benchmarks import (
    BENCHMARKS,
    PAPER_TABLES,
    SUITES,
    JudgeClient,
    get_benchmark,
    task_benchmarks,
)
from unillava.evaluation.benchmarks.base import (
    Benchmark,
    EmbeddedImage,
    ImageRef,
    Item,
    Prediction,
    open_image,
)

FLAG_NO_MASKS = "model does not segment: it produced no masks, so mask metrics are 0"
FLAG_NO_VISUAL_PROMPT = (
    "model takes no visual prompts: the marked region was not given to it (prompt text only)"
)
FLAG_AWAITING_JUDGE = "awaiting judge: rerun with --judge-endpoint URL --judge-model NAME (requests are in judge_requests.jsonl)"
MAX_LISTED = 50

# What the model is shown in place of each question's own image (the image ablation).
IMAGE_SOURCES = ("own", "blank", "other")
BLANK_GREY = (128, 128, 128)


@dataclass
class RunOptions:
    split: str | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    skip_invalid: bool = False
    meteor: bool = True
    judge_endpoint: str | None = None
    judge_model: str | None = None
    judge_backend: str = "auto"
    judge_retries: int = 2
    progress: bool = True
    images_from: str = "own"
    report_samples: int = 4


# --------------------------------------------------------------------------------------------------
# Predictions on disk
# --------------------------------------------------------------------------------------------------


def read_predictions(path: Path) -> tuple[dict[str, Prediction], int]:
    """Predictions already made, and how many unreadable lines (a run killed mid-write) were dropped;
    the file is rewritten without them so they are generated again."""
    if not path.is_file():
        return {}, 0
    kept: list[str] = []
    preds: dict[str, Prediction] = {}
    dropped = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("text"), str):
            dropped += 1
            continue
        preds[str(record["id"])] = Prediction(record["text"], record.get("masks"))
        kept.append(line)
    if dropped:
        path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    return preds, dropped


def takes_visual_prompts(model: Any) -> bool:
    """Whether the model fills `<region>`/`<mark>` markers with visual prompts (OMG-LLaVA), given to its
    `generate_with_masks(..., visual_prompts=...)`."""
    return bool(getattr(model, "supports_visual_prompts", False)) and hasattr(model, "generate_with_masks")


def image_swap(
    items: Sequence[Item], images_from: str, name: str
) -> Callable[[ImageRef], ImageRef | Image.Image]:
    """The image shown instead of a question's own: itself, a grey image of its size, or the image halfway
    round the list of distinct images of `items` (so a question never meets its own picture)."""
    if images_from == "own":
        return lambda ref: ref
    if images_from == "blank":
        return lambda ref: Image.new("RGB", open_image(ref).size, BLANK_GREY)
    if images_from != "other":
        raise UnillavaError(f"images_from: expected one of {', '.join(IMAGE_SOURCES)}, got {images_from!r}")
    distinct = list(dict.fromkeys(ref for item in items for ref in item.images))
    if len(distinct) < 2:
        raise UnillavaError(f"{name}: the 'other image' ablation needs at least two distinct images")
    position = {ref: i for i, ref in enumerate(distinct)}
    return lambda ref: distinct[(position[ref] + len(distinct) // 2) % len(distinct)]


def _open(image: ImageRef | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else open_image(image)


def _generate(
    model: Any,
    items: Sequence[Item],
    images: Sequence[list[Any]],
    *,
    masks: bool,
    max_new_tokens: int,
    bar: Any,
    regions: bool = False,
) -> list[tuple[str, list[dict[str, Any]] | None]]:
    """Answers for a chunk; `regions`: pass each item's `visual_prompts` to the model."""
    conversations = [
        item.conversation or [user_message(item.prompt, len(ims))]
        for item, ims in zip(items, images, strict=True)
    ]
    if masks or regions:
        extra: dict[str, Any] = {}
        if regions:
            extra["visual_prompts"] = [item.visual_prompts or None for item in items]
        out = model.generate_with_masks(
            conversations,
            list(images),
            batch_size=len(items),
            max_new_tokens=max_new_tokens,
            progress=bar,
            **extra,
        )
        return [(text, list(m) if masks else None) for text, m in out]
    texts = model.generate_conversations(
        conversations, list(images), batch_size=len(items), max_new_tokens=max_new_tokens, progress=bar
    )
    return [(text, None) for text in texts]


def predict(
    model: Any,
    bench: Benchmark,
    items: Sequence[Item],
    path: Path,
    opts: RunOptions,
    swap: Callable[[ImageRef], ImageRef | Image.Image] = lambda ref: ref,
) -> tuple[dict[str, Prediction], dict[str, Any]]:
    """Answer the items not yet in `path` (appending as each batch finishes); returns all predictions and
    bookkeeping: missing images, unreadable images or failed prompts (not written, retried on the next run).
    `swap` gives the image shown for each of an item's images (the image ablation)."""
    preds, dropped = read_predictions(path)
    missing = [
        (item.id, str(ref))
        for item in items
        for ref in item.images
        if not isinstance(ref, EmbeddedImage) and not ref.is_file()
    ]
    missing_ids = {item_id for item_id, _ in missing}
    todo = [item for item in items if item.id not in preds and item.id not in missing_ids]
    masks = bench.segmentation and bool(getattr(model, "supports_segmentation", False))
    regions = bench.visual_prompt and takes_visual_prompts(model)
    max_new = opts.max_new_tokens or bench.max_new_tokens
    failed: list[str] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=bench.name, unit="q", disable=not (opts.progress and todo))
    with path.open("a", encoding="utf-8") as sink:
        for start in range(0, len(todo), opts.batch_size):
            chunk, images = [], []
            for item in todo[start : start + opts.batch_size]:
                try:
                    images.append([_open(swap(ref)) for ref in item.images])
                    chunk.append(item)
                except DataError as err:
                    failed.append(f"{item.id}: {err}")
                    bar.update(1)
            outputs: list[tuple[Item, tuple[str, Any]]] = []
            try:
                outputs = list(
                    zip(
                        chunk,
                        _generate(
                            model,
                            chunk,
                            images,
                            masks=masks,
                            max_new_tokens=max_new,
                            bar=bar,
                            regions=regions,
                        ),
                        strict=True,
                    )
                )
            except UnillavaError:
                for item, ims in zip(chunk, images, strict=True):
                    try:
                        outputs.append(
                            (
                                item,
                                _generate(
                                    model,
                                    [item],
                                    [ims],
                                    masks=masks,
                                    max_new_tokens=max_new,
                                    bar=bar,
                                    regions=regions,
                                )[0],
                            )
                        )
                    except UnillavaError as err:
                        failed.append(f"{item.id}: {err}")
                        bar.update(1)
            for item, (text, item_masks) in outputs:
                record: dict[str, Any] = {"id": item.id, "text": text}
                if item_masks is not None:
                    record["masks"] = [_jsonable_rle(m) for m in item_masks]
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                preds[item.id] = Prediction(text, record.get("masks"))
            sink.flush()
    bar.close()
    info = {
        "missing_images": [f"{item_id}: image not found: {ref}" for item_id, ref in missing],
        "failed": failed,
        "generated_now": len(todo) - len(failed),
        "partial_lines_redone": dropped,
        "masks": masks,
        "visual_prompts": regions,
    }
    return preds, info


def _jsonable_rle(mask: Mapping[str, Any]) -> dict[str, Any]:
    counts = mask.get("counts")
    return {
        "size": list(mask["size"]),
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


# --------------------------------------------------------------------------------------------------
# Judge
# --------------------------------------------------------------------------------------------------


def _body_key(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[
        :16
    ]


def run_judge(
    bench: Benchmark,
    requests: Sequence[dict[str, Any]],
    replies_path: Path,
    client: JudgeClient,
    retries: int,
) -> dict[str, str]:
    """Send each request not yet answered (same body) to the judge; replies are appended as they come.
    A reply the benchmark cannot parse is asked again up to `retries` times."""
    cached: dict[str, tuple[str, str]] = {}
    if replies_path.is_file():
        for line in replies_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                cached[str(rec["custom_id"])] = (str(rec["body_key"]), str(rec["content"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    parse: Callable[[str], Any] = getattr(bench, "parse_reply", lambda reply: reply)
    replies: dict[str, str] = {}
    with replies_path.open("a", encoding="utf-8") as sink:
        for request in tqdm(requests, desc=f"judge {bench.name}", unit="req", disable=not requests):
            key = _body_key(request["body"])
            hit = cached.get(request["custom_id"])
            if hit is not None and hit[0] == key:
                replies[request["custom_id"]] = hit[1]
                continue
            content = client.complete(request["body"])
            for _ in range(retries):
                if parse(content) is not None:
                    break
                content = client.complete(request["body"])
            replies[request["custom_id"]] = content
            sink.write(
                json.dumps(
                    {"custom_id": request["custom_id"], "body_key": key, "content": content},
                    ensure_ascii=False,
                )
                + "\n"
            )
            sink.flush()
    return replies


# --------------------------------------------------------------------------------------------------
# One benchmark
# --------------------------------------------------------------------------------------------------


def _invalid_error(name: str, problems: Sequence[str]) -> DataError:
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    return DataError(
        f"{name}: {len(problems)} invalid record(s) in the data:\n  {shown}{more}\n"
        "(rerun with --skip-invalid to evaluate the rest; they are then counted and listed in the results)"
    )


def _report_image(ref: ImageRef, images_dir: Path, stem: str) -> str | None:
    """A copy of a sample's image under `images_dir`, as a path relative to the run's directory."""
    images_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(ref, EmbeddedImage):
        target = images_dir / f"{stem}.png"
        try:
            ref.open().save(target)
        except DataError:
            return None
    else:
        if not ref.is_file():
            return None
        target = images_dir / f"{stem}_{ref.name}"
        shutil.copyfile(ref, target)
    return f"{images_dir.name}/{target.name}"


def sample_answers(
    bench: Benchmark, items: Sequence[Item], preds: Mapping[str, Prediction], out_dir: Path, n: int
) -> list[dict[str, Any]]:
    """The answered questions among the first `n`, for the report: question, answer, expected answer, and the
    first image copied under OUT/report_images (the question's own, also in an image ablation)."""
    samples = []
    for item in items[:n]:
        pred = preds.get(item.id)
        if pred is None:
            continue
        sample: dict[str, Any] = {
            "id": item.id,
            "question": item.prompt,
            "answer": pred.text,
            "truth": bench.reference(item),
        }
        if item.images:
            stem = re.sub(r"[^\w.-]", "_", f"{bench.name}_{item.id}")
            sample["image"] = _report_image(item.images[0], out_dir / "report_images", stem)
        samples.append(sample)
    return samples


def run_benchmark(
    model: Any, bench: Benchmark, root: Path, out_dir: Path, opts: RunOptions
) -> dict[str, Any]:
    """Load, predict, score (or judge, or write the server submission) one benchmark; writes its results file."""
    loaded = bench.load(root, opts.split)
    if loaded.problems and not opts.skip_invalid:
        raise _invalid_error(bench.name, loaded.problems)
    items = loaded.items[: opts.limit] if opts.limit else loaded.items
    if not items:
        raise DataError(
            f"{bench.name}: no usable questions in {root}"
            + (f" ({len(loaded.problems)} invalid)" if loaded.problems else "")
        )
    bench_dir = bench.output_dir(out_dir)
    swap = image_swap(loaded.items, opts.images_from, bench.name)
    preds, info = predict(model, bench, items, bench.predictions_path(out_dir, loaded.split), opts, swap)
    flags: list[str] = []
    if bench.segmentation and not info["masks"]:
        flags.append(FLAG_NO_MASKS)
    if bench.visual_prompt and not info["visual_prompts"]:
        flags.append(FLAG_NO_VISUAL_PROMPT)
    scorable = [item for item in items if item.answer is not None]
    result: dict[str, Any] = {"metrics": {}, "breakdown": {}, "warnings": []}
    status = "scored"
    judge_info: dict[str, Any] = {}
    if bench.judged and scorable:
        model_name = opts.judge_model or getattr(bench, "judge_default", "gpt-4")
        requests = bench.judge_requests(scorable, preds, model_name)
        _write_jsonl(
            bench_dir / "judge_requests.jsonl",
            [
                {
                    "custom_id": r["custom_id"],
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": r["body"],
                }
                for r in requests
            ],
        )
        judge_info = {"requests": str(bench_dir / "judge_requests.jsonl"), "model": model_name}
        if opts.judge_endpoint:
            client = JudgeClient(opts.judge_endpoint, model_name, backend=opts.judge_backend)
            replies = run_judge(
                bench, requests, bench_dir / "judge_replies.jsonl", client, opts.judge_retries
            )
            result = bench.score_judged(scorable, preds, replies)
            judge_info.update(
                endpoint=opts.judge_endpoint,
                backend=client.backend,
                replies=str(bench_dir / "judge_replies.jsonl"),
            )
        else:
            status = "awaiting judge"
            flags.append(FLAG_AWAITING_JUDGE)
    elif scorable:
        result = bench.score(scorable, preds, meteor=opts.meteor)
    else:
        status = "submission only"
    submission = [str(p) for p in bench.write_submission(items, preds, bench_dir, loaded.split, root)]
    if status == "submission only":
        flags.append(
            f"answers are not public for split {loaded.split!r}: submit {', '.join(submission) or 'the predictions'} to the server"
        )
    missing_preds = sum(1 for item in items if item.id not in preds)
    headline = bench.columns[0] if bench.columns else None
    results = {
        "benchmark": bench.name,
        "title": bench.title,
        "split": loaded.split,
        "data": str(root),
        "status": status,
        "metrics": result["metrics"],
        "headline": {
            "label": headline.label if headline else bench.title,
            "metric": headline.metric if headline else None,
            "value": bench.headline(result["metrics"]) if status == "scored" else None,
        },
        "metric_note": bench.metric_note,
        "breakdown": result.get("breakdown", {}),
        "counts": {
            "items": len(items),
            "loaded": len(loaded.items),
            "predicted": len(items) - missing_preds,
            "missing_predictions": missing_preds,
            "missing_images": len(info["missing_images"]),
            "failed": len(info["failed"]),
            "invalid_records": len(loaded.problems),
            **result.get("counts", {}),
        },
        "flags": flags,
        "warnings": list(result.get("warnings", []))
        + (
            [f"{missing_preds} question(s) have no prediction and are scored as wrong"]
            if missing_preds
            else []
        ),
        "notes": loaded.notes
        + (
            [f"{info['partial_lines_redone']} partial prediction line(s) from an interrupted run were redone"]
            if info["partial_lines_redone"]
            else []
        ),
        "problems": {
            "invalid_records": loaded.problems[:MAX_LISTED],
            "missing_images": info["missing_images"][:MAX_LISTED],
            "failed": info["failed"][:MAX_LISTED],
        },
        "submission": submission,
        "judge": judge_info,
        "limit": opts.limit,
        "images_from": opts.images_from,
        "samples": sample_answers(bench, items, preds, out_dir, opts.report_samples),
    }
    _write_json(bench.results_path(out_dir), results)
    return results


# --------------------------------------------------------------------------------------------------
# Several benchmarks, report
# --------------------------------------------------------------------------------------------------


def resolve(names: Sequence[str] | None, suite: str | None) -> list[Benchmark]:
    """The benchmarks of a suite, or of `names`; UnillavaError names an unknown suite or benchmark."""
    if suite is not None:
        if suite not in SUITES:
            raise UnillavaError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
        names = SUITES[suite]
    return [get_benchmark(n) for n in names or []]


def run_benchmarks(
    model: Any,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    suite: str | None = None,
    opts: RunOptions | None = None,
    model_name: str = "model",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run benchmarks by name or a suite; a suite skips (with a printed note) benchmarks whose data is not
    under `data_dir`, and records a benchmark whose data is unusable as failed instead of stopping."""
    opts = opts or RunOptions()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    benches = resolve(names, suite)
    done: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for bench in benches:
        root = bench.find_root(data_dir)
        if root is None:
            where = ", ".join([*(str(data_dir / d) for d in bench.dirs), str(data_dir)])
            reason = f"no data (looked in {where}); download: {bench.download}"
            if suite is None:
                raise DataError(f"{bench.name}: {reason}")
            echo(f"note: skipping {bench.name}: no data under {data_dir}")
            skipped[bench.name] = reason
            continue
        try:
            done[bench.name] = run_benchmark(model, bench, root, out_dir, opts)
        except DataError as err:
            if suite is None:
                raise
            echo(f"note: {bench.name} failed: {err}")
            skipped[bench.name] = f"failed: {err}"
    summary: dict[str, Any] = {
        "model": model_name,
        "data": str(data_dir),
        "suite": suite,
        "split": opts.split,
        "limit": opts.limit,
        "images_from": opts.images_from,
        "benchmarks": done,
        "skipped": skipped,
    }
    tasks = {b.task: done[b.name] for b in benches if b.task is not None and b.name in done}
    if tasks:
        summary["tasks"] = tasks
    _write_json(out_dir / "results.json", summary)
    write_report(out_dir, summary)
    return summary


def evaluate(
    model: Any,
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
    """`run_benchmarks` on procedural shapes tasks by task name (what the demo and experiment scripts call);
    the summary's "tasks" maps each task to its results.

    `images_from="blank"` / `"other"` asks the same questions about a grey image / another record's image
    (the image ablation: what the model answers without seeing the right picture)."""
    opts = RunOptions(
        split=split,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        report_samples=report_samples,
        images_from=images_from,
    )
    return run_benchmarks(model, data_dir, out_dir, names=task_benchmarks(tasks), opts=opts)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_cell(column: Any, results: Mapping[str, Any]) -> str:
    ran = [results[b] for b in column.benchmarks if b in results]
    if not ran:
        return "–"
    values = [r["metrics"].get(column.metric) for r in ran if r["status"] == "scored"]
    values = [v for v in values if v is not None]
    if not values:
        return {"awaiting judge": "judge", "submission only": "server"}.get(ran[0]["status"], "–")
    cell = _fmt(sum(values) / len(values) * column.scale)
    flagged = any(
        FLAG_NO_MASKS in r["flags"] and column.metric in ("ciou", "giou", "ap50", "miou", "recall")
        for r in ran
    )
    return cell + (" †" if flagged else "")


def paper_tables(summary: Mapping[str, Any]) -> list[str]:
    """Markdown tables laid out like the papers': our row, then the papers' reference rows (none when no
    benchmark of a paper ran)."""
    results = summary["benchmarks"]
    suites = (
        [summary["suite"]]
        if summary.get("suite") in PAPER_TABLES
        else [
            s for s, t in PAPER_TABLES.items() if any(b in results for c in t.columns for b in c.benchmarks)
        ]
    )
    if not suites:
        return []
    lines: list[str] = []
    for suite in suites:
        table = PAPER_TABLES[suite]
        columns = (
            table.columns
            if summary.get("suite") == suite
            else [c for c in table.columns if any(b in results for b in c.benchmarks)]
        )
        labels = [c.label for c in columns]
        lines += [
            f"### {table.title}",
            "",
            "| Model | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        lines.append(f"| {summary['model']} | " + " | ".join(table_cell(c, results) for c in columns) + " |")
        for row, values in table.references.items():
            lines.append(f"| {row} | " + " | ".join(_fmt(values.get(label)) for label in labels) + " |")
        lines += ["", f"_{table.note}_" if table.note else "", ""]
    if any(FLAG_NO_MASKS in r["flags"] for r in results.values()):
        lines.append(f"† {FLAG_NO_MASKS}.")
        lines.append("")
    lines.append(
        "`judge`: awaiting the GPT judge; `server`: scored by the benchmark's server (submission written); `–`: not run."
    )
    return lines


def write_report(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    """OUT/report.md: the papers' tables, then per benchmark its metrics, counts, flags and sample answers."""
    lines = ["# unillava evaluation report", "", f"Model: `{summary['model']}`  Data: `{summary['data']}`"]
    if summary.get("images_from", "own") != "own":
        lines.append(f"Images: **{summary['images_from']}** (image ablation)")
    lines.append("")
    lines += paper_tables(summary)
    for name, res in summary["benchmarks"].items():
        lines += [
            "",
            f"## {res['title']} (`{name}`, split `{res['split']}`)",
            "",
            f"Status: **{res['status']}**. Metric: {res['metric_note']}.",
            "",
        ]
        for name_m, value in res["metrics"].items():
            lines.append(f"- {name_m}: {_fmt(value, 4)}")
        counts = res["counts"]
        lines.append("- counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for key in ("flags", "warnings", "notes"):
            lines += [f"- {key[:-1]}: {text}" for text in res[key]]
        for kind, entries in res["problems"].items():
            if entries:
                lines.append(f"- {kind.replace('_', ' ')} ({counts.get(kind, len(entries))}), first ones:")
                lines += [f"    - `{e}`" for e in entries[:10]]
        if res["submission"]:
            lines.append("- submission: " + ", ".join(f"`{p}`" for p in res["submission"]))
        for sample in res.get("samples", []):
            lines.append("")
            if sample.get("image"):
                lines += [f"![{sample['id']}]({sample['image']})", ""]
            lines += [f"- **question**: {sample['question']}", f"- **answer**: {sample['answer']}"]
            if sample["truth"] is not None:
                lines.append(f"- **truth**: {sample['truth']}")
    for name, reason in summary["skipped"].items():
        lines += ["", f"- skipped `{name}`: {reason}"]
    path = out_dir / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def summary_table(summary: Mapping[str, Any]) -> Table:
    """One row per benchmark: its headline metric, named as its scorer names it, and its value."""
    table = Table(title="unillava eval")
    for col, justify in (
        ("benchmark", "left"),
        ("split", "left"),
        ("metric", "left"),
        ("value", "right"),
        ("n", "right"),
        ("status", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, res in summary["benchmarks"].items():
        status = res["status"] + (
            "; " + "; ".join(f.split(":")[0] for f in res["flags"]) if res["flags"] else ""
        )
        metric = res["headline"]["metric"]
        value = res["metrics"].get(metric) if metric and res["status"] == "scored" else None
        table.add_row(
            name,
            res["split"],
            metric or "",
            _fmt(value, 4),
            str(res["counts"]["items"]),
            status,
        )
    for name in summary["skipped"]:
        table.add_row(name, "", "", "", "", "skipped")
    return table


def print_summary(summary: Mapping[str, Any]) -> None:
    Console().print(summary_table(summary))


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


__all__ = [
    "BENCHMARKS",
    "IMAGE_SOURCES",
    "RunOptions",
    "evaluate",
    "print_summary",
    "read_predictions",
    "resolve",
    "run_benchmark",
    "run_benchmarks",
    "summary_table",
]
