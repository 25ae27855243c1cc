"""OMG-LLaVA: one frozen universal segmenter feeding the LLM pixel- and object-centric tokens, and
[SEG] tokens decoded back into masks.

- `perception/`: the segmenter (OMG-Seg: image encoder, object queries, mask decoder), its training and
  its prompt encoder for point / box / mask prompts;
- `tower`: the segmenter as a vision tower (pixel tokens, object tokens, perception prior), registered as
  `vision.type: omg`;
- `model`: `OMGLlavaModel`, the core model plus the [SEG] head and its losses, registered for that type;
- `converter`: the released XTuner checkpoints read into this layout.
"""

from unillava.omg.converter import (
    convert_xtuner_checkpoint,
    convert_xtuner_projectors,
    load_xtuner_projectors,
)
from unillava.omg.model import OMG_TOKENS, SEG_TOKEN, OMGLlavaModel, phrases_for_segs
from unillava.omg.tower import OMGTower

__all__ = [
    "OMG_TOKENS",
    "SEG_TOKEN",
    "OMGLlavaModel",
    "OMGTower",
    "convert_xtuner_checkpoint",
    "convert_xtuner_projectors",
    "load_xtuner_projectors",
    "phrases_for_segs",
]
