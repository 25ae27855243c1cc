"""A reference conversion of shapes records into OMG-LLaVA training inputs, one record at a time: the
tests compare the training dataset's batched conversion and the model's losses against it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unillava.data.images import load_image
from unillava.data.llava_format import parse_record
from unillava.omg.model import OMGLlavaModel
from unillava.omg.perception.prompts import PromptRegion, mask_targets


@dataclass
class SegBatch:
    """A training batch with its pixel-level targets: `model(**seg.inputs())`."""

    batch: Any
    seg_masks: list[torch.Tensor]
    visual_prompts: list[list[PromptRegion]]

    def inputs(self) -> dict[str, Any]:
        return {
            **self.batch.model_inputs(),
            "seg_masks": self.seg_masks,
            "visual_prompts": self.visual_prompts,
        }


def seg_batch(model: OMGLlavaModel, records: Sequence[Mapping[str, Any]], image_root: str | Path) -> SegBatch:
    """Training inputs from LLaVA-format records as the shapes tasks write them: `masks` (one COCO RLE
    per [SEG], in answer order; refseg, reasonseg, gcg) and `visual_prompts` (one per `<region>`/`<mark>`;
    region tasks), with targets (n, S, S) in the segmenter's input frame."""
    processor = model.processor
    size = model.config.vision.image_size
    encoded, pixel_lists, targets, prompts = [], [], [], []
    for i, record in enumerate(records):
        sample = parse_record(record, source=f"record {i}")
        pictures = [load_image(Path(image_root) / name) for name in sample.images]
        pixels = processor.preprocess_images(pictures)
        encoded.append(processor.encode(sample.messages, pixels))
        pixel_lists.append(pixels)
        rles = record.get("masks") or []
        targets.append(
            mask_targets(rles, pictures[-1].width, pictures[-1].height, size)
            if rles
            else torch.zeros(0, size, size)
        )
        prompts.append(model.prompt_regions(record.get("visual_prompts") or [], pictures))
    return SegBatch(processor.collate(encoded, pixel_lists, padding_side="right"), targets, prompts)
