"""Released OMG-LLaVA weights -> a unillava model directory (`convert_xtuner_checkpoint`).

OMG-LLaVA is published as the layouts of the code that trained it, spread over four sources:

- the XTuner `.pth`: `OMG_LLaVA.state_dict()` (omg_llava/model/omg_llava.py in the OMG-Seg repository),
  which keeps only trained parts: the projectors, the LLM's token embeddings and output head, and the
  LLM's LoRA deltas as XTuner saves them (peft names, adapter name kept:
  `llm.base_model.model.model.layers.0.attention.wqkv.lora_A.default.weight`);
- the OMG-Seg segmenter (`omg_seg_convl.pth`, an mmdet state dict): `backbone.*`, the open_clip
  ConvNeXt-L trunk as OMG-Seg wraps it (`stem`, `layer1..4` = timm `stages.0..3`), and `panoptic_head.*`
  (`Mask2FormerVideoSemSamHead`: an `MSDeformAttnPixelDecoder`, a `Mask2FormerTransformerDecoder`,
  learned queries, `mask_embed`, and the open-vocabulary class head `cls_proj` / `mask_pooling_proj`);
- the CLIP text embeddings of the segmenter's classes (`convnext_large_d_320_CocoPanopticOVDataset.pth`,
  a (classes, prototypes, dim) tensor; OMG-Seg loads it into a buffer, so the segmenter file lacks it);
- the base LLM, InternLM2-Chat-7B: a transformers directory whose modeling code is remote.

Everything is converted to what unillava builds without remote code: the segmenter to a
`PerceptionModel` (transformers' Mask2Former parts on a ConvNeXt backbone, plus OMG-Seg's class head and
raw backbone features, `perception/omg_seg.py`), InternLM2 to `LlamaForCausalLM` (the packed `wqkv`
split per KV group, LoRA merged into the weights), its tokenizer to a plain `tokenizers` tokenizer.
Each released key is consumed, or listed in the result with the reason it is not (never silently
dropped); a missing weight is a `CheckpointError` naming the file and the released key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from tokenizers import Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from torch import Tensor
from transformers import AddedToken, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from unillava.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from unillava.errors import CheckpointError, ConfigError
from unillava.llm import build_language_model_from_config
from unillava.modeling import model_class_for
from unillava.omg.model import OMGLlavaModel
from unillava.vision import build_vision_tower
from unillava.vision.convnext import convert_timm_convnext
from unillava.weights import check_state_dict, key_list, read_state_dict

# OMG-LLaVA's image processor (its config): CLIP statistics, rounded as released; 1024 px padded squares.
OMG_IMAGE_MEAN = [0.4814, 0.4578, 0.4082]
OMG_IMAGE_STD = [0.2686, 0.2613, 0.2757]
# The tokens OMG-LLaVA adds, in its order: the first four get embedding rows (the LLM is resized after
# them); `<mark>` is added after the resize and never looked up (its position is replaced by a feature).
RELEASED_TOKENS = ("[SEG]", "<p>", "</p>", "<region>")
LATE_TOKENS = ("<mark>",)
# XTuner's `internlm2_chat` template, for a tokenizer config without a chat template.
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
REPORT_NAME = "xtuner_conversion.json"

Transform = Callable[[Tensor], tuple[Tensor, ...]]


def _same(tensor: Tensor) -> tuple[Tensor, ...]:
    return (tensor,)


def _thirds(tensor: Tensor) -> tuple[Tensor, ...]:
    """nn.MultiheadAttention's packed in-projection -> q, k, v."""
    return tuple(tensor.chunk(3, dim=0))


