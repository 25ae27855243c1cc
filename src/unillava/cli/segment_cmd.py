"""`unillava segment` (masks from a prompt), `unillava train-segmenter` and `eval-segmenter` (stage 0).

`segment --box X0,Y0,X1,Y1 --point X,Y --mask FILE.png` adds visual prompts (`cli/prompt_flags.py`, shared
with `generate` and `chat`): in typed order they fill the prompt's `<region>` / `<mark>` tokens, and
"region1 <region>"-style markers are appended when the prompt has none.

`segment` writes `mask_{i}.png` (one per [SEG], white = object), `overlay.png` (the image with every mask
tinted) and `result.json` (text, phrases, scores, COCO RLE) into `--out`, and prints the answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unillava.cli.prompt_flags import add_prompt_flags, prompts_from_flags
from unillava.data.images import load_image
from unillava.errors import ConfigError
from unillava.inference import load
from unillava.omg.perception import (
    PerceptionModel,
    evaluate_segmenter,
    load_instances,
    tiny_perception_config,
    train_segmenter,
)

OVERLAY_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def overlay(image: Image.Image, masks: list[np.ndarray], alpha: float = 0.5) -> Image.Image:
    """The image with each mask blended in its own colour (for a quick look at what was segmented)."""
    out = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for i, mask in enumerate(masks):
        color = np.array(OVERLAY_COLORS[i % len(OVERLAY_COLORS)], dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * color
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _run_segment(args: argparse.Namespace) -> int:
    model = load(args.model)
    if model.segmenter is None:
        raise ConfigError(f"{args.model}: this model does not segment (it is not an OMG-LLaVA model)")
    image = load_image(args.image)
    prompts = prompts_from_flags(args.visual_prompts, [image])
    with torch.inference_mode():
        result = model.segment(image, args.prompt, max_new_tokens=args.max_new_tokens, visual_prompts=prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(result.masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"mask_{i}.png")
    overlay(image, result.masks).save(out / "overlay.png")
    record = {"text": result.text, "phrases": result.phrases, "scores": result.scores, "masks": result.rles}
    (out / "result.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(result.text, file=sys.stdout)
    return 0


def _perception_config(text: str | None) -> dict:
    if text is None or text == "tiny":
        return tiny_perception_config()
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"--config: {text!r} is neither 'tiny' nor a JSON file")
    return json.loads(path.read_text(encoding="utf-8"))


def _run_train(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if args.init is not None:
        model = PerceptionModel.from_pretrained(args.init)
    else:
        config = _perception_config(args.config)
        config["num_labels"] = len(load_instances(args.data, "train")[1])
        model = PerceptionModel(config)

    def log(step: int, loss: float) -> None:
        if step % args.log_every == 0 or step == args.steps:
            print(json.dumps({"step": step, "loss": round(loss, 4)}), file=sys.stdout, flush=True)

    train_segmenter(
        model,
        args.data,
        steps=args.steps,
        image_size=args.image_size,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        log=log,
    )
    model.save_pretrained(args.out)
    print(f"saved the segmenter to {args.out}", file=sys.stdout)
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    model = PerceptionModel.from_pretrained(args.model)
    metrics = evaluate_segmenter(model, args.data, image_size=args.image_size, split=args.split)
    print(json.dumps(metrics), file=sys.stdout)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `segment`, `train-segmenter` and `eval-segmenter`."""
    seg = subparsers.add_parser(
        "segment",
        help="answer a prompt with masks (OMG-LLaVA models)",
        description="Answer a prompt about an image and write one mask per [SEG].",
    )
    seg.add_argument("--model", required=True, help="an OMG-LLaVA model directory")
    seg.add_argument("--image", required=True, help="image file")
    seg.add_argument("--prompt", required=True, help='e.g. "Please segment the red circle in this image."')
    seg.add_argument("--out", required=True, help="directory for mask_*.png, overlay.png, result.json")
    seg.add_argument("--max-new-tokens", type=int, default=64)
    add_prompt_flags(seg)
    seg.set_defaults(func=_run_segment)

    train = subparsers.add_parser(
        "train-segmenter",
        help="stage 0: train the perception model on COCO instances",
        description="Train the Mask2Former segmenter on annotations/instances_train.json.",
    )
    train.add_argument("--data", required=True, help="dataset root with annotations/ and images/")
    train.add_argument("--out", required=True, help="output directory (perception_config.json + weights)")
    train.add_argument("--config", default=None, help="'tiny' (default) or a JSON Mask2Former config")
    train.add_argument("--init", default=None, help="continue from a saved segmenter directory")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=2)
    train.add_argument("--image-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=10)
    train.set_defaults(func=_run_train)

    ev = subparsers.add_parser(
        "eval-segmenter",
        help="stage 0: mask AP of a segmenter (pycocotools)",
        description="COCO mask AP / AP50 / AP75 on annotations/instances_{split}.json.",
    )
    ev.add_argument("--model", required=True, help="a segmenter directory from train-segmenter")
    ev.add_argument("--data", required=True, help="dataset root")
    ev.add_argument("--split", default="test")
    ev.add_argument("--image-size", type=int, default=256)
    ev.set_defaults(func=_run_eval)
