"""Fast CPU decoding for Llama-family language models.

`transformers.generate` spends much of a small model's decode step outside the matrix products: cache
objects, mask building and logits processors. `FastDecoder` runs the same layers (their own norm,
projection and MLP modules, the model's own rotary embedding) with a preallocated KV cache and a short
loop, so the greedy text equals `generate`'s. With `quantize="int4"` the decoding steps use PyTorch's CPU
int4 kernels (weight-only, groups of 32 along the input dimension, bf16 activations; the vocabulary
projection int4 with the best candidates rescored densely; a merged LoRA adapter kept apart): about 4x fewer weight bytes per token, a lossy change
measured in docs/inference.md. Prompts (prefill) always run on the dense weights.

Supported: plain `LlamaForCausalLM` without biases; `fast_decoding_unsupported` names the reason
otherwise, and callers use `generate`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.llama.modeling_llama import LlamaForCausalLM, apply_rotary_pos_emb

from unillava.errors import UnillavaError

QUANTIZE_CHOICES = ("none", "int4")
INT4_GROUP_SIZE = 32

# `generate` keyword arguments the fast loop implements; any other one sends the call to `generate`.
HANDLED_GENERATE_KWARGS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "eos_token_id",
        "pad_token_id",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "stopping_criteria",
        "stop_strings",
        "tokenizer",
        "streamer",
    }
)


def fast_decoding_unsupported(language_model: nn.Module) -> str | None:
    """Why `FastDecoder` cannot run this model, or None when it can."""
    if type(language_model) is not LlamaForCausalLM:
        return f"{type(language_model).__name__} is not a plain LlamaForCausalLM"
    config = language_model.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "projections with biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    if language_model.model.layers[0].self_attn.q_proj.weight.device.type != "cpu":
        return "the fast path is written for the CPU"
    return None


class Int4Linear(nn.Module):
    """Weight-only int4 linear layer (asymmetric, one scale and zero per group of 32 inputs) on PyTorch's
    CPU kernels `_convert_weight_to_int4pack_for_cpu` / `_weight_int4pack_mm_for_cpu`, plus an optional
    bf16 low-rank term `x @ down.T @ up.T` (a LoRA adapter kept apart from the quantized base)."""

    def __init__(
        self,
        weight: torch.Tensor,
        group_size: int = INT4_GROUP_SIZE,
        low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % group_size:
            raise UnillavaError(f"int4: input size {in_features} is not a multiple of {group_size}")
        # The kernel packs rows in tiles of 16: a grown vocabulary (49152 + an image token) gets zero rows.
        rows = -(-out_features // 16) * 16
        padded = F.pad(weight.detach().float(), (0, 0, 0, rows - out_features))
        groups = padded.reshape(rows, in_features // group_size, group_size)
        low = groups.amin(-1, keepdim=True)
        scale = ((groups.amax(-1, keepdim=True) - low) / 15).clamp(min=1e-12)
        codes = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(rows, -1)
        # The kernel computes (code - 8) * scale + zero, so zero is the value of code 8.
        zero = low + 8 * scale
        scales_and_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous().to(torch.bfloat16))
        self.group_size = group_size
        self.out_features = out_features
        self.low_rank = None if low_rank is None else tuple(t.detach().to(torch.bfloat16) for t in low_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, self.group_size, self.scales_and_zeros
        )
        out = out[:, : self.out_features]
        if self.low_rank is not None:
            down, up = self.low_rank
            out = out + (flat @ down.T) @ up.T
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def lora_factors(adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A peft LoRA adapter's factors by module name within the causal LM: (A, scaling * B).

    Quantizing weights with a merged adapter rounds most of the adapter away (its update is small next to
    an int4 step; measured in docs/inference.md), so int4 decoding quantizes the base and adds these."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UnillavaError(f"{config_file}: cannot read the LoRA adapter's config ({err})") from None
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise UnillavaError(f"{config_file}: {field} is not supported by int4 decoding")
    if config.get("use_dora") or config.get("fan_in_fan_out"):
        raise UnillavaError(
            f"{config_file}: DoRA / fan_in_fan_out adapters are not supported by int4 decoding"
        )
    rank, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        up = tensors[key.replace(".lora_A.", ".lora_B.")]
        factors[module] = (down.float(), up.float() * scaling)
    return factors


def _int4_fused(modules: list[tuple[str, nn.Linear]], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """One Int4Linear for several projections of the same input, their outputs concatenated. Where a
    projection carries a merged LoRA update, the base (weight - B A) is quantized and B A added in bf16."""
    bases, downs, ups = [], [], []
    for name, linear in modules:
        weight = linear.weight.detach().float()
        if name in factors:
            down, up = factors[name]
            weight = weight - up @ down
            downs.append(down)
            ups.append(up)
        else:
            ups.append(weight.new_zeros(weight.shape[0], 0))
        bases.append(weight)
    low_rank = (torch.cat(downs), torch.block_diag(*ups)) if downs else None
    return Int4Linear(torch.cat(bases), low_rank=low_rank)


class RescoredHead(nn.Module):
    """The vocabulary projection for int4 steps: int4 logits for every token, then the `top` highest
    recomputed from the dense rows. Int4 alone there cost more quality than everywhere else together, and
    an int8 kernel is slower than int4 + rescoring (docs/inference.md); the greedy choice is the dense
    one whenever the dense best token is among int4's `top` best."""

    def __init__(self, head: nn.Linear, top: int = 16):
        super().__init__()
        self.approximate = Int4Linear(head.weight)
        self.weight = head.weight
        self.top = top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.approximate(x).float()
        candidates = logits.topk(self.top, dim=-1).indices
        rows = self.weight[candidates]  # [..., top, C]
        exact = (rows.float() @ x.float().unsqueeze(-1)).squeeze(-1)
        return logits.scatter(-1, candidates, exact)