@dataclass
class KeyMap:
    """Released key -> our key(s), generated from the architecture found in the checkpoint, so that a
    missing weight is named as the released file names it."""

    entries: dict[str, tuple[tuple[str, ...], Transform]] = field(default_factory=dict)

    def add(self, source: str, target: str | tuple[str, ...], transform: Transform = _same) -> None:
        self.entries[source] = ((target,) if isinstance(target, str) else target, transform)

    def linear(self, source: str, target: str) -> None:
        """A module with weight and bias (Linear, LayerNorm, GroupNorm, Conv2d)."""
        for name in ("weight", "bias"):
            self.add(f"{source}.{name}", f"{target}.{name}")

    def check(self, state: Mapping[str, Tensor], source: str) -> None:
        """A CheckpointError naming `source` and the released keys it lacks."""
        present = {k: state[k] for k in self.entries if k in state}
        check_state_dict({k: state.get(k, torch.empty(0)) for k in self.entries}, present, source)

    def apply(self, state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
        """Our tensors (checked first, as `check`)."""
        self.check(state, source)
        out: dict[str, Tensor] = {}
        for key, (targets, transform) in self.entries.items():
            out.update(zip(targets, transform(state[key]), strict=True))
        return out


def _count(keys: list[str], pattern: str) -> int:
    """1 + the largest index that `pattern`'s group matches among `keys` (0 when none does)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _reasons(keys: list[str], rules: tuple[tuple[str, str], ...], default: str) -> dict[str, str]:
    """Why each of `keys` is not loaded: the first matching rule's reason, else `default`."""
    out = {}
    for key in keys:
        out[key] = next((why for pattern, why in rules if re.match(pattern, key)), default)
    return out


# -- the segmenter ------------------------------------------------------------------------------------

_PIXEL = "panoptic_head.pixel_decoder."
_OUR_PIXEL = "model.pixel_level_module.decoder."
_OUR_BACKBONE = "model.pixel_level_module.encoder."
_OUR_DECODER = "model.transformer_module.decoder."
_SEGMENTER_UNUSED = (
    (
        r"^backbone\.head\.",
        "CLIP image head: OMG-Seg uses it only to re-score classes with CLIP features "
        "(open_voc_inference), which OMG-LLaVA never runs",
    ),
    (
        r"^panoptic_head\.iou_embed\.",
        "IoU head: OMG-Seg's predict() drops its output and OMG-LLaVA never reads it",
    ),
)


def add_decoder_keys(keymap: KeyMap, source: str, mask_source: str, target: str, layers: int) -> None:
    """mmdet `Mask2FormerTransformerDecoder` (+ the head's `mask_embed`) -> transformers'
    `Mask2FormerMaskedAttentionDecoder`. Both run cross-attention, self-attention, FFN, each followed by
    its norm (`norms.0..2`); mmcv's packed self-attention in-projection is split into q, k, v."""
    for i in range(layers):
        src, dst = f"{source}layers.{i}.", f"{target}layers.{i}."
        keymap.add(f"{src}cross_attn.attn.in_proj_weight", f"{dst}cross_attn.in_proj_weight")
        keymap.add(f"{src}cross_attn.attn.in_proj_bias", f"{dst}cross_attn.in_proj_bias")
        keymap.linear(f"{src}cross_attn.attn.out_proj", f"{dst}cross_attn.out_proj")
        for name in ("weight", "bias"):
            keymap.add(
                f"{src}self_attn.attn.in_proj_{name}",
                tuple(f"{dst}self_attn.{p}_proj.{name}" for p in "qkv"),
                _thirds,
            )
        keymap.linear(f"{src}self_attn.attn.out_proj", f"{dst}self_attn.out_proj")
        keymap.linear(f"{src}norms.0", f"{dst}cross_attn_layer_norm")
        keymap.linear(f"{src}norms.1", f"{dst}self_attn_layer_norm")
        keymap.linear(f"{src}norms.2", f"{dst}final_layer_norm")
        keymap.linear(f"{src}ffn.layers.0.0", f"{dst}fc1")
        keymap.linear(f"{src}ffn.layers.1", f"{dst}fc2")
    keymap.linear(f"{source}post_norm", f"{target}layernorm")
    for index, layer in enumerate((0, 2, 4)):
        keymap.linear(f"{mask_source}{layer}", f"{target}mask_predictor.mask_embedder.{index}.0")


def _backbone(
    segmenter: Mapping[str, Tensor],
    seg_source: str,
    backbone: Mapping[str, Tensor] | None,
    backbone_source: str,
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, dict[str, str]]]:
    """The ConvNeXt trunk: from the segmenter's `backbone.*` (OMG-Seg's `layerN` = timm `stages.N-1`) or,
    when it has none, from an open_clip / timm checkpoint. Returns its config, our keys, and the unused."""
    own = sorted(k for k in segmenter if k.startswith("backbone."))
    unused: dict[str, dict[str, str]] = {}
    if own and backbone is not None:
        raise CheckpointError(
            f"{seg_source} carries its own backbone; do not pass a separate one ({backbone_source})"
        )
    if own:
        trunk, source, prefix = {}, seg_source, ""
        head = [k for k in own if k.startswith("backbone.head.")]
        unused[seg_source] = _reasons(head, _SEGMENTER_UNUSED, "")
        for key in own:
            if key not in unused[seg_source]:
                name = re.sub(
                    r"^layer(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", key[len("backbone.") :]
                )
                trunk[name] = segmenter[key]
    elif backbone is not None:  # an open_clip (`visual.trunk.`) or timm file
        trunk, source = dict(backbone), backbone_source
        prefix = next((k[: -len("stem.0.weight")] for k in trunk if k.endswith("stem.0.weight")), "")
        rest = [k for k in trunk if not k.startswith(prefix)]
        unused[source] = dict.fromkeys(rest, "not the ConvNeXt trunk (CLIP text tower or projection head)")
    else:
        raise CheckpointError(
            f"{seg_source}: no `backbone.*` weights; pass the open_clip ConvNeXt checkpoint "
            "it was trained on (backbone=...)"
        )
    try:
        config, state = convert_timm_convnext(trunk, prefix=prefix)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: backbone: {err}") from None
    for key in [k for k in state if k.startswith("layernorm.")]:  # timm's head.norm: a pooled-output norm
        del state[key]
        unused.setdefault(source, {})[f"{prefix}head.norm.{key.split('.')[-1]}"] = (
            "the ConvNeXt's pooled-output norm: Mask2Former reads the stage outputs"
        )
    backbone_config = {
        "model_type": "convnext",
        "num_channels": config.num_channels,
        "patch_size": config.patch_size,
        "depths": list(config.depths),
        "hidden_sizes": list(config.hidden_sizes),
        "layer_scale_init_value": config.layer_scale_init_value,
        "layer_norm_eps": 1e-6,
        "out_features": [f"stage{i + 1}" for i in range(len(config.depths))],
    }
    return backbone_config, {_OUR_BACKBONE + k: v for k, v in state.items()}, unused


