"""`unillava serve`: the OpenAI-compatible API and the web page for one model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from unillava.cli.decoding_flags import add_decoding_flags, decoding_options
from unillava.cli.template_flag import add_template_flag
from unillava.errors import UnillavaError
from unillava.inference import load
from unillava.serving import ServerConfig, create_app


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a web page"
    )
    p.add_argument("--model", required=True, help="model directory (unillava, llava-hf or original LLaVA)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("UNILLAVA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (401 otherwise); default: $UNILLAVA_API_KEY, "
        "which keeps the key out of the process list",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: the directory name)"
    )
    p.add_argument("--max-batch", type=int, default=8, help="most requests run together in one batch")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get HTTP 429")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=250.0,
        help="longest a forming batch waits for requests still being received and encoded",
    )
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let requests name http(s) image URLs that the server then fetches",
    )
    p.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds before a request is given up (504)"
    )
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body size limit (413 above)")
    p.add_argument(
        "--max-image-pixels", type=int, default=4096 * 4096, help="per-image pixel limit (400 above)"
    )
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request gives none")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for the model (default: torch's)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_template_flag(p)
    add_decoding_flags(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn  # lazy: every CLI command imports this module, only `serve` runs a server

    for name in ("max_batch", "max_queue", "max_images", "default_max_tokens", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise UnillavaError(f"--{name.replace('_', '-')} must be at least 1")
    if args.request_timeout <= 0 or args.max_body_mb <= 0:
        raise UnillavaError("--request-timeout and --max-body-mb must be positive")
    if not _is_loopback(args.host) and not args.api_key:
        print(
            f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    model = load(
        args.model, dtype=args.dtype, device=args.device, template=args.template, **decoding_options(args)
    )
    config = ServerConfig(
        model_name=args.served_model_name or Path(args.model).resolve().name,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms,
        allow_remote_images=args.allow_remote_images,
        request_timeout=args.request_timeout,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        default_max_tokens=args.default_max_tokens,
        threads=args.threads,
    )
    app = create_app(model, config)
    print(
        f"serving {config.model_name} on http://{args.host}:{args.port} (web page at /, API at /v1)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5)
    return 0