def check_quantize(quantize: str) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise UnillavaError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")


class _Bf16RMSNorm:
    """A Llama RMSNorm for bf16 decoding steps: variance in float32 as the original, the rest in bf16
    (transformers' module, given bf16 weights, normalizes in float32 before rounding: other numerics)."""

    def __init__(self, norm: nn.Module):
        self.weight = norm.weight.detach().to(torch.bfloat16)
        self.eps = norm.variance_epsilon

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps).to(x.dtype)) * self.weight


@dataclass
class _Projections:
    """What one decoder layer runs around its attention, for one phase (prompt or decoding step)."""

    input_norm: Callable
    qkv: Callable
    o_proj: Callable
    post_norm: Callable
    mlp: Callable


class _LayerOps:
    """One decoder layer for the fast loop: `prefill` is the layer's own modules; `step` the same or, for
    int4, quantized copies with fused q|k|v and gate|up (one kernel call each instead of three and two)
    and bf16 norms. Decoding reads every weight once per token, so int4 pays there; prompts are long
    enough for the dense matrix products to be faster."""

    def __init__(self, layer: nn.Module, quantize: str, name: str, factors: dict[str, Any]):
        attn, mlp = layer.self_attn, layer.mlp
        self.scaling = attn.scaling
        self.head_dim = attn.head_dim
        self.prefill = _Projections(
            input_norm=layer.input_layernorm,
            qkv=lambda h: (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)),
            o_proj=attn.o_proj,
            post_norm=layer.post_attention_layernorm,
            mlp=mlp,
        )
        self.step = self.prefill if quantize == "none" else self._int4(layer, name, factors)

    @staticmethod
    def _int4(layer: nn.Module, name: str, factors: dict[str, Any]) -> _Projections:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [(f"{name}.self_attn.{p}", getattr(attn, p)) for p in ("q_proj", "k_proj", "v_proj")]
        qkv = _int4_fused(projections, factors)
        sizes = [linear.out_features for _, linear in projections]
        gate_up = _int4_fused(
            [(f"{name}.mlp.gate_proj", mlp.gate_proj), (f"{name}.mlp.up_proj", mlp.up_proj)], factors
        )
        down = _int4_fused([(f"{name}.mlp.down_proj", mlp.down_proj)], factors)
        act = mlp.act_fn

        def fused_mlp(h: torch.Tensor) -> torch.Tensor:
            gate, up = gate_up(h).chunk(2, dim=-1)
            return down(act(gate) * up)

        return _Projections(
            input_norm=_Bf16RMSNorm(layer.input_layernorm),
            qkv=lambda h: qkv(h).split(sizes, dim=-1),
            o_proj=_int4_fused([(f"{name}.self_attn.o_proj", attn.o_proj)], factors),
            post_norm=_Bf16RMSNorm(layer.post_attention_layernorm),
            mlp=fused_mlp,
        )