def convert_segmenter(
    segmenter: Mapping[str, Tensor],
    source: str,
    class_embeddings: Tensor | None = None,
    backbone: Mapping[str, Tensor] | None = None,
    backbone_source: str = "backbone",
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, dict[str, str]]]:
    """An OMG-Seg (mmdet Mask2Former) state dict -> (perception config, `PerceptionModel` state, unused keys
    per file with the reason). The architecture is read off the keys and shapes.

    Class head rule: a closed-set `panoptic_head.cls_embed` Linear loads as the Linear head; OMG-Seg's
    open-vocabulary head (`cls_proj`, `mask_pooling_proj`) loads as `OpenVocabClassHead`, which needs the
    class text embeddings (`class_embeddings`, (classes, [prototypes,] dim)); without them that is an error,
    since OMG-LLaVA's perception prior is built from the class scores.
    """
    keys = sorted(segmenter)
    if not any(k.startswith("panoptic_head.") for k in keys):
        raise CheckpointError(
            f"{source}: no `panoptic_head.*` keys; not an OMG-Seg (mmdet Mask2Former) checkpoint"
        )
    backbone_config, state, unused = _backbone(segmenter, source, backbone, backbone_source)

    def shape(key: str) -> tuple[int, ...]:
        if key not in segmenter:
            raise CheckpointError(f"{source}: missing key {key}")
        return tuple(segmenter[key].shape)

    levels = _count(keys, r"^panoptic_head\.pixel_decoder\.input_convs\.(\d+)\.")
    fpn = _count(keys, r"^panoptic_head\.pixel_decoder\.lateral_convs\.(\d+)\.")
    if (levels, fpn) != (3, 1):
        raise CheckpointError(
            f"{source}: the pixel decoder has {levels} encoder level(s) and {fpn} FPN level(s); "
            "transformers' Mask2Former has 3 and 1"
        )
    encoder_layers = _count(keys, r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.")
    decoder_layers = _count(keys, r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.")
    heads, rest = divmod(shape(f"{_PIXEL}encoder.layers.0.self_attn.attention_weights.weight")[0], 3 * 4)
    if rest or not heads:
        raise CheckpointError(
            f"{source}: deformable attention is not 3 levels x 4 points (transformers' fixed layout)"
        )
    num_queries, hidden_dim = shape("panoptic_head.query_feat.weight")
    enforce_projection = "panoptic_head.decoder_input_projs.0.weight" in segmenter
    config: dict[str, Any] = {
        "backbone_config": backbone_config,
        "feature_size": shape(f"{_PIXEL}input_convs.0.conv.weight")[0],
        "mask_feature_size": shape(f"{_PIXEL}mask_feature.weight")[0],
        "hidden_dim": hidden_dim,
        "encoder_feedforward_dim": shape(f"{_PIXEL}encoder.layers.0.ffn.layers.0.0.weight")[0],
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers + 1,  # transformers counts the prediction before the first layer
        "num_attention_heads": heads,
        "dim_feedforward": shape("panoptic_head.transformer_decoder.layers.0.ffn.layers.0.0.weight")[0],
        "num_queries": num_queries,
        "enforce_input_projection": enforce_projection,
        "common_stride": 4,
        "feature_strides": [4, 8, 16, 32],
        "backbone_feature_norm": False,
        "query_states": "raw",
    }

    keymap = KeyMap()
    for i in range(levels):
        keymap.linear(f"{_PIXEL}input_convs.{i}.conv", f"{_OUR_PIXEL}input_projections.{i}.0")
        keymap.linear(f"{_PIXEL}input_convs.{i}.gn", f"{_OUR_PIXEL}input_projections.{i}.1")
    for j in range(encoder_layers):
        src, dst = f"{_PIXEL}encoder.layers.{j}.", f"{_OUR_PIXEL}encoder.layers.{j}."
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            keymap.linear(f"{src}self_attn.{name}", f"{dst}self_attn.{name}")
        keymap.linear(f"{src}norms.0", f"{dst}self_attn_layer_norm")
        keymap.linear(f"{src}norms.1", f"{dst}final_layer_norm")
        keymap.linear(f"{src}ffn.layers.0.0", f"{dst}fc1")
        keymap.linear(f"{src}ffn.layers.1", f"{dst}fc2")
    keymap.add(f"{_PIXEL}level_encoding.weight", f"{_OUR_PIXEL}level_embed")
    keymap.add(f"{_PIXEL}lateral_convs.0.conv.weight", f"{_OUR_PIXEL}adapter_1.0.weight")
    keymap.linear(f"{_PIXEL}lateral_convs.0.gn", f"{_OUR_PIXEL}adapter_1.1")
    keymap.add(f"{_PIXEL}output_convs.0.conv.weight", f"{_OUR_PIXEL}layer_1.0.weight")
    keymap.linear(f"{_PIXEL}output_convs.0.gn", f"{_OUR_PIXEL}layer_1.1")
    keymap.linear(f"{_PIXEL}mask_feature", f"{_OUR_PIXEL}mask_projection")
    add_decoder_keys(
        keymap,
        "panoptic_head.transformer_decoder.",
        "panoptic_head.mask_embed.",
        _OUR_DECODER,
        decoder_layers,
    )
    keymap.add("panoptic_head.query_feat.weight", "model.transformer_module.queries_features.weight")
    keymap.add("panoptic_head.query_embed.weight", "model.transformer_module.queries_embedder.weight")
    keymap.add("panoptic_head.level_embed.weight", "model.transformer_module.level_embed.weight")
    if enforce_projection:
        for i in range(levels):
            keymap.linear(
                f"panoptic_head.decoder_input_projs.{i}", f"model.transformer_module.input_projections.{i}"
            )

    if "panoptic_head.cls_embed.weight" in segmenter:
        config.update(class_head="linear", num_labels=shape("panoptic_head.cls_embed.weight")[0] - 1)
        keymap.linear("panoptic_head.cls_embed", "class_predictor")
    else:
        embed_dim = shape("panoptic_head.cls_proj.4.weight")[0]
        if class_embeddings is None:
            raise CheckpointError(
                f"{source}: OMG-Seg's class head scores queries against CLIP text embeddings of its class names, "
                "which the segmenter file does not hold: pass class_embeddings= (the released "
                "convnext_large_d_320_CocoPanopticOVDataset.pth)"
            )
        embeddings = class_embeddings if class_embeddings.dim() == 3 else class_embeddings[:, None]
        if embeddings.dim() != 3 or embeddings.shape[-1] != embed_dim:
            raise CheckpointError(
                f"class embeddings {tuple(class_embeddings.shape)}: expected (classes, "
                f"[prototypes,] {embed_dim}) to match {source}'s cls_proj"
            )
        background = embeddings.new_zeros(1, *embeddings.shape[1:])  # OMG-Seg's background: logit 0
        state["class_predictor.text_embeddings"] = torch.cat([embeddings, background]).float()
        config.update(
            class_head="open_vocab",
            num_labels=int(embeddings.shape[0]),
            class_embed_dim=embed_dim,
            class_prototypes=int(embeddings.shape[1]),
        )
        for index in (0, 2, 4):
            keymap.linear(f"panoptic_head.cls_proj.{index}", f"class_predictor.cls_proj.{index}")
        for index in (0, 1):
            keymap.linear(
                f"panoptic_head.mask_pooling_proj.{index}", f"class_predictor.mask_pooling_proj.{index}"
            )

    if "panoptic_head.pos_linear.weight" in segmenter:  # OMG-Seg's own visual-prompt queries
        config.update(
            prompt_queries="omg_seg",
            prompt_query_labels=shape("panoptic_head.pb_embedding.weight")[0],
            prompt_mask_tokens=shape("panoptic_head.mask_tokens.weight")[0],
        )
        keymap.add("panoptic_head.pb_embedding.weight", "prompt_query.pb_embedding.weight")
        keymap.add("panoptic_head.mask_tokens.weight", "prompt_query.mask_tokens.weight")
        keymap.linear("panoptic_head.pos_linear", "prompt_query.pos_linear")

    state.update(keymap.apply(segmenter, source))
    left = [k for k in keys if k not in keymap.entries and not k.startswith("backbone.")]
    unused.setdefault(source, {}).update(
        _reasons(left, _SEGMENTER_UNUSED, "unknown key: no counterpart in unillava's perception model")
    )
    return config, state, {k: v for k, v in unused.items() if v}


def read_class_embeddings(path: str | Path) -> Tensor:
    """OMG-Seg's class text embeddings file: one tensor (or a mapping holding exactly one)."""
    path = Path(path).expanduser()
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: class embeddings not found") from None
    except Exception as err:  # torch raises many types for a bad pickle; all mean the same here
        raise CheckpointError(f"{path}: cannot read as a torch file ({err})") from None
    if isinstance(loaded, Mapping):
        tensors = [v for v in loaded.values() if isinstance(v, Tensor)]
        loaded = tensors[0] if len(tensors) == 1 else None
    if not isinstance(loaded, Tensor):
        raise CheckpointError(
            f"{path}: expected one (classes, [prototypes,] dim) tensor of class text embeddings"
        )
    return loaded.float()


# -- the LLM: InternLM2 (+ XTuner LoRA) -> Llama --------------------------------------------------------

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_INTERNLM2_LAYER = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def llm_key(key: str) -> str:
    """An XTuner LLM key in InternLM2's own names: without `llm.`, peft's `base_model.model.` and
    `.base_layer` (the frozen weight of a LoRA-wrapped Linear)."""
    key = key.removeprefix("llm.").removeprefix("base_model.model.")
    return key.replace(".base_layer.", ".")


def split_wqkv(packed: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """InternLM2's `wqkv` (weight or bias) -> q, k, v. Rows are packed per KV head h as
    [q_(h,0) .. q_(h,g-1), k_h, v_h], each head_dim long (g = query heads per KV head), which is what
    its attention unpacks with `rearrange(..., "b q (h gs d) -> b q h gs d")`; query head h*g+j then
    shares KV head h, as Llama's grouped-query attention expects."""
    groups = num_heads // num_kv_heads
    head_dim = packed.shape[0] // (num_kv_heads * (groups + 2))
    rest = tuple(packed.shape[1:])
    blocks = packed.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    return (
        blocks[:, :groups].reshape(num_heads * head_dim, *rest),
        blocks[:, -2].reshape(num_kv_heads * head_dim, *rest),
        blocks[:, -1].reshape(num_kv_heads * head_dim, *rest),
    )


def merge_lora(
    weights: dict[str, Tensor], lora: Mapping[str, Tensor], alpha: float, source: str
) -> list[str]:
    """Add peft LoRA deltas (alpha / r) * B @ A into `weights` (InternLM2 names, in place); the rank is
    read off the shapes, alpha is not stored by peft. Returns one note per distinct rank."""
    pairs: dict[str, dict[str, Tensor]] = {}
    adapters = set()
    for key, tensor in lora.items():
        match = _LORA.match(key)
        if match is None:
            raise CheckpointError(
                f"{source}: {key}: a LoRA tensor other than lora_A / lora_B (DoRA, embedding "
                "LoRA) cannot be merged"
            )
        adapters.add(match.group("adapter"))
        pairs.setdefault(match.group("module"), {})[match.group("part")] = tensor
    if len(adapters) > 1:
        raise CheckpointError(f"{source}: LoRA deltas of several adapters {sorted(map(str, adapters))}")
    ranks = set()
    for module, parts in sorted(pairs.items()):
        target = f"{module}.weight"
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"{source}: {module} has lora_{''.join(parts)} without its pair")
        if target not in weights:
            raise CheckpointError(f"{source}: LoRA for {module}, which the base LLM does not have")
        down, up = parts["A"].float(), parts["B"].float()
        rank = down.shape[0]
        ranks.add(rank)
        base = weights[target]
        weights[target] = (base.float() + (alpha / rank) * (up @ down)).to(base.dtype)
    return [
        f"LoRA merged into {len(pairs)} module(s): r={r}, alpha={alpha:g}, scale {alpha / r:g}"
        for r in sorted(ranks)
    ]


def llama_config(internlm2: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """InternLM2's config.json -> a LlamaConfig dict (same RMSNorm, rotary, SwiGLU; rope scaling carried)."""
    heads = int(internlm2["num_attention_heads"])
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(internlm2.get("rope_theta", 10000.0))}
    scaling = internlm2.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in ("dynamic", "linear"):
            raise CheckpointError(f"InternLM2 rope_scaling {scaling}: only dynamic and linear are converted")
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": int(internlm2["hidden_size"]),
        "intermediate_size": int(internlm2["intermediate_size"]),
        "num_hidden_layers": int(internlm2["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(internlm2.get("num_key_value_heads") or heads),
        "hidden_act": internlm2.get("hidden_act", "silu"),
        "max_position_embeddings": int(internlm2.get("max_position_embeddings", 2048)),
        "rms_norm_eps": float(internlm2.get("rms_norm_eps", 1e-6)),
        "rope_parameters": rope,
        "attention_bias": bool(internlm2.get("bias", False)),
        "mlp_bias": False,
        "tie_word_embeddings": bool(internlm2.get("tie_word_embeddings", False)),
        "bos_token_id": internlm2.get("bos_token_id", 1),
        "eos_token_id": internlm2.get("eos_token_id", 2),
        "pad_token_id": internlm2.get("pad_token_id"),
    }


def internlm2_keymap(config: Mapping[str, Any]) -> KeyMap:
    """InternLM2 weight names -> LlamaForCausalLM's."""
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)

    def qkv(tensor: Tensor) -> tuple[Tensor, ...]:
        return split_wqkv(tensor, heads, kv_heads)

    keymap = KeyMap()
    keymap.add("model.tok_embeddings.weight", "model.embed_tokens.weight")
    for i in range(int(config["num_hidden_layers"])):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        names = ("weight", "bias") if config.get("bias") else ("weight",)
        for name in names:
            keymap.add(
                f"{src}attention.wqkv.{name}", tuple(f"{dst}self_attn.{p}_proj.{name}" for p in "qkv"), qkv
            )
        for old, new in _INTERNLM2_LAYER.items():
            kinds = names if old == "attention.wo" else ("weight",)
            for name in kinds:
                keymap.add(f"{src}{old}.{name}", f"{dst}{new}.{name}")
    keymap.add("model.norm.weight", "model.norm.weight")
    keymap.add("output.weight", "lm_head.weight")
    return keymap


def read_llm_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file}: cannot read ({err})") from None
    if config.get("model_type") != "internlm2" and "InternLM2ForCausalLM" not in (
        config.get("architectures") or []
    ):
        raise CheckpointError(
            f"{config_file}: model_type {config.get('model_type')!r} is not InternLM2 (OMG-LLaVA's LLM)"
        )
    return config


def internlm2_tokenizer(path: str | Path) -> Any:
    """InternLM2's sentencepiece tokenizer as a plain `tokenizers` one, loadable without remote code.

    It reproduces InternLM2's own fast tokenizer: the BPE pieces and merges in id order, a "▁" prepended
    to every text segment between added tokens (sentencepiece's dummy prefix, when the model uses one),
    spaces as "▁", byte fallback. The result is checked against sentencepiece itself on sample text.
    """

    path = Path(path)
    model_file = path / "tokenizer.model"
    if not model_file.is_file():
        raise CheckpointError(f"{path}: no tokenizer.model (InternLM2's sentencepiece tokenizer)")
    settings: dict[str, Any] = {}
    if (path / "tokenizer_config.json").is_file():
        settings = json.loads((path / "tokenizer_config.json").read_text())
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    unk = processor.id_to_piece(processor.unk_id()) if processor.unk_id() >= 0 else None
    backend = Tokenizer(
        BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    dummy_prefix = processor.encode("a", out_type=str)[0].startswith("▁")
    rules = [normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if dummy_prefix else []) + rules)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))

    def token(name: str) -> str | None:
        value = settings.get(name)
        return value.get("content") if isinstance(value, dict) else value

    def piece(index: int) -> str | None:
        return processor.id_to_piece(index) if index >= 0 else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token") or piece(processor.bos_id()),
        eos_token=token("eos_token") or piece(processor.eos_id()),
        unk_token=token("unk_token") or unk,
        pad_token=token("pad_token"),
        add_bos_token=bool(settings.get("add_bos_token", True)),
        add_eos_token=bool(settings.get("add_eos_token", False)),
    )
    added = [
        AddedToken(processor.id_to_piece(i), special=True, normalized=False)
        for i in range(processor.get_piece_size())
        if processor.is_control(i) or processor.is_unknown(i)
    ]
    for entry in (settings.get("added_tokens_decoder") or {}).values():
        added.append(AddedToken(entry["content"], special=bool(entry.get("special", True)), normalized=False))
    tokenizer.add_tokens([t for t in added if t.special], special_tokens=True)
    tokenizer.add_tokens([t for t in added if not t.special])
    tokenizer.chat_template = settings.get("chat_template") or INTERNLM2_CHAT_TEMPLATE
    for sample in ("Hello world", " Please segment the cat.", "two  spaces\nand a line", "数字 123 é 🙂"):
        ours = tokenizer(sample, add_special_tokens=False)["input_ids"]
        if ours != processor.encode(sample):
            raise CheckpointError(
                f"{model_file}: the converted tokenizer disagrees with sentencepiece on {sample!r}"
            )
    return tokenizer


