"""OMG-LLaVA's tower: a frozen universal segmenter turned into pixel-centric and object-centric tokens.

Per image the sequence is `[pixel tokens, separator, object tokens]`:
- pixel tokens: the backbone's last stage pixel-shuffled x2 (space-to-depth), one per 2x2 block
  (1024 px, stride 32 -> 16 x 16 = 256 tokens of 4C channels);
- Perception Prior Embedding (`extra.use_prior`, default on): for each pixel token, a softmax over the
  segmenter's queries of P_q = (0.5 * score_q + 0.5) * sigmoid(mask_q) (resized to the token grid)
  weights the query embeddings (content ++ position, 2D); the result is concatenated to the pixel
  feature, as the released code does, so one projector sees both;
- object tokens (`extra.object_tokens`, default on): the queries that win at least one pixel of the
  argmax-over-queries map of P, in query order, through a learned Linear to the token width, after a
  learned separator. Their number varies per image (at most the query count, or `extra.max_object_tokens`).

Token count policy: the object-token count depends on the image, so the processor asks
`num_tokens_for_image(pixels)`, which runs the frozen segmenter once and caches the result by the pixel
tensor's content (an LRU of `extra.cache_size` images); the model's forward then finds the same memory in
the cache, so the segmenter runs once per image and the count the processor reserved is exactly what the
tower produces. A fixed maximum with padding would waste up to hundreds of LLM positions per image and
need a second mask through the LLM; an exact count costs nothing extra because the segmenter is frozen.
`num_tokens(h, w)` answers only when object tokens are off (the count is then a function of the size).

Trainability: the segmenter is always frozen (`requires_grad_` and `train` leave it alone); the
separator and object projection follow the tower's flag (`train_vision`), so stage 1 trains them with
the projector. `vision.pretrained` names a stage-0 `PerceptionModel` directory; `hf_config` holds its
config (written by `save_pretrained`, so a saved OMG model reloads offline).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unillava.config import VisionConfig
from unillava.errors import ConfigError
from unillava.perception.model import PerceptionModel, PerceptionOutput
from unillava.vision import VisionTower, register_tower

EXTRA_KEYS = ("use_prior", "object_tokens", "max_object_tokens", "cache_size")


def pixel_tokens(backbone_last: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): pixel shuffle x2 (space-to-depth), row-major."""
    return F.pixel_unshuffle(backbone_last, 2).flatten(2).transpose(1, 2)


