"""OMG-LLaVA's tower: a frozen universal segmenter turned into pixel-centric and object-centric tokens.

Per image the sequence is `[pixel tokens, separator, object tokens]`:
- pixel tokens: the backbone's last stage pixel-shuffled x2 (space-to-depth), one per 2x2 block
  (1024 px, stride 32 -> 16 x 16 = 256 tokens of 4C channels);
- Perception Prior Embedding (`extra.use_prior`, default on): for each pixel token, a softmax over the
  segmenter's queries of P_q = (0.5 * score_q + 0.5) * sigmoid(mask_q) (mask logits upsampled to the
  image, then resized to the token grid, as released)
  weights the query embeddings (content ++ position, 2D); the result is concatenated to the pixel
  feature, as the released code does, so one projector sees both;
- object tokens (`extra.object_tokens`, default on): the queries that win at least one pixel of the
  argmax-over-queries map of P, in query order, through `query_projection` (2D -> 4C) and `object_mlp`
  (4C -> H -> H) into the LLM's space, after a learned `separator` (an LLM-space vector). Their number
  varies per image (at most the query count, or `extra.max_object_tokens`).

The layout follows the released code's projector so its weights map one to one: the core projector
(`mlp2x_gelu` over 4C + 2D) is `projector.model.model_feat`, `query_projection` / `object_mlp` /
`separator` are `projector.model.query_proj` / `.model` / `.seperate_embed`, and `seg_head` (the [SEG]
text-to-vision MLP, H -> 2D -> 2D) is `projector_text2vision`. The LLM-space parts need the LLM's width,
so `OMGLlavaModel` creates them with `attach_language_model(H, projector)`.

`encode_batch` (so `VisionTower.forward`) gives the sequence exactly as the model splices it, in the LLM's
space (width H, not `hidden_size`): the two kinds of tokens go through different projections (pixel
tokens through the core projector, object tokens through the object path), so there is no single
tower-space sequence one projector could map. The tower therefore keeps a reference to the model's core
projector (not a submodule: its weights stay the model's `projector.*`), and `OMGLlavaModel.encode_images`
does not project again. What the sequence alone cannot say is which object slots are empty (zeros);
`embed` returns that too, for the attention mask.

Token count policy: a fixed maximum with the padding masked out. Each image gets
`grid + 1 + max_object_tokens` slots (`extra.max_object_tokens`, default the query count), so the count
is a function of the image size as the core contract (`num_tokens(h, w)`) wants: the data pipeline plans
lengths and truncation from sizes alone, without decoding images, and a content-dependent count could not
be known there. `embed` also says which slots hold real objects; `OMGLlavaModel` removes the
empty ones from attention and from the position ids (cumulative over the attention mask, which is also
what generation uses), so padding changes nothing the LLM computes and training matches inference. The
cost is sequence length: set `max_object_tokens` below the query count to bound it (the highest-scoring
winning queries are kept). The segmenter's output is cached per image (an LRU of `extra.cache_size`,
keyed by the pixels' content) so the [SEG] decoder reuses the memory the tokens came from.

`extra.object_regularizer` (stage 1 of the paper: 10.0) weights OMGLlavaModel's round-trip loss that
keeps object tokens decodable by the [SEG] head.

Trainability: the segmenter is always frozen (`requires_grad_` and `train` leave it alone); the
OMG-LLaVA projectors held here (object path, separator, [SEG] head) follow the tower's flag
(`train_vision`), so the generic trainer trains them with the core projector. `vision.pretrained` names a stage-0 `PerceptionModel` directory; `hf_config` holds its
config (written by `save_pretrained`, so a saved OMG model reloads offline).
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unillava.config import VisionConfig
from unillava.errors import ConfigError
from unillava.omg.perception.model import PerceptionModel, PerceptionOutput
from unillava.vision.base import VisionTower, register_tower

EXTRA_KEYS = (
    "use_prior",
    "object_tokens",
    "max_object_tokens",
    "cache_size",
    "object_regularizer",
    "seg_decoder",
)


def pixel_tokens(backbone_last: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): space-to-depth x2, tokens row-major. Channels are ordered
    (row offset, column offset, channel) as in the released code, so its projector weights apply as is."""
    b, c, h, w = backbone_last.shape
    blocks = backbone_last.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return blocks.flatten(1, 3).flatten(2).transpose(1, 2)


def _linear_resize_weights(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) weights of torch's 1-D linear resize (align_corners=False); bilinear is this
    along each axis."""
    unit_signals = torch.eye(size_in)[:, None, :]
    return F.interpolate(unit_signals, size=size_out, mode="linear", align_corners=False)[:, 0, :].T


@functools.lru_cache(maxsize=32)
def _prior_axis(coarse: int, image: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For one axis: logits -> the image pixels the grid reads (U), and those pixels -> grid (D); built
    once per geometry (CPU, read-only) instead of on every forward."""
    down = _linear_resize_weights(image, grid)
    read = down.abs().sum(0).nonzero().flatten()
    return _linear_resize_weights(coarse, image)[read], down[:, read]


