"""The shapes dataset writer: renders scenes in worker processes and writes images, scene files, COCO
instances, task files and a manifest."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from unillava.data.shapes.scene import (
    COLOR_NAMES,
    GENERATOR_VERSION,
    SHAPES,
    SPLITS,
    SceneSpec,
    image_path,
    is_fine_scene,
    render_scene,
    split_seed,
)
from unillava.data.shapes.tasks import ALL_TASKS, JSONL_TASKS, build_scene_tasks, popular_pairs
from unillava.errors import DataError


def _render_job(job: tuple[str, str, int, int, SceneSpec, int]) -> tuple[str, int, dict, str]:
    """Render one scene and write its PNG; runs in a worker process."""
    out_dir, split, sseed, index, spec, fine_every = job
    if is_fine_scene(index, fine_every):
        spec = replace(spec, fine=True)
    image, scene = render_scene([sseed, index], spec)
    scene["image_id"] = index
    scene["file_name"] = image_path(split, index)
    image.save(os.path.join(out_dir, scene["file_name"]), format="PNG", compress_level=1)
    return split, index, scene, json.dumps(scene, separators=(",", ":"))


def _task_job(
    job: tuple[str, int, int, dict, tuple[str, ...], list],
) -> tuple[str, int, dict[str, list[str]]]:
    split, sseed, index, scene, tasks, popular = job
    records = build_scene_tasks(scene, split, index, tasks, [sseed, index, 1], popular)
    return (
        split,
        index,
        {t: [json.dumps(r, separators=(",", ":")) for r in recs] for t, recs in records.items()},
    )


def _coco_categories() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]


def _coco_instances(split: str, scenes: list[dict]) -> dict[str, Any]:
    """COCO instance annotations of one split (visible-area RLE masks, categories = shapes)."""
    images, annotations = [], []
    cat = {s: i + 1 for i, s in enumerate(SHAPES)}
    for scene in scenes:
        images.append(
            {
                "id": scene["image_id"],
                "file_name": scene["file_name"],
                "width": scene["width"],
                "height": scene["height"],
            }
        )
        for obj in scene["objects"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": scene["image_id"],
                    "category_id": cat[obj["shape"]],
                    "segmentation": obj["segmentation"],
                    "area": obj["area"],
                    "bbox": obj["bbox"],
                    "iscrowd": 0,
                    "object_id": obj["id"],
                    "color": obj["color"],
                    "size": obj["size"],
                    "text": obj["text"],
                    "z": obj["z"],
                }
            )
    return {
        "info": {"description": f"unillava shapes ({split})", "version": GENERATOR_VERSION},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _coco_categories(),
    }


def _parse_tasks(tasks: str | Iterable[str] | None) -> tuple[str, ...]:
    if tasks is None or tasks == "all":
        return ALL_TASKS
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if names == ["all"]:
        return ALL_TASKS
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown or not names:
        raise DataError(
            f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from all, {', '.join(ALL_TASKS)}"
        )
    return tuple(t for t in ALL_TASKS if t in names)


_OUTPUTS = ("images", "scenes", "annotations", "tasks", "manifest.json")


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    existing = [name for name in _OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise DataError(
            f"{out} already holds a dataset ({', '.join(existing)}); pass --overwrite to replace it"
        )
    for name in existing:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


def generate_dataset(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    *,
    n_val: int | None = None,
    n_test: int | None = None,
    min_size: int = 128,
    max_size: int = 1536,
    aspect_range: tuple[float, float] = (0.5, 2.0),
    difficulty: str = "medium",
    fine_every: int = 5,
    max_texts: int | None = None,
    workers: int | None = None,
    tasks: str | Iterable[str] | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Render train/val/test scenes and write images, scene GT, COCO instances and task files.

    `fine_every` picks the scenes with the fine profile (see `is_fine_scene`); `max_texts` caps the objects
    that carry a character (1 makes fine_text answerable by reading alone, with no need to find the
    described object: the probe of resolution that ConvLLaVA's experiment needs).

    Output bytes depend only on the arguments that appear in the manifest (not on workers), so a
    dataset can be regenerated exactly from its manifest. Returns the manifest.
    """

    n_val = max(1, n // 10) if n_val is None else n_val
    n_test = max(1, n // 10) if n_test is None else n_test
    for name, value in (("n", n), ("n-val", n_val), ("n-test", n_test)):
        if not isinstance(value, int) or value < 0:
            raise DataError(f"--{name} must be a non-negative integer, got {value!r}")
    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"--seed must be a non-negative integer, got {seed!r}")
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if not isinstance(fine_every, int) or fine_every < 0:
        raise DataError(f"--fine-every must be a non-negative integer, got {fine_every!r}")
    aspect = tuple(float(v) for v in aspect_range)
    if len(aspect) != 2:
        raise DataError(f"aspect range needs two numbers lo,hi, got {aspect_range!r}")
    spec = SceneSpec(
        int(min_size), int(max_size), (aspect[0], aspect[1]), difficulty, max_texts=max_texts
    ).validate()
    task_names = _parse_tasks(tasks)
    workers = workers or os.cpu_count() or 1

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_out_dir(out, overwrite)
    counts = {"train": n, "val": n_val, "test": n_test}
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "tasks" / split).mkdir(parents=True, exist_ok=True)
    (out / "scenes").mkdir(exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)

    jobs = [
        (str(out), s, split_seed(seed, s), i, spec, fine_every)
        for s in SPLITS
        for i in range(1, counts[s] + 1)
    ]
    total = len(jobs)
    scenes: dict[str, list[dict]] = {s: [] for s in SPLITS}
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 and total > 1 else None
    try:
        mapper = (lambda fn, it: pool.imap(fn, it, chunksize=8)) if pool else map
        with tqdm(total=total, desc="render scenes", unit="scene", disable=not progress) as bar:
            handles = {s: open(out / "scenes" / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
            try:
                for split, _index, scene, line in mapper(_render_job, jobs):
                    scenes[split].append(scene)
                    handles[split].write(line + "\n")
                    bar.update()
            finally:
                for fh in handles.values():
                    fh.close()

        jsonl_tasks = tuple(t for t in task_names if t in JSONL_TASKS)
        task_counts = {s: dict.fromkeys(jsonl_tasks, 0) for s in SPLITS}
        popular = {s: popular_pairs(scenes[s]) for s in SPLITS}
        task_jobs = (
            (s, split_seed(seed, s), sc["image_id"], sc, jsonl_tasks, popular[s])
            for s in SPLITS
            for sc in scenes[s]
        )
        handles = {
            (s, t): open(out / "tasks" / s / f"{t}.jsonl", "w", encoding="utf-8")
            for s in SPLITS
            for t in jsonl_tasks
        }
        try:
            with tqdm(total=total, desc="build tasks", unit="scene", disable=not progress) as bar:
                for split, _index, lines in mapper(_task_job, task_jobs):
                    for t, recs in lines.items():
                        if recs:
                            handles[(split, t)].write("\n".join(recs) + "\n")
                        task_counts[split][t] += len(recs)
                    bar.update()
        finally:
            for fh in handles.values():
                fh.close()
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    for split in SPLITS:
        with open(out / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as fh:
            json.dump(_coco_instances(split, scenes[split]), fh, separators=(",", ":"))

    manifest = {
        "generator": "unillava.data.shapes",
        "version": GENERATOR_VERSION,
        "arguments": {
            "n": n,
            "n_val": n_val,
            "n_test": n_test,
            "seed": seed,
            "min_size": spec.min_size,
            "max_size": spec.max_size,
            "aspect_range": list(spec.aspect_range),
            "difficulty": spec.difficulty,
            "fine_every": fine_every,
            "max_texts": max_texts,
            "tasks": list(task_names),
        },
        "shapes": list(SHAPES),
        "colors": list(COLOR_NAMES),
        "splits": {
            s: {
                "seed": split_seed(seed, s),
                "scenes": counts[s],
                "objects": sum(len(sc["objects"]) for sc in scenes[s]),
                "tasks": {
                    **task_counts[s],
                    **(
                        {"instances": sum(len(sc["objects"]) for sc in scenes[s])}
                        if "instances" in task_names
                        else {}
                    ),
                },
            }
            for s in SPLITS
        },
    }
    with open(out / "manifest.json", "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    return manifest
