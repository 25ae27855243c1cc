"""The llava-hf layout (transformers' `LlavaForConditionalGeneration`): read it into a `LlavaModel`, write it.

Also holds what the original-LLaVA reader shares with it: reading transformers-style weight files
(safetensors or `.bin`, single or sharded) and assembling a `LlavaModel` from renamed weights with a
strict key check, so a checkpoint that does not fit our model fails with the keys named instead of
silently keeping random weights.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, LlavaConfig, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from unillava.config import CLIP_MEAN, CLIP_STD, LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from unillava.conversation import (
    VICUNA_SYSTEM,
    ImageSlot,
    Message,
    ProcessorChatTemplate,
    TokenizerChatTemplate,
    resolve_template_name,
)
from unillava.errors import CheckpointError, UnillavaError
from unillava.llm import build_language_model_from_config
from unillava.modeling import LlavaModel
from unillava.projector import build_projector
from unillava.vision import VisionTower, build_vision_tower
from unillava.vision.base import PREPROCESSOR_CONFIG, PROCESSOR_CONFIG, preprocessing_from_image_processor
from unillava.vision.clip import CLIPTower
from unillava.weights import BIN_INDEX, SAFE_INDEX, SAFE_WEIGHTS, key_list, read_json, read_state_dict

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Buffers older transformers versions saved but that are recomputed now; dropped when our model lacks them.
RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")

# Marks the chat templates `export_hf` writes, so reading our own export back restores the template name.
TEMPLATE_MARKER = "unillava-template:"


# ---------------------------------------------------------------------------------------------------
# Reading weights and assembling a model (shared with the original-LLaVA reader)
# ---------------------------------------------------------------------------------------------------


def rename_keys(
    state: dict[str, torch.Tensor], rename: Callable[[str], str | None], source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply `rename` (checkpoint key -> our key, None if the layout does not define it) to every key.

    Returns the renamed tensors and the keys nothing maps (recomputed buffers excepted), which `assemble`
    reports together with any weights left missing.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        ours = rename(key)
        if ours is None:
            if not key.endswith(RECOMPUTED_SUFFIXES):
                unknown.append(key)
            continue
        if ours in out:
            raise CheckpointError(f"{source}: two tensors map to {ours} (one is {key})")
        out[ours] = tensor
    return out, unknown


def _tied_output_keys(language_model: nn.Module) -> set[str]:
    out = language_model.get_output_embeddings()
    inp = language_model.get_input_embeddings()
    if out is None or out.weight is not inp.weight:
        return set()
    return {f"{name}.weight" for name, module in language_model.named_modules() if module is out}


def assemble(
    config: ModelConfig,
    tower: VisionTower,
    language_model: nn.Module,
    tokenizer: Any,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    unused: list[str] | None = None,
    tower_weights_required: bool = True,
    dtype: torch.dtype = torch.float32,
) -> LlavaModel:
    """Build a `LlavaModel` from parts and weights under our keys (`vision_tower.`, `projector.`, `language_model.`).

    Every tensor must land somewhere and every parameter must be filled (a tied LM head may be absent;
    the tower may come pre-loaded when `tower_weights_required` is False, the checkpoint then overriding
    what it holds). `unused` are checkpoint keys the caller could not rename, reported with the rest.
    The LLM is loaded before `LlavaModel` adds the image token, so a checkpoint without
    that token still matches; embedding rows added for it start at the mean of the others, the way
    LLaVA initialised tokens it added, so the image token never stands out in the LM head's logits.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {"vision_tower": {}, "projector": {}, "language_model": {}}
    stray: list[str] = list(unused or [])
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if head in parts and rest:
            parts[head][rest] = tensor
        else:
            stray.append(key)
    text_hidden = language_model.get_input_embeddings().embedding_dim
    try:
        with torch.device("meta"):
            projector_template = build_projector(config.projector.type, tower.hidden_size, text_hidden)
    except UnillavaError as err:
        raise CheckpointError(f"{source}: {err}") from None
    expected = {
        "vision_tower": tower.state_dict(),
        "projector": projector_template.state_dict(),
        "language_model": language_model.state_dict(),
    }
    optional = {
        "vision_tower": set(expected["vision_tower"]) if not tower_weights_required else set(),
        "projector": set(),
        "language_model": _tied_output_keys(language_model),
    }
    missing: list[str] = []
    problems: list[str] = []
    for part, own in expected.items():
        given = parts[part]
        for key in given:
            if key not in own:
                if not key.endswith(RECOMPUTED_SUFFIXES):
                    stray.append(f"{part}.{key}")
            elif own[key].shape != given[key].shape:
                problems.append(
                    f"{part}.{key} has shape {tuple(given[key].shape)}, expected {tuple(own[key].shape)}"
                )
        missing += [f"{part}.{key}" for key in own if key not in given and key not in optional[part]]
        parts[part] = {k: v for k, v in given.items() if k in own}
    if stray or missing or problems:
        lines = []
        if stray:
            lines.append(f"{len(stray)} unused key(s): {key_list(sorted(stray))}")
        if missing:
            lines.append(f"{len(missing)} weight(s) missing (unillava names): {key_list(sorted(missing))}")
        lines += problems[:5]
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(lines))
    tower.load_state_dict(parts["vision_tower"], strict=False)
    language_model.load_state_dict(parts["language_model"], strict=False)
    language_model.tie_weights()
    vocab_before = language_model.get_input_embeddings().num_embeddings
    try:
        model = LlavaModel(config, tower, language_model, tokenizer)
    except UnillavaError as err:
        raise CheckpointError(f"{source}: {err}") from None
    model.projector.load_state_dict(parts["projector"])
    _mean_init_new_rows(language_model, vocab_before)
    return model.to(dtype).eval()


