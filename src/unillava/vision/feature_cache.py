"""A frozen tower's features, computed once per image and reused across epochs, stages and evaluations.

With the tower frozen, its output depends only on its weights, its settings and the preprocessed
pixels, so that is the key: a fingerprint of the tower (weights and config, so a changed tower is a
new cache) and a hash of each image's pixel tensor (so a changed preprocessing is a new entry). The
features are computed lazily inside the model's forward, under whatever autocast the caller runs, so a
cached run computes the same numbers as an uncached one; only the repeated tower passes disappear.

Caches live for the process and are shared by fingerprint: the demo's second stage and its evaluation
reuse the first stage's features although they build new model objects.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from unillava.vision.base import VisionTower

DEFAULT_MAX_BYTES = 4 << 30
_CACHES: dict[str, FeatureCache] = {}


def tower_fingerprint(tower: VisionTower) -> str:
    """Hash of the tower's settings and every parameter and buffer (dtype, shape and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(_config_dict(tower), sort_keys=True, default=str).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _config_dict(tower: VisionTower) -> dict[str, Any]:
    c = tower.config
    return {
        "type": c.type,
        "select_layer": c.select_layer,
        "select_feature": c.select_feature,
        "extra": c.extra,
        "arch": tower.hf_config_dict(),
    }


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


class FeatureCache:
    """Per-image tower outputs keyed by pixel hash; stops adding (but keeps serving) past `max_bytes`."""

    def __init__(self, fingerprint: str, max_bytes: int = DEFAULT_MAX_BYTES):
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.entries: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_tower(cls, tower: VisionTower, max_bytes: int = DEFAULT_MAX_BYTES) -> FeatureCache:
        """The process-wide cache of this exact tower (same weights and settings), created on first use."""
        fingerprint = tower_fingerprint(tower)
        if fingerprint not in _CACHES:
            _CACHES[fingerprint] = cls(fingerprint, max_bytes)
        return _CACHES[fingerprint]

    def __call__(self, tower: VisionTower, images: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """`tower(images)`, computing only the images not seen before (those run as one batch)."""
        images = list(images)
        keys = [self._key(image) for image in images]
        todo = [i for i, key in enumerate(keys) if key not in self.entries]
        computed: dict[int, torch.Tensor] = {}
        if todo:
            with torch.no_grad():
                outputs = tower([images[i] for i in todo])
            for i, feature in zip(todo, outputs, strict=True):
                computed[i] = feature
                size = feature.numel() * feature.element_size()
                if keys[i] not in self.entries and self.bytes + size <= self.max_bytes:
                    self.entries[keys[i]] = feature
                    self.bytes += size
        self.misses += len(todo)
        self.hits += len(images) - len(todo)
        return [computed[i] if i in computed else self.entries[key] for i, key in enumerate(keys)]

    @staticmethod
    def _key(image: torch.Tensor) -> str:
        """Pixels plus the autocast state they would be encoded under: features a bf16 training run
        cached are not what an fp32 evaluation in the same process would compute."""
        device = image.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        digest = hashlib.blake2b(_tensor_bytes(image), digest_size=16)
        digest.update(f"{image.dtype}:{tuple(image.shape)}:{image.device}:{autocast}".encode())
        return digest.hexdigest()

    def stats(self) -> dict[str, Any]:
        return {
            "images": len(self.entries),
            "mib": round(self.bytes / 2**20, 1),
            "hits": self.hits,
            "misses": self.misses,
        }


def clear_feature_caches() -> None:
    """Drop every process-wide cache (tests; a long-lived process that trains many towers)."""
    _CACHES.clear()
