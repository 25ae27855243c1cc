"""Vision towers: modules that turn a list of images into a list of per-image feature sequences.

The interface and registry live in `base`; each built-in tower is one module that registers itself under
its `vision.type` name when this package is imported. OMG-LLaVA's segmenter tower lives with its design in
`unillava.omg` and registers itself the same way.
"""

from unillava.vision import clip, convnext, mobilenet
from unillava.vision.base import TOWERS, VisionTower, build_vision_tower, register_tower

__all__ = ["TOWERS", "VisionTower", "build_vision_tower", "register_tower", "clip", "convnext", "mobilenet"]