def convert_llm(
    llm_dir: Path, released: Mapping[str, Tensor], pth_source: str, lora_alpha: float
) -> tuple[dict[str, Any], dict[str, Tensor], Any, list[str], dict[str, dict[str, str]]]:
    """Base InternLM2 + the `.pth`'s LLM tensors (full weights replace, LoRA deltas merge) -> (Llama config,
    Llama state, tokenizer with OMG-LLaVA's tokens, notes, unused keys per file)."""

    config = read_llm_config(llm_dir)
    weights = read_state_dict(llm_dir)
    unused: dict[str, dict[str, str]] = {}
    lora: dict[str, Tensor] = {}
    for key, tensor in released.items():
        name = llm_key(key)
        if ".lora_" in name:
            lora[name] = tensor
        elif name in weights or name in ("model.tok_embeddings.weight", "output.weight"):
            weights[name] = tensor
        else:
            unused.setdefault(pth_source, {})[key] = "unknown LLM key: no InternLM2 weight of that name"
    keymap = internlm2_keymap(config)
    source = f"{llm_dir} (+ {pth_source})"
    keymap.check(weights, source)
    notes = merge_lora(weights, lora, lora_alpha, pth_source) if lora else []
    left = sorted(k for k in weights if k not in keymap.entries)
    if left:
        unused[str(llm_dir)] = _reasons(
            left,
            ((r".*rotary_emb\.inv_freq$", "recomputed from the config"),),
            "unknown key: no counterpart in LlamaForCausalLM",
        )
    state = keymap.apply(weights, source)

    tokenizer = internlm2_tokenizer(llm_dir)
    base = len(tokenizer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in RELEASED_TOKENS])
    rows = state["model.embed_tokens.weight"].shape[0]
    if rows not in (base, len(tokenizer)) or state["lm_head.weight"].shape[0] != rows:
        raise CheckpointError(
            f"{pth_source}: {rows} embedding rows, but the tokenizer has {base} tokens and "
            f"{len(tokenizer)} with OMG-LLaVA's {', '.join(RELEASED_TOKENS)}"
        )
    if rows == base:
        notes.append(f"no trained rows for {', '.join(RELEASED_TOKENS)}: initialised to the mean row")
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in LATE_TOKENS])
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        table = state[key]
        extra = table.float().mean(0, keepdim=True).to(table.dtype).expand(len(tokenizer) - rows, -1)
        state[key] = torch.cat([table, extra])
    return llama_config(config, len(tokenizer)), state, tokenizer, notes, unused


