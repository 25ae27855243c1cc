"""The original LLaVA layout (haotian-liu/LLaVA): `LlavaLlamaForCausalLM` and its Mistral / Qwen siblings.

Such a directory holds a LlamaConfig-like `config.json` plus LLaVA's `mm_*` keys, and weights under
`model.*` (the LLM's decoder), `lm_head.*`, `model.mm_projector.*` and, when the tower was trained,
`model.vision_tower.vision_tower.vision_model.*`. The vision tower itself is not in the directory:
`mm_vision_tower` names a separate tower checkpoint: CLIP for LLaVA, ConvNeXt for ConvLLaVA (any
registered tower whose `checkpoint_model_types` holds its config.json `model_type`; the tower class also
maps its keys saved inside the checkpoint, `llava_checkpoint_key`). A stage-1 (projector pre-training) output holds only
`mm_projector.bin` and needs the base LLM it was trained on.

Image tokens: the original code never put `<image>` in the tokenizer; it spliced the prompt around the
`<image>` text itself and used the sentinel id -200 (IMAGE_TOKEN_INDEX) in `input_ids`, which no embedding
table can look up. unillava uses a real token instead: loading adds `<image>` to the tokenizer (see
`ensure_image_token`) and grows the embeddings by one row, initialised to the mean of the others. That
row is never read as an input (image features replace it), and the mean keeps its LM-head logit
unremarkable; all other logits are unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unillava.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from unillava.errors import CheckpointError, UnillavaError
from unillava.hub.llava_hf import assemble, load_tokenizer, pick_template, rename_keys
from unillava.llm import build_language_model_from_config
from unillava.modeling import LlavaModel
from unillava.vision import TOWERS, build_vision_tower
from unillava.vision.base import tower_class_for_checkpoint
from unillava.weights import has_weights, read_json, read_state_dict, read_weights_file

STAGE1_WEIGHTS = "mm_projector.bin"

# LLaVA's wrapper class -> the transformers model_type of the LLM inside it.
ARCHITECTURES: dict[str, str] = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
    "LlavaQwen2ForCausalLM": "qwen2",
}
# config.json keys LLaVA adds to the LLM's config (besides every `mm_*` key); not passed to the LLM.
LLAVA_ONLY_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "_name_or_path",
        "transformers_version",
        "image_aspect_ratio",
        "image_grid_pinpoints",
        "image_crop_resolution",
        "image_split_resolution",
        "tune_mm_mlp_adapter",
        "freeze_mm_mlp_adapter",
        "tune_mm_vision_resampler",
        "freeze_mm_vision_resampler",
        "unfreeze_mm_vision_tower",
        "use_mm_proj",
        "vision_tower",
        "vision_tower_pretrained",
        "tokenizer_padding_side",
        "tokenizer_model_max_length",
    }
)
MODEL_TYPES: dict[str, str] = {
    "llava": "llama",
    "llava_llama": "llama",
    "llava_mistral": "mistral",
    "llava_qwen": "qwen2",
    "llava_qwen2": "qwen2",
}


def is_original_llava(config: dict[str, Any]) -> bool:
    """Whether a config.json is LLaVA's own (its wrapper class, or the `mm_*` keys it adds)."""
    architectures = config.get("architectures") or []
    if any(re.fullmatch(r"Llava\w*ForCausalLM", str(name)) for name in architectures):
        return True
    return "mm_projector_type" in config or "mm_vision_tower" in config


# ---------------------------------------------------------------------------------------------------
# Vision towers named by `mm_vision_tower`
# ---------------------------------------------------------------------------------------------------


