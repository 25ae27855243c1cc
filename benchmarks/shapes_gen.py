"""Throughput of the shapes benchmark generator (render + PNG + GT + task files).

The target is 10,000 512-px scenes in under two minutes on a 2-core machine. Prints a markdown
table: scenes/s, the implied seconds for 10k scenes, MB written, and the CPU seconds used by this
process and its workers. On a shared machine wall time depends on other load; CPU seconds divided
by the number of cores ("idle s/10k") is what the run would take with the cores to itself.

    python benchmarks/shapes_gen.py --n 10000 --size 512
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from unillava.data.shapes import generate_dataset


def _dir_mb(path: Path, sub: str = "") -> float:
    root = path / sub if sub else path
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    """Generate one or more configurations into a scratch folder and print their timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="train scenes per configuration")
    parser.add_argument("--size", type=int, default=512, help="square image side in px")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--difficulty", default="medium,hard,easy", help="comma list of difficulties to time")
    parser.add_argument(
        "--tasks", default="all", help="task list passed to the generator ('instances' = GT only)"
    )
    parser.add_argument(
        "--out", default=None, help="scratch folder (default: a temp dir, deleted afterwards)"
    )
    args = parser.parse_args()

    scratch = Path(args.out or tempfile.mkdtemp(prefix="shapes_bench_"))
    workers = args.workers or os.cpu_count() or 1
    rows = []
    try:
        for difficulty in args.difficulty.split(","):
            out = scratch / difficulty
            load = os.getloadavg()[0]
            cpu0, start = _cpu_seconds(), time.perf_counter()
            manifest = generate_dataset(
                out,
                args.n,
                0,
                n_val=0,
                n_test=0,
                min_size=args.size,
                max_size=args.size,
                aspect_range=(1.0, 1.0),
                difficulty=difficulty,
                workers=workers,
                tasks=args.tasks,
                overwrite=True,
            )
            seconds = time.perf_counter() - start
            cpu = _cpu_seconds() - cpu0
            cores = min(workers, os.cpu_count() or 1)
            records = sum(manifest["splits"]["train"]["tasks"].values())
            rows.append(
                (
                    difficulty,
                    args.n,
                    seconds,
                    args.n / seconds,
                    10000 * seconds / args.n,
                    cpu,
                    10000 * cpu / cores / args.n,
                    _dir_mb(out),
                    _dir_mb(out, "images"),
                    records,
                    load,
                )
            )
            shutil.rmtree(out)
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"\nshapes generator, {args.size}x{args.size} px, workers={workers}, tasks={args.tasks}, cpus={os.cpu_count()}\n"
    )
    print(
        "| difficulty | scenes | wall s | scenes/s | wall s/10k | CPU s | idle s/10k | MB written | MB images"
        " | task records | load avg at start |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d, n, s, rate, per10k, cpu, idle, mb, mb_img, recs, load in rows:
        print(
            f"| {d} | {n} | {s:.1f} | {rate:.1f} | {per10k:.1f} | {cpu:.1f} | {idle:.1f} | {mb:.1f} | {mb_img:.1f}"
            f" | {recs} | {load:.2f} |"
        )


if __name__ == "__main__":
    main()