# -- the projectors -----------------------------------------------------------------------------------

# Released projector prefixes -> ours (omg_llava/model/modules/projector/modeling_projector.py).
XTUNER_PREFIXES: tuple[tuple[str, str], ...] = (
    ("projector.model.model_feat.", "projector."),
    ("projector.model.query_proj.", "vision_tower.query_projection."),
    ("projector.model.model.", "vision_tower.object_mlp."),
    ("projector_text2vision.model.", "vision_tower.seg_head."),
)
XTUNER_SEPARATOR = "projector.model.seperate_embed.weight"
_PTH_UNSUPPORTED = r"^projector\.model\.(query_cross_attn|query_ffn)\."
_PTH_UNUSED = (
    (
        r"^projector\.model\.visual_prompt_query_",
        "a separate projector copy for visual prompts "
        "(visual_prompt_proj=True): unillava's <region>/<mark> tokens use the object-token path (query_projection, "
        "object_mlp), as the released default (visual_prompt_proj=False) does",
    ),
    (r"^visual_encoder\.", "a segmenter part unillava's OMG tower does not have"),
)


def convert_xtuner_projectors(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Our keys for the projector parts of an XTuner OMG-LLaVA state dict, and the keys left unconverted
    (the LLM, visual-prompt projectors, a trainable decoder copy), so a caller can say what it skipped."""
    out: dict[str, Tensor] = {}
    left = []
    for key, value in state.items():
        if key == XTUNER_SEPARATOR:
            out["vision_tower.separator"] = value.reshape(-1)
            continue
        for source, target in XTUNER_PREFIXES:
            if key.startswith(source):
                out[target + key[len(source) :]] = value
                break
        else:
            left.append(key)
    return out, left


def projector_keymap() -> KeyMap:
    """Every projector weight a complete OMG-LLaVA `.pth` holds."""
    keymap = KeyMap()
    for source, target in XTUNER_PREFIXES:
        layers = ("",) if source.endswith("query_proj.") else ("0.", "2.")
        for layer in layers:
            keymap.linear(f"{source}{layer}".rstrip("."), f"{target}{layer}".rstrip("."))
    keymap.add(XTUNER_SEPARATOR, "vision_tower.separator", lambda t: (t.reshape(-1),))
    return keymap


# -- the entry point ----------------------------------------------------------------------------------


@dataclass
class XTunerConversion:
    """What `convert_xtuner_checkpoint` wrote, and every released key it did not load, with the reason."""

    out_dir: Path
    tensors: int
    unused: dict[str, dict[str, str]]
    notes: list[str]

    def summary(self) -> str:
        lines = [f"wrote {self.out_dir} ({self.tensors} tensors)"] + [f"  {n}" for n in self.notes]
        for source, keys in self.unused.items():
            by_reason: dict[str, list[str]] = {}
            for key, why in keys.items():
                by_reason.setdefault(why, []).append(key)
            for why, names in by_reason.items():
                lines.append(
                    f"  not loaded from {source}: {len(names)} key(s) [{key_list(sorted(names), 3)}]: {why}"
                )
        return "\n".join(lines)


def convert_xtuner_checkpoint(
    pth_path: str | Path,
    out_dir: str | Path,
    *,
    segmenter: str | Path,
    llm: str | Path,
    class_embeddings: str | Path | None = None,
    backbone: str | Path | None = None,
    lora_alpha: float = 256.0,
    image_size: int = 1024,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
) -> XTunerConversion:
    """Convert a released OMG-LLaVA to a unillava model directory that `unillava.load` reads.

    `pth_path`: the XTuner `.pth`; `segmenter`: OMG-Seg's `omg_seg_convl.pth`; `llm`: the InternLM2-Chat-7B
    directory (config, weights, tokenizer.model); `class_embeddings`: the segmenter's class text embeddings
    (`convnext_large_d_320_CocoPanopticOVDataset.pth`); `backbone`: the open_clip ConvNeXt checkpoint, only
    for a segmenter file without `backbone.*` weights. `lora_alpha` is the LoRA alpha the `.pth` was trained
    with (peft does not store it; 256 in the released finetune config, r=512 read off the shapes).
    A `xtuner_conversion.json` beside the weights lists the keys not loaded and why.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise CheckpointError(
            f"{out}: exists and is not an empty directory (allow it with --overwrite / overwrite=True)"
        )
    pth_source = str(pth_path)
    released = read_state_dict(pth_path)
    seg_source = str(segmenter)
    embeddings = read_class_embeddings(class_embeddings) if class_embeddings is not None else None
    backbone_state = read_state_dict(backbone) if backbone is not None else None
    perception_config, perception_state, unused = convert_segmenter(
        read_state_dict(segmenter), seg_source, embeddings, backbone_state, str(backbone)
    )

    groups: dict[str, dict[str, Tensor]] = {"llm": {}, "projector": {}, "seg_decoder": {}, "other": {}}
    for key, tensor in released.items():
        if re.match(_PTH_UNSUPPORTED, key):
            raise CheckpointError(
                f"{pth_source}: {key}: the cross-attention projector variant "
                "(add_cross_attn_layer=True) changes the object tokens and is not supported"
            )
        if key.startswith("llm."):
            groups["llm"][key] = tensor
        elif key.startswith(("projector.", "projector_text2vision.")) and not re.match(
            _PTH_UNUSED[0][0], key
        ):
            groups["projector"][key] = tensor
        elif key.startswith(
            (
                "visual_encoder.panoptic_head.transformer_decoder_llm.",
                "visual_encoder.panoptic_head.mask_embed_llm.",
            )
        ):
            groups["seg_decoder"][key] = tensor
        else:
            groups["other"][key] = tensor
    llm_config, llm_state, tokenizer, notes, llm_unused = convert_llm(
        Path(llm), groups["llm"], pth_source, lora_alpha
    )
    state = {f"language_model.{k}": v for k, v in llm_state.items()}
    state.update({f"vision_tower.perception.{k}": v for k, v in perception_state.items()})
    keymap = projector_keymap()
    state.update(keymap.apply(groups["projector"], pth_source))
    left = [k for k in groups["projector"] if k not in keymap.entries]
    extra: dict[str, Any] = {"use_prior": True, "object_tokens": True}
    if groups["seg_decoder"]:  # the paper's trainable [SEG] decoder copy (require_omg_decoder=True)
        decoder_map = KeyMap()
        add_decoder_keys(
            decoder_map,
            "visual_encoder.panoptic_head.transformer_decoder_llm.",
            "visual_encoder.panoptic_head.mask_embed_llm.",
            "vision_tower.seg_decoder.",
            perception_config["decoder_layers"] - 1,
        )
        state.update(decoder_map.apply(groups["seg_decoder"], pth_source))
        extra["seg_decoder"] = "trainable"
        left += [k for k in groups["seg_decoder"] if k not in decoder_map.entries]
    left += list(groups["other"])
    for source, keys in llm_unused.items():
        unused.setdefault(source, {}).update(keys)
    unused.setdefault(pth_source, {}).update(
        _reasons(sorted(left), _PTH_UNUSED, "unknown key: no counterpart in unillava's OMG-LLaVA")
    )
    unused = {k: v for k, v in unused.items() if v}

    config = ModelConfig(
        vision=VisionConfig(
            type="omg",
            hf_config=perception_config,
            image_size=image_size,
            image_mode="pad",
            image_mean=list(OMG_IMAGE_MEAN),
            image_std=list(OMG_IMAGE_STD),
            extra=extra,
        ),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        llm=LLMConfig(pretrained=None),
        template="auto",
        max_length=2048,
    )
    with torch.device("meta"):  # the skeleton only names and shapes the weights: nothing is allocated
        tower = build_vision_tower(config.vision)
        language_model = build_language_model_from_config(llm_config, dtype=dtype)
        model = model_class_for(config)(config, tower, language_model, tokenizer)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    check_state_dict(model.state_dict(), state, f"{pth_source} (converted)")
    model.load_state_dict(state, assign=True)
    model.save_pretrained(out)
    result = XTunerConversion(out, len(state), unused, notes)
    (out / REPORT_NAME).write_text(json.dumps({"notes": notes, "not_loaded": unused}, indent=2))
    return result


def load_xtuner_projectors(model: OMGLlavaModel, path: str | Path) -> list[str]:
    """Load the projector parts of a released `.pth` into `model` (shapes checked); returns the keys not
    loaded. The model must be built with the matching LLM width and segmenter (ConvNeXt-L, 256-d queries)."""
    raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else raw
    converted, left = convert_xtuner_projectors(state)
    if not converted:
        raise ConfigError(f"{path}: no OMG-LLaVA projector weights found (is it an XTuner OMG-LLaVA .pth?)")
    own = model.state_dict()
    for key, value in converted.items():
        if key not in own:
            raise ConfigError(f"{path}: {key} has no counterpart in this model")
        if tuple(own[key].shape) != tuple(value.shape):
            raise ConfigError(
                f"{path}: {key} is {tuple(value.shape)} but the model has {tuple(own[key].shape)}"
            )
    model.load_state_dict(converted, strict=False)
    return left