def tower_config_from_dir(path: str | Path) -> VisionConfig:
    """The VisionConfig for a local vision-tower checkpoint, by the `model_type` in its config.json."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; not a vision tower checkpoint")
    data = read_json(path / "config.json")
    tower = tower_class_for_checkpoint(str(data.get("model_type")), f"{path}/config.json")
    return tower.config_from_checkpoint(path, data)


def _resolve_tower_dir(path: Path, config: dict[str, Any], vision_tower_path: str | Path | None) -> Path:
    if vision_tower_path is not None:
        tower = Path(vision_tower_path).expanduser()
        if not tower.is_dir():
            raise CheckpointError(f"vision_tower_path {tower}: directory not found")
        return tower
    name = config.get("mm_vision_tower") or config.get("vision_tower")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}/config.json: no mm_vision_tower; pass vision_tower_path=")
    candidate = Path(name).expanduser()
    for tower in (candidate, path / candidate):
        if tower.is_dir():
            return tower
    raise CheckpointError(
        f"{path}/config.json: mm_vision_tower {name!r} is not a local directory and no model hub is reached at "
        f"run time; download it (e.g. `huggingface-cli download {name} --local-dir DIR`) and pass "
        "vision_tower_path=DIR (CLI: --vision-tower DIR)"
    )


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _llm_type(path: Path, config: dict[str, Any]) -> str:
    for name in config.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise CheckpointError(
        f"{path}/config.json: LLaVA variant {config.get('architectures')} / model_type {model_type!r} is not "
        f"supported; known: {', '.join(ARCHITECTURES)}"
    )


def _llm_config(model_type: str, config: dict[str, Any]) -> dict[str, Any]:
    """The LLM's own settings: config.json without LLaVA's additions (legacy LLM keys are kept)."""
    llm = {k: v for k, v in config.items() if k not in LLAVA_ONLY_KEYS and not k.startswith("mm_")}
    return {"model_type": model_type, **llm}


def original_key(key: str, tower_rename: Callable[[str], str | None]) -> str | None:
    """An original-LLaVA weight name -> ours; None for names the layout does not define (e.g. LLaVA-NeXT's)."""
    match = re.match(r"^(?:model\.)?mm_projector\.(.+)$", key)
    if match:
        return f"projector.{match.group(1)}"
    match = re.match(r"^model\.vision_tower\.vision_tower\.(.+)$", key)
    if match:
        ours = tower_rename(match.group(1))
        return f"vision_tower.{ours}" if ours else None
    match = re.match(r"^model\.(.+)$", key)
    if match:
        rest = match.group(1)
        if rest.startswith(("vision_tower.", "image_newline", "vision_resampler.", "mm_")):
            return None
        return f"language_model.model.{rest}"
    match = re.match(r"^lm_head\.(.+)$", key)
    if match:
        return f"language_model.lm_head.{match.group(1)}"
    return None


def _image_mode(path: Path, config: dict[str, Any]) -> str:
    aspect = config.get("image_aspect_ratio")
    if aspect == "pad":
        return "pad"
    if isinstance(aspect, str) and aspect.startswith("anyres"):
        raise CheckpointError(
            f"{path}/config.json: image_aspect_ratio {aspect!r} is LLaVA-NeXT's tiling, which unillava does not support"
        )
    return "center_crop"  # LLaVA's CLIPImageProcessor: shortest-edge resize, then the centre crop


def load_original_llava(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    vision_tower_path: str | Path | None = None,
    base_llm_path: str | Path | None = None,
) -> LlavaModel:
    """Read an original-LLaVA checkpoint (or a stage-1 `mm_projector.bin` plus `base_llm_path`).

    Used from config.json: the LLM settings, `mm_vision_tower` (a local CLIP or ConvNeXt directory,
    or `vision_tower_path`), `mm_vision_resolution` (ConvLLaVA's input size), `mm_projector_type`, `mm_hidden_size`, `mm_vision_select_layer`,
    `mm_vision_select_feature` and `image_aspect_ratio`. Training flags (`tune_mm_mlp_adapter`,
    `freeze_mm_mlp_adapter`, ...) do not change the model and are ignored.
    """
    path = Path(path)
    config = read_json(path / "config.json")
    source = str(path)
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise CheckpointError(
            f"{path}/config.json: mm_use_im_start_end / mm_use_im_patch_token are set; unillava does not support "
            "LLaVA v0/v1's image start/end/patch tokens"
        )
    full = has_weights(path)
    stage1 = (path / STAGE1_WEIGHTS).is_file()
    if full and base_llm_path is not None:
        raise CheckpointError(f"{path}: holds its own LLM weights; base_llm_path is only for stage-1 outputs")
    if not full and not stage1:
        found = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(
            f"{path}: original LLaVA config but no weights (model.safetensors, pytorch_model.bin, their "
            f"indexes, or a stage-1 {STAGE1_WEIGHTS}); found: {', '.join(found)}"
        )
    if not full and base_llm_path is None:
        raise CheckpointError(
            f"{path}: a stage-1 output (only {STAGE1_WEIGHTS}); pass base_llm_path= (CLI: --base-llm DIR), the LLM "
            "it was trained on"
        )
    base = Path(base_llm_path).expanduser() if base_llm_path is not None else None
    if base is not None and not (base / "config.json").is_file():
        raise CheckpointError(f"base_llm_path {base}: no config.json; not a transformers LLM directory")

    if base is not None:
        base_config = read_json(base / "config.json")
        llm_hf = _llm_config(str(base_config.get("model_type") or _llm_type(path, config)), base_config)
    else:
        llm_hf = _llm_config(_llm_type(path, config), config)

    tower_dir = _resolve_tower_dir(path, config, vision_tower_path)
    vision = tower_config_from_dir(tower_dir)
    vision.select_layer = int(config.get("mm_vision_select_layer", -1))
    vision.select_feature = str(config.get("mm_vision_select_feature", "patch"))
    vision.image_mode = _image_mode(path, config)
    tower_class = TOWERS[vision.type]
    if tower_class.takes_mm_vision_resolution and config.get(
        "mm_vision_resolution"
    ):  # ConvLLaVA's input size
        vision.image_size = int(config["mm_vision_resolution"])
    tower_rename = tower_class.llava_checkpoint_key

    tokenizer_dir = path if any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")) else base
    tokenizer = load_tokenizer(tokenizer_dir or path, "original LLaVA checkpoint")
    model_config = ModelConfig(
        vision=vision,
        projector=ProjectorConfig(type=str(config.get("mm_projector_type", "linear"))),
        llm=LLMConfig(pretrained=None, hf_config=None, tokenizer=None),
        template=pick_template(
            tokenizer, source=str(path), documented=True
        ),  # LLaVA-1.5's conv_mode vicuna_v1
        image_token="<image>",
        max_length=int(
            config.get("tokenizer_model_max_length") or llm_hf.get("max_position_embeddings") or 2048
        ),
    )
    try:
        tower = build_vision_tower(model_config.vision)
        language_model = build_language_model_from_config(llm_hf, dtype=dtype)
    except (UnillavaError, OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"{source}: cannot build the model ({' '.join(str(err).split())[:300]})"
        ) from None
    mm_hidden = config.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != tower.hidden_size:
        raise CheckpointError(
            f"{path}/config.json: mm_hidden_size {mm_hidden} but the tower in {tower_dir} has hidden size "
            f"{tower.hidden_size}"
        )

    def rename(key: str) -> str | None:
        return original_key(key, tower_rename)

    state, unused = rename_keys(read_state_dict(path if base is None else base), rename, source)
    if base is not None:
        for key, tensor in read_weights_file(path / STAGE1_WEIGHTS).items():
            ours = rename(key)
            if ours is None or not ours.startswith("projector."):
                unused.append(f"{STAGE1_WEIGHTS}:{key}")
            else:
                state[ours] = tensor
    return assemble(
        model_config,
        tower,
        language_model,
        tokenizer,
        state,
        source,
        unused=unused,
        tower_weights_required=False,
        dtype=dtype,
    )
