"""The pixel-level perception model behind OMG-LLaVA: a Mask2Former universal segmenter on ConvNeXt.

`PerceptionModel` encodes an image once into a cacheable `PerceptionMemory` and decodes any queries
against it (its own learned queries, [SEG] queries from the LLM, region-restricted visual prompts);
`train_segmenter` / `evaluate_segmenter` are stage 0 (COCO-format instances, mask AP via pycocotools).
"""

from unillava.omg.perception.geometry import PadGeometry
from unillava.omg.perception.model import (
    DecodeOutput,
    PerceptionMemory,
    PerceptionModel,
    PerceptionOutput,
    tiny_perception_config,
)
from unillava.omg.perception.prompts import PromptRegion, encode_prompts, prompt_region
from unillava.omg.perception.train import evaluate_segmenter, load_instances, train_segmenter

__all__ = [
    "DecodeOutput",
    "PadGeometry",
    "PerceptionMemory",
    "PerceptionModel",
    "PerceptionOutput",
    "PromptRegion",
    "encode_prompts",
    "evaluate_segmenter",
    "load_instances",
    "prompt_region",
    "tiny_perception_config",
    "train_segmenter",
]