@torch.no_grad()
def _mean_init_new_rows(language_model: nn.Module, old_rows: int) -> None:
    for module in (language_model.get_input_embeddings(), language_model.get_output_embeddings()):
        if module is None or module.weight.shape[0] <= old_rows:
            continue
        module.weight[old_rows:] = module.weight[:old_rows].mean(dim=0, keepdim=True)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias[old_rows:] = bias[:old_rows].mean()


def load_tokenizer(path: Path, what: str) -> Any:
    """The tokenizer saved in `path`, or a CheckpointError saying it is absent."""
    if not any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer.model) for the {what}")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot load the tokenizer ({' '.join(str(err).split())[:300]})"
        ) from None


def pick_template(
    tokenizer: Any, image_token: str = "<image>", *, source: str, documented: bool = False
) -> str:
    """The template a checkpoint ships: the one our export recorded, else its chat template (plain-string
    content: `chat_template`; a processor's typed content, as llava-hf has: `processor_chat_template`).

    A checkpoint without a usable chat template gets LLaVA-1.5's vicuna_v1: silently where that is the
    layout's documented format (`documented`: original LLaVA's conv_mode), else with a warning naming it.
    """
    text = getattr(tokenizer, "chat_template", None)
    if isinstance(text, str) and text:
        marker = re.search(re.escape(TEMPLATE_MARKER) + r"\s*(\w+)", text)
        if marker and marker.group(1) in ("vicuna_v1", "plain"):
            return marker.group(1)
        if _renders(TokenizerChatTemplate(tokenizer), [Message("user", ["probe question"])]):
            return "chat_template"
        if _renders(
            ProcessorChatTemplate(tokenizer, image_token),
            [Message("user", [ImageSlot(), "\nprobe question"])],
            image=True,
        ):
            return "processor_chat_template"
        reason = "its chat template renders neither plain-string nor typed (processor) messages"
    else:
        reason = "it has no chat template"
    if not documented:
        warnings.warn(
            f"{source}: {reason}; using the 'vicuna_v1' template (choose another with --template)",
            stacklevel=3,
        )
    return "vicuna_v1"


def _renders(template: TokenizerChatTemplate, probe: list[Message], image: bool = False) -> bool:
    """Whether `template` places our probe text (and image) and the assistant's answer in a prompt."""
    messages = [*probe, Message("assistant", ["probe answer"])]
    try:
        segments = template.segments(messages, add_generation_prompt=False)
    except Exception:  # any failure to render means the template does not take this kind of message
        return False
    texts = {s.text for s in segments if s.kind == "text"}
    has_image = any(s.kind == "image" for s in segments)
    return {"probe question", "probe answer"} <= texts and has_image == image


# ---------------------------------------------------------------------------------------------------
# Reading the llava-hf layout
# ---------------------------------------------------------------------------------------------------


