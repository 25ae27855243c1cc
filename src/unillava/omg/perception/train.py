"""Stage 0: train the segmenter on COCO-format instances and measure its mask AP with pycocotools.

OMG-LLaVA freezes a segmenter trained beforehand; with no released weights we can load offline, the
procedural shapes data (`annotations/instances_{split}.json`) is our COCO. The same code reads real COCO.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from unillava.config import CLIP_MEAN, CLIP_STD
from unillava.data.images import ImagePreprocessor, load_image
from unillava.data.masks import decode_mask
from unillava.errors import DataError
from unillava.omg.perception.geometry import PadGeometry
from unillava.omg.perception.model import PerceptionModel


@dataclass
class InstanceSample:
    image: Path
    width: int
    height: int
    image_id: int
    annotations: list[dict[str, Any]]


def load_instances(root: str | Path, split: str) -> tuple[list[InstanceSample], list[int]]:
    """Images with their annotations from `root/annotations/instances_{split}.json`, and the sorted
    category ids (label i of the segmenter is category_ids[i])."""
    root = Path(root)
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise DataError(f"{path}: no COCO instances file (make one with `unillava data shapes`)")
    data = json.loads(path.read_text(encoding="utf-8"))
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    samples = [
        InstanceSample(
            root / im["file_name"], im["width"], im["height"], im["id"], by_image.get(im["id"], [])
        )
        for im in data["images"]
    ]
    return samples, sorted(c["id"] for c in data["categories"])


def preprocessor_for(size: int) -> ImagePreprocessor:
    """OMG pads to a square before resizing; the tower and stage 0 must agree on this."""
    return ImagePreprocessor(size=size, mode="pad", mean=CLIP_MEAN, std=CLIP_STD)


def make_targets(
    sample: InstanceSample, size: int, category_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels (3, size, size), masks (n, size, size) float and labels (n,) in the segmenter's frame."""
    pixels = preprocessor_for(size)(load_image(sample.image))
    geometry = PadGeometry(sample.width, sample.height, size)
    index = {c: i for i, c in enumerate(category_ids)}
    masks, labels = [], []
    for ann in sample.annotations:
        if ann.get("iscrowd", 0):
            continue
        masks.append(geometry.mask_to_input(decode_mask(ann["segmentation"])))
        labels.append(index[ann["category_id"]])
    if not masks:
        return pixels, torch.zeros(0, size, size), torch.zeros(0, dtype=torch.long)
    return pixels, torch.stack(masks), torch.tensor(labels, dtype=torch.long)


def train_segmenter(
    model: PerceptionModel,
    root: str | Path,
    *,
    steps: int,
    image_size: int,
    split: str = "train",
    batch_size: int = 2,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    max_grad_norm: float | None = 0.01,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW on the full segmenter with Mask2Former's losses and its gradient clipping (total norm 0.01;
    AdamW is nearly invariant to that scale, the clip only tames spikes); returns each step's loss."""
    samples, category_ids = load_instances(root, split)
    samples = [s for s in samples if s.annotations]
    if not samples:
        raise DataError(f"{root}: split {split!r} has no annotated image")
    if len(category_ids) != model.config.num_labels:
        raise DataError(
            f"{len(category_ids)} categories in the data but the segmenter has {model.config.num_labels}"
        )
    rng = random.Random(seed)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    model.train()
    device = next(model.parameters()).device
    losses = []
    order: list[int] = []
    for step in range(steps):
        batch = []
        for _ in range(batch_size):
            if not order:
                order = list(range(len(samples)))
                rng.shuffle(order)
            i = order.pop()
            if i not in cache:
                cache[i] = make_targets(samples[i], image_size, category_ids)
            batch.append(cache[i])
        pixels = torch.stack([b[0] for b in batch]).to(device)
        out = model(pixels)
        loss = model.loss(out, [b[1].to(device) for b in batch], [b[2].to(device) for b in batch])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step + 1, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def evaluate_segmenter(
    model: PerceptionModel,
    root: str | Path,
    *,
    image_size: int,
    split: str = "test",
    top_k: int | None = None,
) -> dict[str, float]:
    """COCO mask AP / AP50 / AP75 of the segmenter's instance predictions (pycocotools' COCOeval), and
    `best_query_iou`: per ground-truth instance the IoU of the best-matching query's mask, averaged. The
    latter ignores classes and scores, so it tells mask quality (what [SEG] decoding can reach) apart
    from classification (what AP also needs)."""
    samples, category_ids = load_instances(root, split)
    model.eval()
    device = next(model.parameters()).device
    results = []
    best_ious: list[float] = []
    preprocess = preprocessor_for(image_size)
    for sample in samples:
        pixels = preprocess(load_image(sample.image)).unsqueeze(0).to(device)
        out = model(pixels)
        geometry = PadGeometry(sample.width, sample.height, image_size)
        logits = geometry.logits_to_image(out.mask_logits[-1][0])
        probs = out.class_logits[-1][0].softmax(-1)[:, :-1]
        scores, labels = probs.max(-1)
        masks = logits > 0
        for ann in sample.annotations:
            truth = torch.from_numpy(decode_mask(ann["segmentation"]).astype(bool)).to(masks.device)
            inter = (masks & truth).flatten(1).sum(1)
            union = (masks | truth).flatten(1).sum(1).clamp(min=1)
            best_ious.append(float((inter / union).max()))
        inside = (logits.sigmoid() * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
        scores = scores * inside
        for q in scores.argsort(descending=True)[: top_k or len(scores)].tolist():
            rle = mask_utils.encode(np.asfortranarray(masks[q].cpu().numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": sample.image_id,
                    "category_id": category_ids[int(labels[q])],
                    "segmentation": rle,
                    "score": float(scores[q]),
                }
            )
    best_query_iou = float(np.mean(best_ious)) if best_ious else 0.0
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "best_query_iou": best_query_iou}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(Path(root) / "annotations" / f"instances_{split}.json"))
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {
        "AP": float(stats[0]),
        "AP50": float(stats[1]),
        "AP75": float(stats[2]),
        "best_query_iou": best_query_iou,
    }