def perception_prior(
    output: PerceptionOutput, grid: tuple[int, int], image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pixel prior embedding (B, gh*gw, 2D) and the P map (B, Q, gh*gw) it comes from.

    As released: mask logits upsampled to the input image, sigmoid, times the smoothed score, resized to
    the token grid, softmax over queries. Only the image pixels the grid resize reads are computed, so
    the full-resolution (Q, H, W) map is never built.
    """
    logits = output.mask_logits[-1].float()
    up_h, down_h = (m.to(logits.device) for m in _prior_axis(logits.shape[-2], image_size[0], grid[0]))
    up_w, down_w = (m.to(logits.device) for m in _prior_axis(logits.shape[-1], image_size[1], grid[1]))
    probs = torch.einsum("ih,bqhw,jw->bqij", up_h, logits, up_w).sigmoid()
    probs = torch.einsum("gi,bqij,kj->bqgk", down_h, probs, down_w)
    score = output.scores().float()
    prior_map = ((0.5 * score + 0.5)[..., None, None] * probs).flatten(2)
    weights = prior_map.softmax(dim=1)
    embeddings = output.query_embeddings
    return torch.einsum("bqn,bqc->bnc", weights, embeddings.float()).to(embeddings.dtype), prior_map


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


@dataclass
class ImageParts:
    """One image's tower outputs before the LLM: pixel (+prior) features (grid, hidden_size) for the core
    projector, and the object queries' embeddings (N, 2D)."""

    pixels: torch.Tensor
    objects: torch.Tensor


@register_tower("omg")
class OMGTower(VisionTower):
    """Frozen `PerceptionModel` -> [pixel (+prior) tokens, separator, object tokens] per image."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        unknown = sorted(set(config.extra) - set(EXTRA_KEYS) - {"multiple_of", "max_long_side"})
        if unknown:
            raise ConfigError(
                f"vision.extra: unknown key(s) {', '.join(unknown)}; known: {', '.join(EXTRA_KEYS)}"
            )
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
        self.object_regularizer = float(extra.get("object_regularizer", 0.0))
        seg_decoder = extra.get("seg_decoder", "frozen")
        if seg_decoder not in ("frozen", "trainable"):
            raise ConfigError(f"vision.extra.seg_decoder: 'frozen' or 'trainable', got {seg_decoder!r}")
        # The paper's optional task-specific decoder: a copy of the segmenter's transformer decoder that
        # only [SEG] queries run through, so mask training can adapt it while object tokens, visual
        # prompts and the segmenter itself keep the frozen original.
        self.seg_decoder = (
            copy.deepcopy(self.perception.model.transformer_module.decoder)
            if seg_decoder == "trainable"
            else None
        )
        self.query_dim = 2 * self.perception.hidden_dim
        backbone = self.perception.config.backbone_config
        self.stride = (
            2 * int(backbone.patch_size) * 2 ** (len(backbone.hidden_sizes) - 1)
        )  # x2: pixel shuffle
        pixel_width = 4 * self.perception.backbone_channels
        self.hidden_size = pixel_width + (self.query_dim if self.use_prior else 0)
        self.query_projection = nn.Linear(self.query_dim, pixel_width)
        self.text_hidden: int | None = None
        self._projector: nn.Module | None = None
        self._cache: OrderedDict[str, PerceptionOutput] = OrderedDict()
        self.perception.requires_grad_(False)
        self.perception.eval()

    def attach_language_model(self, text_hidden: int, projector: nn.Module | None = None) -> None:
        """Create the LLM-space parts (object MLP, separator, [SEG] head) for an LLM of width `text_hidden`;
        they take the tower's current trainability. `projector` (the model's core projector) is what
        `encode_batch` maps pixel tokens with; it is held by reference, outside the tower's modules."""
        if projector is not None:
            object.__setattr__(self, "_projector", projector)  # not registered: no vision_tower.* copy
        if self.text_hidden == text_hidden:
            return
        trainable = self.query_projection.weight.requires_grad
        reference = self.query_projection.weight
        self.object_mlp = nn.Sequential(
            nn.Linear(self.query_projection.out_features, text_hidden),
            nn.GELU(),
            nn.Linear(text_hidden, text_hidden),
        ).to(reference.device, reference.dtype)
        self.separator = nn.Parameter(
            torch.zeros(text_hidden, device=reference.device, dtype=reference.dtype)
        )
        self.seg_head = nn.Sequential(
            nn.Linear(text_hidden, self.query_dim), nn.GELU(), nn.Linear(self.query_dim, self.query_dim)
        ).to(reference.device, reference.dtype)
        self.text_hidden = text_hidden
        self.requires_grad_(trainable)

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
        fresh: dict[str, PerceptionOutput] = {}
        if todo:
            param = next(self.perception.parameters())
            with torch.no_grad():
                out = self.perception(pixel_values[todo].to(param.device, param.dtype))
            for j, i in enumerate(todo):
                fresh[keys[i]] = self._cache[keys[i]] = _slice(out, j)
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        results = []
        for k in keys:
            if k in self._cache:
                self._cache.move_to_end(k)
            results.append(self._cache.get(k) or fresh[k])
        return results

    def clear_cache(self) -> None:
        self._cache.clear()

    def memory_for(self, pixel_values: torch.Tensor) -> PerceptionOutput:
        """One image's (3, H, W) cached segmenter output: what [SEG] and visual prompts decode against."""
        return self.perceive(pixel_values[None])[0]

    # -- tokens --------------------------------------------------------------------------------------

    def grid(self, height: int, width: int) -> tuple[int, int]:
        if height % self.stride or width % self.stride:
            raise ConfigError(
                f"OMG tower: image sides must be multiples of {self.stride}, got {height}x{width}"
            )
        return height // self.stride, width // self.stride

    @property
    def object_slots(self) -> int:
        """Object-token slots per image (0 with object tokens off)."""
        if not self.object_tokens:
            return 0
        return self.max_object_tokens or int(self.perception.config.num_queries)

    def num_tokens(self, height: int, width: int) -> int:
        gh, gw = self.grid(height, width)
        return gh * gw + (1 + self.object_slots if self.object_tokens else 0)

    def encode_parts(self, pixel_values: torch.Tensor) -> list[ImageParts]:
        """(B, 3, H, W) -> per image the pixel (+prior) features and the object queries' embeddings."""
        size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        grid = self.grid(*size)
        parts = []
        for p in self.perceive(pixel_values):
            pixels = pixel_tokens(p.memory.backbone_last)[0]
            prior, prior_map = perception_prior(p, grid, size)
            if self.use_prior:
                pixels = torch.cat([pixels, prior[0].to(pixels.dtype)], dim=-1)
            objects = pixels.new_zeros(0, self.query_dim)
            if self.object_tokens:
                winners = winning_queries(prior_map, p.scores(), self.object_slots)[0]
                objects = p.query_embeddings[0, winners]
            parts.append(ImageParts(pixels, objects))
        return parts

    def object_query_indices(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Per image, the segmenter queries that become object tokens."""
        size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        grid = self.grid(*size)
        result = []
        for out in self.perceive(pixel_values):
            _, prior_map = perception_prior(out, grid, size)
            result += winning_queries(prior_map, out.scores(), self.object_slots)
        return result

    def project_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Decoder query embeddings (K, 2D) -> LLM embeddings (K, H): object tokens and visual prompts."""
        weight = self.query_projection.weight
        return self.object_mlp(self.query_projection(queries.to(weight.device, weight.dtype)))

    def embed(
        self, images: list[torch.Tensor] | torch.Tensor, projector: nn.Module
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image, the LLM-space sequence (num_tokens, H) and which slots are real (False = an empty
        object slot). `projector` is the core projector, which maps the pixel (+prior) features."""
        if self.text_hidden is None:
            raise ConfigError("OMG tower: attach_language_model() first (OMGLlavaModel does)")
        batches = (
            [images] if isinstance(images, torch.Tensor) and images.dim() == 4 else [i[None] for i in images]
        )
        features, valid = [], []
        for batch in batches:
            for part in self.encode_parts(batch):
                pixels = projector(part.pixels.to(self.query_projection.weight.dtype))
                ok = torch.ones(pixels.shape[0], dtype=torch.bool, device=pixels.device)
                if self.object_tokens:
                    objects = self.project_queries(part.objects).to(pixels.dtype)
                    padding = pixels.new_zeros(self.object_slots - len(objects), pixels.shape[-1])
                    pixels = torch.cat([pixels, self.separator[None].to(pixels.dtype), objects, padding])
                    ok = torch.cat([ok, ok.new_ones(1 + len(objects)), ok.new_zeros(len(padding))])
                features.append(pixels)
                valid.append(ok)
        return features, valid

    def encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_tokens, text_hidden): per image what the model splices (projected pixel
        tokens, separator, object tokens, zeros in empty slots), one image at a time as the model embeds."""
        if self._projector is None:
            raise ConfigError("OMG tower: attach_language_model(H, projector) first (OMGLlavaModel does)")
        features, _ = self.embed(list(pixel_values), self._projector)
        return torch.stack(features)


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
