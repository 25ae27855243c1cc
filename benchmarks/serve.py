"""Serving throughput and latency: `unillava serve` under 1, 4 and 16 concurrent clients.

Starts the server as a subprocess on a free loopback port, then for each client count runs that many
client threads, each sending `--requests` image+text chat requests back to back (all clients start
together, as a burst of users would). Prints
requests/s, completion tokens/s, p50/p95 latency, the mean batch size the server ran (from /health)
and the token throughput relative to one client (batching should give 16 clients >= 3x).

    .venv/bin/python benchmarks/serve.py [--model DIR] [--clients 1,4,16] [--requests 3] [--max-tokens 64]
                                         [--threads N]

Without --model, a model with the embedded default LLM (SmolLM2-135M) and a small CLIP tower (random
vision weights: speed does not depend on their values) is built, as in benchmarks/infer.py. Requests
use `ignore_eos`, so every answer is exactly --max-tokens long and runs are comparable.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from unillava.config import LLMConfig, ModelConfig, VisionConfig
from unillava.modeling import LlavaModel


def default_model_dir() -> Path:
    torch.manual_seed(0)
    vision = VisionConfig(
        hf_config={
            "hidden_size": 192,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 3,
            "image_size": 64,
            "patch_size": 8,
        },
        image_size=64,
    )
    path = Path(tempfile.mkdtemp(prefix="unillava-serve-bench-")) / "smollm2-clip64"
    LlavaModel.from_config(ModelConfig(vision=vision, llm=LLMConfig())).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_url(i: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64 + 8 * (i % 4), 64), (40 * i % 255, 90, 160)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def request_body(i: int, max_tokens: int) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url(i)}},
                    {"type": "text", "text": f"Describe image number {i} in detail."},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    before = httpx.get(f"{url}/health").json()

    def client(k: int) -> None:
        bodies = [request_body(k * 1000 + n, max_tokens) for n in range(requests)]
        with httpx.Client(timeout=900) as http:
            ready.wait()
            for body in bodies:
                t0 = time.perf_counter()
                response = http.post(f"{url}/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - t0
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        tokens.append(response.json()["usage"]["completion_tokens"])
                    else:
                        errors.append(response.text[:200])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = httpx.get(f"{url}/health").json()
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    batches = sum(sizes.values())
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "wall": wall,
        "req_s": len(latencies) / wall,
        "tok_s": sum(tokens) / wall,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan"),
        "mean_batch": sum(k * v for k, v in sizes.items()) / batches if batches else 0.0,
        "batches": " ".join(f"{k}x{v}" for k, v in sorted(sizes.items(), reverse=True) if v),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model directory (default: SmolLM2 + small CLIP, built now)"
    )
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument(
        "--requests", type=int, default=3, help="requests each client sends, one after another"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=250.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    args = parser.parse_args()

    model_dir = Path(args.model) if args.model else default_model_dir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "unillava",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--batch-wait-ms",
        str(args.batch_wait_ms),
        "--log-level",
        "warning",
        "--served-model-name",
        "bench",
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        httpx.post(
            f"{url}/v1/chat/completions", json=request_body(0, args.max_tokens), timeout=600
        )  # warm-up
        load_before = os.getloadavg()
        results = [run_level(url, int(c), args.requests, args.max_tokens) for c in args.clients.split(",")]
        load_after = os.getloadavg()
    finally:
        server.terminate()
        server.wait(30)

    threads = args.threads or torch.get_num_threads()
    title = (
        f"unillava serve: {model_dir.name}, {args.max_tokens} tokens/answer, max batch {args.max_batch}, "
        f"{threads} torch thread(s), {os.cpu_count()} CPUs, load avg {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    table = Table(title=title)
    for col in (
        "clients",
        "requests",
        "errors",
        "req/s",
        "tok/s",
        "p50 latency (s)",
        "p95 latency (s)",
        "mean batch",
        "batches (size x n)",
        "tok/s vs 1 client",
    ):
        table.add_column(col, justify="right")
    base = results[0]["tok_s"] or float("nan")
    for r in results:
        table.add_row(
            str(r["clients"]),
            str(r["requests"]),
            str(r["errors"]),
            f"{r['req_s']:.2f}",
            f"{r['tok_s']:.1f}",
            f"{r['p50']:.2f}",
            f"{r['p95']:.2f}",
            f"{r['mean_batch']:.1f}",
            r["batches"],
            f"{r['tok_s'] / base:.2f}x",
        )
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
