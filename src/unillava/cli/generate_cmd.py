"""`unillava generate` (one answer) and `unillava chat` (interactive, multi-turn, streaming).

Both take `--box` / `--point` / `--mask` visual prompts (`cli/prompt_flags.py`) for models that have
`<region>`/`<mark>` tokens (OMG-LLaVA); other models reject them with exit code 2. In `chat` the flags
apply to the first message, and `/box`, `/point`, `/mask` attach prompts to the next one, as `/image` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from PIL import Image

from unillava.cli.decoding_flags import add_decoding_flags, decoding_options
from unillava.cli.prompt_flags import NO_PROMPTS, add_prompt_flags, parse_prompt, prompts_from_flags
from unillava.cli.template_flag import add_template_flag
from unillava.conversation import Message, user_message
from unillava.data.images import load_image
from unillava.errors import ConfigError, UnillavaError
from unillava.generation import GenerationSettings
from unillava.inference import InferenceModel, load
from unillava.segmentation import with_prompt_markers


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="model directory (unillava, llava-hf or original LLaVA)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_template_flag(parser)
    add_decoding_flags(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="answer one prompt about zero or more images")
    _add_sampling(gen)
    gen.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--json",
        action="store_true",
        help='print {"text": ...} as JSON (with "masks", COCO RLE, for segmenting models)',
    )
    add_prompt_flags(gen, scope="on the last --image (OMG-LLaVA models)")
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser(
        "chat",
        help="interactive multi-turn chat; /image PATH adds an image",
        description="Interactive multi-turn chat. " + CHAT_HELP + ". Once a visual "
        "prompt is given, answers are greedy and printed whole (as `segment`).",
    )
    _add_sampling(chat)
    chat.add_argument("--image", action="append", default=[], help="an image for the first turn")
    add_prompt_flags(chat, scope="for the first message, on the last --image (OMG-LLaVA models)")
    chat.set_defaults(func=run_chat)


def _settings(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def run_generate(args: argparse.Namespace) -> int:
    images = [load_image(path) for path in args.image]
    prompts = prompts_from_flags(args.visual_prompts, images)
    model = load(args.model, dtype=args.dtype, template=args.template, **decoding_options(args))
    if prompts and not model.supports_visual_prompts:
        raise ConfigError(f"{args.model}: {NO_PROMPTS}")
    result: dict = {}
    if model.supports_segmentation:
        # Pixel-level models answer with masks for their [SEG] tokens (greedy, as `unillava segment`);
        # visual prompts get "region1 <region>"-style markers when the prompt text has none, as there.
        conversation = [user_message(args.prompt, len(images))]
        if prompts:
            conversation = with_prompt_markers(conversation, prompts)
        [(text, masks)] = model.generate_with_masks(
            [conversation],
            [images],
            max_new_tokens=args.max_new_tokens,
            visual_prompts=[prompts] if prompts else None,
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


CHAT_HELP = (
    "commands: /image PATH (attach an image to your next message), /box X0,Y0,X1,Y1, /point X,Y, /mask FILE.png "
    "(a visual prompt on the latest image for your next message; OMG-LLaVA models), /reset, /quit"
)
PROMPT_COMMANDS = {"/box": "box", "/point": "point", "/mask": "mask"}


def _pixel_reply(
    model: InferenceModel,
    conversation: list[Message],
    images: list[Image.Image],
    prompts: list[dict[str, Any]],
    args: argparse.Namespace,
) -> tuple[str, int]:
    """(answer, mask count) once the conversation has visual prompts: the model's pixel-level hook (greedy,
    as `segment`), given every prompt so far because their markers stay in the history."""
    settings = GenerationSettings(**_settings(args))
    text, masks = model.chat_pixels(conversation, images, prompts, settings=settings, return_masks=True)
    return text, len(masks)


def run_chat(args: argparse.Namespace) -> int:
    pending = [load_image(path) for path in args.image]
    pending_prompts = prompts_from_flags(args.visual_prompts, pending)
    model = load(args.model, dtype=args.dtype, template=args.template, **decoding_options(args))
    if pending_prompts and not model.supports_visual_prompts:
        raise ConfigError(f"{args.model}: {NO_PROMPTS}")
    history: list[Message] = []
    images = []
    prompts: list[dict[str, Any]] = []  # every prompt given so far, in marker order
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
            history, images, pending, prompts, pending_prompts = [], [], [], [], []
            print("(conversation cleared)")
            continue
        command, _, rest = line.partition(" ")
        if command in PROMPT_COMMANDS:
            kind = PROMPT_COMMANDS[command]
            marked = [*images, *pending]
            try:
                if not model.supports_visual_prompts:
                    raise ConfigError(NO_PROMPTS)
                if not marked:
                    raise ConfigError(f"{command} marks an image: attach one first with /image PATH")
                pending_prompts.append(
                    parse_prompt(kind, rest.strip(), marked[-1], len(marked) - 1, prefix="/")
                )
            except UnillavaError as err:
                print(f"error: {err}", file=sys.stderr)
                continue
            print(f"({kind} prompt attached to your next message)")
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
        if pending_prompts:
            [message] = with_prompt_markers([message], pending_prompts)
        turn_images, turn_prompts = pending, [*prompts, *pending_prompts]
        pending, pending_prompts = [], []
        try:
            print("assistant> " if interactive else "", end="", flush=True)
            if turn_prompts:
                reply, n_masks = _pixel_reply(
                    model, [*history, message], [*images, *turn_images], turn_prompts, args
                )
                print(
                    reply
                    + (
                        f"  ({n_masks} mask(s); use `unillava generate --json` to get them)"
                        if n_masks
                        else ""
                    )
                )
            else:
                reply = ""
                for piece in model.chat(
                    [*history, message], [*images, *turn_images], stream=True, **_settings(args)
                ):
                    reply += piece
                    print(piece, end="", flush=True)
                print()
        except UnillavaError as err:
            print(f"\nerror: {err}", file=sys.stderr)
            continue
        history += [message, Message("assistant", [reply.strip()])]
        images += turn_images
        prompts = turn_prompts
    return 0
