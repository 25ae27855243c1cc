"""`unillava generate` (one answer) and `unillava chat` (interactive, multi-turn, streaming)."""

from __future__ import annotations

import argparse
import json
import sys

from unillava.errors import UnillavaError


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (unillava, llava-hf or original LLaVA)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="answer one prompt about zero or more images")
    _add_sampling(gen)
    gen.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--json", action="store_true", help='print {"text": ...} as JSON')
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="interactive multi-turn chat; /image PATH adds an image")
    _add_sampling(chat)
    chat.add_argument("--image", action="append", default=[], help="an image for the first turn")
    chat.set_defaults(func=run_chat)


def _settings(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}


def run_generate(args: argparse.Namespace) -> int:
    import unillava
    from unillava.conversation import user_message
    from unillava.data.images import load_image

    images = [load_image(path) for path in args.image]
    model = unillava.load(args.model, dtype=args.dtype)
    result: dict = {}
    if model.supports_segmentation:
        # Pixel-level models answer with masks for their [SEG] tokens (greedy, as `unillava segment`).
        [(text, masks)] = model.generate_with_masks(
            [[user_message(args.prompt, len(images))]], [images], max_new_tokens=args.max_new_tokens
        )
        result = {"text": text, "masks": masks}
    else:
        result = {"text": model.generate(args.prompt, images, **_settings(args))}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(result["text"])
        if "masks" in result:
            print(f"({len(result['masks'])} mask(s); use --json or `unillava segment` to get them)")
    return 0


CHAT_HELP = "commands: /image PATH (attach an image to your next message), /reset, /quit"


def run_chat(args: argparse.Namespace) -> int:
    import unillava
    from unillava.conversation import Message, user_message
    from unillava.data.images import load_image

    model = unillava.load(args.model, dtype=args.dtype)
    history: list[Message] = []
    images = []
    pending = [load_image(path) for path in args.image]
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, images, pending = [], [], []
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                pending.append(load_image(path))
            except UnillavaError as err:
                print(f"error: {err}", file=sys.stderr)
                continue
            print(f"(image {path} attached to your next message)")
            continue
        message = user_message(line, len(pending))
        turn_images = pending
        pending = []
        try:
            print("assistant> " if interactive else "", end="", flush=True)
            reply = ""
            for piece in model.chat([*history, message], [*images, *turn_images], stream=True, **_settings(args)):
                reply += piece
                print(piece, end="", flush=True)
            print()
        except UnillavaError as err:
            print(f"\nerror: {err}", file=sys.stderr)
            continue
        history += [message, Message("assistant", [reply.strip()])]
        images += turn_images
    return 0