class FastDecoder:
    """Prefill and decode of a (left-padded) batch with a preallocated KV cache.

    `lora`: the factors of a LoRA adapter merged into the weights (`lora_factors`), for int4 only.
    `generate(inputs_embeds, attention_mask, **kwargs)` takes the subset of `generate`'s arguments in
    `HANDLED_GENERATE_KWARGS` and returns the new token ids, padded with `pad_token_id` after a row ends,
    exactly as `generate` does for a prompt given as embeddings.
    """

    def __init__(
        self,
        language_model: nn.Module,
        quantize: str = "none",
        lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        reason = fast_decoding_unsupported(language_model)
        if reason is not None:
            raise UnillavaError(f"fast decoding: unsupported model ({reason})")
        check_quantize(quantize)
        self.language_model = language_model
        self.quantize = quantize
        decoder = language_model.model
        self.embed = decoder.embed_tokens
        self.final_norm = decoder.norm
        self.rotary = decoder.rotary_emb
        self.layers = [
            _LayerOps(layer, quantize, f"model.layers.{i}", lora or {})
            for i, layer in enumerate(decoder.layers)
        ]
        # (final norm, vocabulary projection) for prompts and for decoding steps.
        self.prefill_head: tuple[Callable, Callable] = (decoder.norm, language_model.lm_head)
        self.step_head = self.prefill_head
        self.step_dtype: torch.dtype | None = None
        if quantize == "int4":
            self.step_head = (_Bf16RMSNorm(decoder.norm), RescoredHead(language_model.lm_head))
            # int4 steps carry bf16 activations (the kernels take bf16): no layer converts back and forth.
            self.step_dtype = torch.bfloat16
        config = language_model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads

    def _forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        start: int,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run the layers on `hidden` ([B, T, C]) at cache slots start..start+T; last position's logits.
        `mask` None: every query sees every cached key."""
        batch, steps, _ = hidden.shape
        prefill = steps > 1
        cos, sin = self.rotary(hidden, positions)
        end = start + steps
        for layer, (key_cache, value_cache) in zip(self.layers, caches, strict=True):
            ops = layer.prefill if prefill else layer.step
            q, k, v = ops.qkv(ops.input_norm(hidden))
            q = q.view(batch, steps, -1, layer.head_dim).transpose(1, 2)
            k = k.view(batch, steps, -1, layer.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            key_cache[:, :, start:end] = k
            value_cache[:, :, start:end] = v.view(batch, steps, -1, layer.head_dim).transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                q.to(key_cache.dtype),
                key_cache[:, :, :end],
                value_cache[:, :, :end],
                attn_mask=mask,
                scale=layer.scaling,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            attended = attended.transpose(1, 2).reshape(batch, steps, -1).to(hidden.dtype)
            hidden = hidden + ops.o_proj(attended)
            hidden = hidden + ops.mlp(ops.post_norm(hidden))
        final_norm, lm_head = self.prefill_head if prefill else self.step_head
        return lm_head(final_norm(hidden[:, -1:]))[:, -1]

    @torch.inference_mode()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        min_new_tokens: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        stop_strings: Sequence[str] | None = None,
        tokenizer: Any = None,
        streamer: Any = None,
    ) -> torch.Tensor:
        batch, prompt_len, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, prompt_len, dtype=torch.long, device=device)
        eos = torch.tensor(
            [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id,
            dtype=torch.long,
            device=device,
        )
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if stop_strings:
            criteria.append(StopStringCriteria(tokenizer, list(stop_strings)))
        warpers = self._warpers(do_sample, temperature, top_p, top_k)

        total = prompt_len + max_new_tokens
        head_dim = self.layers[0].head_dim
        shape = (batch, self.num_kv_heads, total, head_dim)
        dtype = inputs_embeds.dtype
        cache_dtype = self.step_dtype or dtype
        caches = [
            (
                torch.empty(shape, dtype=cache_dtype, device=device),
                torch.empty(shape, dtype=cache_dtype, device=device),
            )
            for _ in self.layers
        ]
        key_valid = torch.cat(
            [attention_mask.bool(), torch.ones(batch, max_new_tokens, dtype=torch.bool, device=device)], dim=1
        )
        # Positions as `generate` gives them: counted over real tokens, 1 on left padding.
        positions = attention_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(attention_mask == 0, 1)
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
        # Each query also sees itself, so padding rows stay finite instead of attending to nothing.
        prefill_mask = (causal & key_valid[:, None, None, :prompt_len]) | torch.eye(
            prompt_len, dtype=torch.bool, device=device
        )

        unpadded = bool(attention_mask.all())
        new_ids = torch.empty(batch, 0, dtype=torch.long, device=device)
        if streamer is not None:
            streamer.put(new_ids.cpu())
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        logits = self._forward(inputs_embeds, positions, 0, caches, prefill_mask)
        next_position = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            scores = logits.float()
            if step < min_new_tokens and len(eos):
                scores[:, eos] = -float("inf")
            if do_sample:
                scores = warpers(new_ids, scores)
                tokens = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
            else:
                tokens = scores.argmax(-1)
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
            new_ids = torch.cat([new_ids, tokens[:, None]], dim=1)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if len(eos):
                unfinished &= ~torch.isin(tokens, eos)
            if len(criteria):
                unfinished &= ~criteria(new_ids, scores)
            if not unfinished.any() or step == max_new_tokens - 1:
                break
            end = prompt_len + step + 1
            mask = None if unpadded else key_valid[:, None, None, :end]
            hidden = self.embed(tokens[:, None]).to(self.step_dtype or dtype)
            logits = self._forward(hidden, next_position, end - 1, caches, mask)
            next_position = next_position + 1
        if streamer is not None:
            streamer.end()
        return new_ids

    @staticmethod
    def _warpers(do_sample: bool, temperature: float | None, top_p: float | None, top_k: int | None):
        """The sampling warpers `generate` would use, in its order."""
        warpers = LogitsProcessorList()
        if not do_sample:
            return warpers
        if temperature is not None and temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        return warpers