def perception_prior(output: PerceptionOutput, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pixel prior embedding (B, gh*gw, 2D) and the P map (B, Q, gh*gw) it comes from."""
    score = output.scores()
    masks = F.interpolate(output.mask_logits[-1], size=grid, mode="bilinear", align_corners=False).sigmoid()
    prior_map = ((0.5 * score + 0.5)[..., None, None] * masks).flatten(2)
    weights = prior_map.softmax(dim=1)
    return torch.einsum("bqn,bqc->bnc", weights, output.query_embeddings), prior_map


def winning_queries(prior_map: torch.Tensor, scores: torch.Tensor, limit: int | None) -> list[torch.Tensor]:
    """Per image, ascending query indices that are the argmax of at least one pixel; with `limit`, the
    highest-scoring ones are kept."""
    out = []
    for b in range(prior_map.shape[0]):
        winners = torch.unique(prior_map[b].argmax(dim=0))
        if limit is not None and len(winners) > limit:
            keep = scores[b, winners].argsort(descending=True)[:limit]
            winners = winners[keep].sort().values
        out.append(winners)
    return out


@register_tower("omg")
class OMGTower(VisionTower):
    """Frozen `PerceptionModel` -> [pixel (+prior) tokens, separator, object tokens] per image."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        unknown = sorted(set(config.extra) - set(EXTRA_KEYS) - {"multiple_of", "max_long_side"})
        if unknown:
            raise ConfigError(f"vision.extra: unknown key(s) {', '.join(unknown)}; known: {', '.join(EXTRA_KEYS)}")
        if config.image_mode != "pad":
            raise ConfigError("vision.image_mode: the OMG tower takes `pad` images (the segmenter's frame)")
        self.config = config
        if config.pretrained:
            self.perception = PerceptionModel.from_pretrained(config.pretrained)
        elif config.hf_config is not None:
            self.perception = PerceptionModel(config.hf_config)
        else:
            raise ConfigError("vision: set `pretrained` (a stage-0 perception directory) or `hf_config`")
        extra = config.extra
        self.use_prior = bool(extra.get("use_prior", True))
        self.object_tokens = bool(extra.get("object_tokens", True))
        limit = extra.get("max_object_tokens")
        self.max_object_tokens = None if limit is None else int(limit)
        self.cache_size = int(extra.get("cache_size", 8))
        self.query_dim = 2 * self.perception.hidden_dim
        backbone = self.perception.config.backbone_config
        self.stride = 2 * int(backbone.patch_size) * 2 ** (len(backbone.hidden_sizes) - 1)  # x2: pixel shuffle
        self.hidden_size = 4 * self.perception.backbone_channels + (self.query_dim if self.use_prior else 0)
        self.separator = nn.Parameter(torch.zeros(self.hidden_size))
        self.object_projection = nn.Linear(self.query_dim, self.hidden_size)
        self._cache: OrderedDict[str, PerceptionOutput] = OrderedDict()
        self.perception.requires_grad_(False)
        self.perception.eval()

    # -- trainability: the segmenter never trains here ------------------------------------------------

    def requires_grad_(self, requires_grad: bool = True) -> OMGTower:
        super().requires_grad_(requires_grad)
        self.perception.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> OMGTower:
        super().train(mode)
        self.perception.eval()
        return self

    def hf_config_dict(self) -> dict[str, Any]:
        return self.perception.config_dict()

    # -- perception with a cache ---------------------------------------------------------------------

    @staticmethod
    def _key(pixels: torch.Tensor) -> str:
        data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return hashlib.blake2b(data, digest_size=16).hexdigest() + str(tuple(pixels.shape))

    def perceive(self, pixel_values: torch.Tensor) -> list[PerceptionOutput]:
        """The segmenter's output per image (B, 3, H, W), from the cache where the same pixels were seen."""
        keys = [self._key(p) for p in pixel_values]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            param = next(self.perception.parameters())
            with torch.no_grad():
                batch = pixel_values[todo].to(param.device, param.dtype)
                out = self.perception(batch)
            for j, i in enumerate(todo):
                self._cache[keys[i]] = _slice(out, j)
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        results = []
        for k in keys:
            if k in self._cache:
                self._cache.move_to_end(k)
                results.append(self._cache[k])
            else:  # evicted within this call (cache smaller than the batch): recompute alone
                with torch.no_grad():
                    results.append(self.perception(pixel_values[keys.index(k)][None]))
        return results

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- tokens --------------------------------------------------------------------------------------

    def grid(self, height: int, width: int) -> tuple[int, int]:
        if height % self.stride or width % self.stride:
            raise ConfigError(f"OMG tower: image sides must be multiples of {self.stride}, got {height}x{width}")
        return height // self.stride, width // self.stride

    def num_tokens(self, height: int, width: int) -> int:
        gh, gw = self.grid(height, width)
        if self.object_tokens:
            raise ConfigError("OMG tower: with object tokens the count depends on the image; use num_tokens_for_image")
        return gh * gw

    def num_tokens_for_image(self, pixel_values: torch.Tensor) -> int:
        gh, gw = self.grid(int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        if not self.object_tokens:
            return gh * gw
        return gh * gw + 1 + len(self.object_query_indices(pixel_values[None])[0])

    def object_query_indices(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Per image, the segmenter queries that become object tokens."""
        outputs = self.perceive(pixel_values)
        grid = self.grid(int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        result = []
        for out in outputs:
            _, prior_map = perception_prior(out, grid)
            result += winning_queries(prior_map, out.scores(), self.max_object_tokens)
        return result

    def encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.encode_variable(pixel_values)
        if len({f.shape[0] for f in features}) != 1:
            raise ValueError("OMG tower: images with different object counts cannot be stacked; call forward()")
        return torch.stack(features)

    def encode_variable(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> per image (tokens_i, hidden_size)."""
        grid = self.grid(int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        out = []
        for p in self.perceive(pixel_values):
            tokens = pixel_tokens(p.memory.backbone_last)[0]
            prior, prior_map = perception_prior(p, grid)
            if self.use_prior:
                tokens = torch.cat([tokens, prior[0].to(tokens.dtype)], dim=-1)
            if self.object_tokens:
                winners = winning_queries(prior_map, p.scores(), self.max_object_tokens)[0]
                objects = self.object_projection(p.query_embeddings[0, winners].to(self.separator.dtype))
                tokens = torch.cat([tokens.to(objects.dtype), self.separator[None], objects], dim=0)
            out.append(tokens)
        return out

    def forward(self, images: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Per image features; counts vary with the image, so there is no stacking across images."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return self.encode_variable(images)
        out: list[torch.Tensor] = []
        for image in images:
            out += self.encode_variable(image[None])
        return out

    def memory_for(self, pixel_values: torch.Tensor) -> PerceptionOutput:
        """One image's (3, H, W) cached segmenter output: what [SEG] and visual prompts decode against."""
        return self.perceive(pixel_values[None])[0]


def _slice(out: PerceptionOutput, index: int) -> PerceptionOutput:
    memory = out.memory
    sliced_memory = type(memory)(
        [f[:, index : index + 1] for f in memory.features],
        [p[:, index : index + 1] for p in memory.positions],
        list(memory.sizes),
        memory.mask_features[index : index + 1],
        memory.backbone_last[index : index + 1],
    )
    return PerceptionOutput(
        [c[index : index + 1] for c in out.class_logits],
        [m[index : index + 1] for m in out.mask_logits],
        out.queries[index : index + 1],
        sliced_memory,
        out.query_positions[index : index + 1],
    )