def llava_hf_key(key: str, lm_prefix: str = "model") -> str | None:
    """A llava-hf key, in either nesting, to ours; None for a key the layout does not define.

    New (transformers 5 in memory): `model.vision_tower.*`, `model.multi_modal_projector.*`,
    `model.language_model.*`, `lm_head.*`. Old (the published checkpoints, and what transformers 5 still
    writes): `vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`.
    The CLIP tower's keys may or may not carry `vision_model.`.
    """
    match = re.match(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$", key)
    if match:
        return f"vision_tower.model.{match.group(1)}"
    match = re.match(r"^(?:model\.)?multi_modal_projector\.linear_([12])\.(.+)$", key)
    if match:
        return f"projector.{0 if match.group(1) == '1' else 2}.{match.group(2)}"
    match = re.match(r"^model\.language_model\.(.+)$", key)
    if match:
        return f"language_model.{lm_prefix}.{match.group(1)}"
    match = re.match(r"^(?:language_model\.)?lm_head\.(.+)$", key)
    if match:
        return f"language_model.lm_head.{match.group(1)}"
    if key.startswith(f"language_model.{lm_prefix}."):
        return key
    return None


def _processor_settings(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(processor_config.json, the image processor's settings) where present."""
    processor: dict[str, Any] = {}
    image: dict[str, Any] | None = None
    if (path / PROCESSOR_CONFIG).is_file():
        processor = read_json(path / PROCESSOR_CONFIG)
        nested = processor.get("image_processor")
        image = nested if isinstance(nested, dict) else None
    if image is None and (path / PREPROCESSOR_CONFIG).is_file():
        image = read_json(path / PREPROCESSOR_CONFIG)
    return processor, image


def _processor_chat_template(path: Path, processor: dict[str, Any]) -> str | None:
    """The processor's chat template where the tokenizer has none: `chat_template.jinja`, the older
    `chat_template.json` ({"chat_template": ...}) or a field of processor_config.json."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        template = read_json(path / "chat_template.json").get("chat_template")
        if isinstance(template, str):
            return template
    template = processor.get("chat_template")
    return template if isinstance(template, str) else None


def load_llava_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> LlavaModel:
    """Read a llava-hf directory (config.json with `LlavaForConditionalGeneration`) into a `LlavaModel`.

    Preprocessing comes from the processor's image-processor settings; without any, LLaVA-1.5's
    defaults (pad to square, CLIP mean/std, the tower's image size) apply.
    """
    path = Path(path)
    try:
        hf = LlavaConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"{path}/config.json: not a readable LlavaConfig ({' '.join(str(err).split())[:300]})"
        ) from None
    vision_hf = hf.vision_config
    if vision_hf.model_type != "clip_vision_model":
        raise CheckpointError(
            f"{path}/config.json: vision tower model_type {vision_hf.model_type!r}; unillava reads llava-hf "
            "checkpoints with CLIP towers (clip_vision_model)"
        )
    if not isinstance(hf.vision_feature_layer, int):
        raise CheckpointError(
            f"{path}/config.json: vision_feature_layer {hf.vision_feature_layer} selects several layers; "
            "unillava's CLIP tower takes one"
        )
    if hf.projector_hidden_act != "gelu" or not hf.multimodal_projector_bias:
        raise CheckpointError(
            f"{path}/config.json: projector with act {hf.projector_hidden_act!r} and "
            f"bias={hf.multimodal_projector_bias}; unillava's mlp2x_gelu has GELU and biases"
        )
    processor, image_settings = _processor_settings(path)
    if image_settings is None:
        size, mode, mean, std = vision_hf.image_size, "pad", list(CLIP_MEAN), list(CLIP_STD)
    else:
        size, mode, mean, std = preprocessing_from_image_processor(
            image_settings, str(path), default_size=vision_hf.image_size
        )
    if size != vision_hf.image_size:
        raise CheckpointError(
            f"{path}: the image processor makes {size}px images but the CLIP tower takes {vision_hf.image_size}px"
        )
    tokenizer = load_tokenizer(path, "llava-hf checkpoint")
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _processor_chat_template(path, processor)
    image_token = processor.get("image_token") or "<image>"
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_token not in tokenizer.get_vocab() or token_id != hf.image_token_index:
        raise CheckpointError(
            f"{path}: config.json says image_token_index={hf.image_token_index} but the tokenizer maps "
            f"{image_token!r} to {token_id if image_token in tokenizer.get_vocab() else 'nothing'}"
        )
    text_dict = hf.text_config.to_dict()
    text_dict["tie_word_embeddings"] = bool(hf.tie_word_embeddings)
    strategy = hf.vision_feature_select_strategy
    config = ModelConfig(
        vision=VisionConfig(
            type="clip",
            pretrained=None,
            hf_config=vision_hf.to_diff_dict(),
            select_layer=hf.vision_feature_layer,
            select_feature="patch" if strategy == "default" else "cls_patch",
            image_size=size,
            image_mode=mode,
            image_mean=mean,
            image_std=std,
        ),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        llm=LLMConfig(pretrained=None, hf_config=None, tokenizer=None),
        template=pick_template(tokenizer, image_token, source=str(path)),
        image_token=image_token,
        max_length=int(getattr(hf.text_config, "max_position_embeddings", None) or 2048),
    )
    try:
        tower = build_vision_tower(config.vision)
        language_model = build_language_model_from_config(text_dict, dtype=dtype)
    except (UnillavaError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}/config.json: cannot build the model ({err})") from None
    prefix = getattr(language_model, "base_model_prefix", "model")
    state, unused = rename_keys(read_state_dict(path), lambda key: llava_hf_key(key, prefix), str(path))
    model = assemble(config, tower, language_model, tokenizer, state, str(path), unused=unused, dtype=dtype)
    if model.image_token_id != hf.image_token_index:
        raise CheckpointError(
            f"{path}: image token id {model.image_token_id} != image_token_index {hf.image_token_index}"
        )
    return model


# ---------------------------------------------------------------------------------------------------
# Writing the llava-hf layout
# ---------------------------------------------------------------------------------------------------

_FLATTEN_CONTENT = """\
{%- set ns = namespace(out=[]) -%}
{%- for m in messages -%}
{%- if m['content'] is string -%}
{%- set ns.out = ns.out + [{'role': m['role'], 'content': m['content'], 'images': m['content'].count(IMAGE)}] -%}
{%- else -%}
{%- set parts = namespace(text='', images=0) -%}
{%- for part in m['content'] -%}
{%- if part['type'] == 'image' -%}{%- set parts.images = parts.images + 1 -%}
{%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}{%- endif -%}
{%- endfor -%}
{%- set sep = '\\n' if parts.images and parts.text else '' -%}
{%- set ns.out = ns.out + [{'role': m['role'], 'content': IMAGE * parts.images + sep + parts.text, \
'images': parts.images}] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = ns.out -%}
"""

_VICUNA = """\
{{- bos_token if bos_token else '' -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] + ' ' -}}{%- set turns = messages[1:] -%}
{%- else -%}{{- SYSTEM + ' ' -}}{%- set turns = messages -%}{%- endif -%}
{%- for m in turns -%}
{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ' -}}
{%- else -%}{{- 'ASSISTANT: ' + m['content'] + (eos_token if eos_token else '') -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
"""

_PLAIN = """\
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}{{- IMAGE * m['images'] -}}
{%- elif m['role'] == 'assistant' -%}{{- m['content'] + (eos_token if eos_token else '') -}}{%- endif -%}
{%- endfor -%}
"""


def processor_chat_template(template: str, tokenizer: Any, image_token: str) -> str:
    """A Jinja chat template for the exported processor and tokenizer that renders like our template.

    It accepts both plain-string content and the processor's `[{"type": "image"}, {"type": "text"}]`
    content; images are placed first, then a newline and the text, as `user_message` does.
    """
    header = (
        f"{{#- {TEMPLATE_MARKER} {template} -#}}\n"
        f"{{%- set IMAGE = {json.dumps(image_token)} -%}}\n"
        f"{{%- set SYSTEM = {json.dumps(VICUNA_SYSTEM)} -%}}\n"
    )
    if template == "vicuna_v1":
        body = _VICUNA
    elif template == "plain":
        body = _PLAIN
    elif template == "chat_template":
        body = tokenizer.chat_template
    else:
        raise CheckpointError(f"template {template!r} cannot be written as a chat template")
    return header + _FLATTEN_CONTENT + body


def _resolved_template(model: LlavaModel) -> str:
    return resolve_template_name(model.config.template, model.tokenizer)


def _hub_key(key: str) -> str:
    """Our key -> the llava-hf key as published checkpoints have it (transformers 4 and 5 both read these)."""
    if key.startswith("vision_tower.model."):
        return "vision_tower.vision_model." + key[len("vision_tower.model.") :]
    match = re.match(r"^projector\.([02])\.(.+)$", key)
    if match:
        return f"multi_modal_projector.linear_{1 if match.group(1) == '0' else 2}.{match.group(2)}"
    return key


def _save_weights(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_file(state, str(out / SAFE_WEIGHTS), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2))


def export_hf(
    model: LlavaModel,
    out_dir: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write `model` in the llava-hf layout, loadable by `LlavaForConditionalGeneration` and `AutoProcessor`.

    Only a CLIP tower with an `mlp2x_gelu` projector fits that architecture. Weights use the key names of
    the published llava-hf checkpoints (`language_model.model.*`, `vision_tower.vision_model.*`), which
    transformers 4 and 5 (and engines reading llava-hf checkpoints) load. The processor reproduces our
    preprocessing: square resize, `do_pad` for "pad" mode, our mean/std, bicubic, and counts one image
    token per feature. With torchvision installed transformers resizes with torchvision instead of PIL,
    which can move pixel values slightly; without it, pixels match ours exactly.

    `out_dir` must be new or empty unless `overwrite`, which first deletes weight files already there
    (a stale shard next to new ones would be loaded with them).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise CheckpointError(
            f"{out}: exists and is not an empty directory; export into a new one or overwrite"
        )
    config = model.config
    tower = model.vision_tower
    if (
        config.vision.type != "clip"
        or not isinstance(tower, CLIPTower)
        or config.projector.type != "mlp2x_gelu"
    ):
        raise CheckpointError(
            f"cannot export a {config.vision.type!r} tower with a {config.projector.type!r} projector to the "
            "llava-hf layout: transformers' LlavaForConditionalGeneration (and vLLM, SGLang, llama.cpp, which "
            "read that layout) only represent a CLIP tower with an mlp2x_gelu projector"
        )
    if config.vision.image_mode not in ("pad", "resize", "center_crop"):
        raise CheckpointError(
            f"cannot export image_mode {config.vision.image_mode!r}: the llava image processor pads, resizes or "
            "centre-crops to one square size"
        )
    language_model = model.language_model
    if getattr(language_model, "base_model_prefix", None) != "model" or not hasattr(language_model, "model"):
        raise CheckpointError(
            f"cannot export LLM {type(language_model).__name__}: llava-hf expects its decoder under `model`"
        )
    size = tower.native_size
    n_tokens = tower.num_tokens(size, size)
    strategy = "default" if config.vision.select_feature == "patch" else "full"

    text_config = copy.deepcopy(language_model.config)
    text_config.vocab_size = language_model.get_input_embeddings().num_embeddings
    llava_config = LlavaConfig(
        vision_config=tower.model.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=n_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision.select_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    llava_config.architectures = ["LlavaForConditionalGeneration"]
    llava_config.dtype = model.dtype

    tied = set(model._tied_keys())
    state = {_hub_key(k): v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    out.mkdir(parents=True, exist_ok=True)
    for pattern in ("model*.safetensors", SAFE_INDEX, "pytorch_model*.bin", BIN_INDEX):
        for stale in out.glob(pattern):
            stale.unlink()
    _save_weights(state, out, max_shard_bytes)
    llava_config.save_pretrained(str(out))
    generation_config = getattr(language_model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(out))

    crop = config.vision.image_mode == "center_crop"
    image_processor = LlavaImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": size} if crop else {"height": size, "width": size},
        do_center_crop=crop,
        crop_size={"height": size, "width": size},
        do_pad=config.vision.image_mode == "pad",
        image_mean=list(config.vision.image_mean),
        image_std=list(config.vision.image_std),
        resample=3,
        do_convert_rgb=True,
    )
    tokenizer = copy.deepcopy(model.tokenizer)
    template = _resolved_template(model)
    if template == "processor_chat_template":  # already the processor's own: written back unchanged
        chat_template = model.tokenizer.chat_template
    else:
        chat_template = processor_chat_template(template, model.tokenizer, config.image_token)
    tokenizer.chat_template = chat_template
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=chat_template,
        image_token=config.image_token,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(str(out))
    return out
