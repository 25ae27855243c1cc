"""The multimodal model: vision tower -> projector -> image features spliced into the LLM's input.

`splice_image_features` is where image tokens in the text are replaced by projected image features.
Everything model-design specific (CLIP, ConvNeXt, a segmenter) lives in the tower; this core only needs
each image's feature sequence and the positions of its image tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AddedToken, AutoTokenizer
from transformers.modeling_outputs import CausalLMOutputWithPast

from unillava.config import LLMConfig, ModelConfig, from_dict, override_dataclass
from unillava.conversation import IGNORE_INDEX, resolve_template_name
from unillava.data.images import ImagePreprocessor
from unillava.data.llava_format import Sample
from unillava.errors import CheckpointError
from unillava.llm import build_language_model_from_config, load_language_model
from unillava.projector import build_projector
from unillava.vision import VisionTower, build_vision_tower
from unillava.vision.feature_cache import FeatureCache
from unillava.weights import check_state_dict, key_list

CONFIG_NAME = "unillava_config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_DIR = "adapter"  # a LoRA run's adapter, beside its merged weights
FORMAT_VERSION = 1
TEXT_LOSS = "text_ce"  # the loss part every model has: next-token cross-entropy per supervised token

# Designs whose models need more than the core (OMG's [SEG] head) register their class under their tower
# type, so loading a checkpoint picks the right class from its config alone.
MODEL_CLASSES: dict[str, type[LlavaModel]] = {}


def register_model_class(tower_type: str) -> Callable[[type[LlavaModel]], type[LlavaModel]]:
    def decorate(cls: type[LlavaModel]) -> type[LlavaModel]:
        MODEL_CLASSES[tower_type] = cls
        return cls

    return decorate


def model_class_for(config: ModelConfig) -> type[LlavaModel]:
    """The class a config builds: the core `LlavaModel` unless its tower type names a specialisation."""
    return MODEL_CLASSES.get(config.vision.type, LlavaModel)


def splice_image_features(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, features: list[torch.Tensor]
) -> torch.Tensor:
    """Put each image's features, in order, at the positions of the image tokens.

    The processor reserved exactly `len(features[i])` image tokens for image i, so a mismatch here means
    the input was not built by the processor: it is an error, never silently truncated.
    """
    positions = input_ids == image_token_id
    n_slots = int(positions.sum())
    n_features = sum(int(f.shape[0]) for f in features)
    if n_slots != n_features:
        raise ValueError(
            f"{n_slots} image token(s) in the text but {len(features)} image(s) with {n_features} feature "
            "token(s): each <image> must be expanded by the processor to its image's token count"
        )
    if n_slots == 0:
        return inputs_embeds
    flat = torch.cat(features, dim=0).to(inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(positions.unsqueeze(-1), flat)


class LossPart(NamedTuple):
    """One named term of the training loss over one micro-batch: its sum, the count it is a mean over
    (supervised tokens, masks, images) and its weight. The trainer sums totals and counts over the whole
    global batch, so the step trains sum_p weight_p * total_p / count_p however the batch is split."""

    total: torch.Tensor
    count: int
    weight: float = 1.0


@dataclass
class LlavaOutput(CausalLMOutputWithPast):
    """The LM output plus, under `loss_reduction="sum"`, the loss's named parts: what the trainer trains
    and logs, so it needs no knowledge of any model's losses."""

    loss_parts: dict[str, LossPart] | None = None


class BatchFields:
    """A model's per-record training inputs beyond ids, labels and images; the core model has none.

    The training dataset calls these instead of knowing any model design: `check` once, `kept` while it
    plans (a field's entries are tied to tokens, so truncation may drop some), `build` when a sample
    loads; collate then passes each field per row (None for a row whose record lacks it) to the forward
    under its name in `names`.
    """

    names: tuple[str, ...] = ()

    def check(self, tokenizer: Any, preprocessor: ImagePreprocessor) -> None:
        """Refuse (ConfigError) a tokenizer or image preprocessing the fields cannot be built with."""

    def kept(self, sample: Sample, input_ids: Sequence[int]) -> dict[str, tuple[int, int]]:
        """Per field the record has: (its entries, how many of them the kept ids still hold tokens for)."""
        return {}

    def build(
        self, sample: Sample, kept: Mapping[str, int], image_sizes: Sequence[tuple[int, int]]
    ) -> dict[str, Any]:
        """Per field in `kept`, the forward input built from the record's first `kept[name]` entries;
        `image_sizes` are the sample's (width, height) before preprocessing."""
        return {}


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the causal-LM loss (labels are shifted by one inside the loss)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class LlavaModel(nn.Module):
    """Vision tower + projector + causal LM, with generation and a self-describing checkpoint format."""

    # Whether `encode_images` may reuse a frozen tower's features (OMG-LLaVA's tower has its own cache).
    supports_feature_cache = True

    def __init__(self, config: ModelConfig, vision_tower: VisionTower, language_model: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.language_model = language_model
        # The LoRA adapter merged into the LLM at load (compact checkpoints): int4 decoding keeps it apart.
        self.merged_adapter: Path | None = None
        self.tokenizer = tokenizer
        text_hidden = language_model.get_input_embeddings().embedding_dim
        self.projector = build_projector(config.projector.type, vision_tower.hidden_size, text_hidden)
        self.image_token_id = ensure_image_token(tokenizer, language_model, config.image_token)
        self.feature_cache: FeatureCache | None = None
        self.sources: dict[str, str | None] = {}

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> LlavaModel:
        """Build with pretrained parts where the config names them (untrained projector)."""
        if cls is LlavaModel:
            cls = model_class_for(config)
        tower = build_vision_tower(config.vision)
        language_model, tokenizer = load_language_model(config.llm, dtype=dtype)
        model = cls(config, tower, language_model, tokenizer)
        model.sources = {"vision": config.vision.pretrained, "llm": config.llm.pretrained}
        return model

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, overrides: Mapping[str, Any] | None = None
    ) -> LlavaModel:
        """Load a directory written by `save_pretrained` without any network or other directory.

        `overrides`: dotted model-config keys (`{"vision.extra.object_regularizer": 0.0}`) applied to the
        saved config before the model is built (a training recipe's `model_overrides`, named so in errors)."""
        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise CheckpointError(f"{path}: no {CONFIG_NAME}; not a unillava model directory")
        try:
            meta = json.loads(config_file.read_text())
            config = from_dict(ModelConfig, meta["model"], where=f"{config_file}:model")
            llm_hf_config = meta["llm_hf_config"]
            vision_hf_config = meta["vision_hf_config"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{config_file}: malformed ({err})") from None
        config.vision.pretrained = None
        config.vision.hf_config = vision_hf_config
        if overrides:
            config = override_dataclass(config, overrides, where="model_overrides")
        if cls is LlavaModel:
            cls = model_class_for(config)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{path}: missing {WEIGHTS_NAME}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if "base" in meta:
            model = cls._from_base(path, config, meta, tokenizer, dtype)
        else:
            tower = build_vision_tower(config.vision)
            language_model = build_language_model_from_config(llm_hf_config, dtype=dtype)
            model = cls(config, tower, language_model, tokenizer)
            model.load_state_dict_checked(load_file(weights), source=str(weights))
        model.sources = dict(meta.get("sources") or {})
        return model.to(dtype)

    @classmethod
    def build_base(
        cls,
        config: ModelConfig,
        sources: Mapping[str, str],
        tokenizer,
        base_dtype: torch.dtype,
        adapter: Path | None = None,
    ) -> tuple[LlavaModel, int]:
        """The pretrained tower and LLM as a run held them: parameters in `base_dtype` (buffers, such as
        RoPE's, keep full precision), the LoRA `adapter` merged in that dtype. Also returns the LLM's
        vocabulary size before the model's tokens were added (a compact directory stores the new rows)."""
        config.vision.pretrained = sources["vision"]
        tower = build_vision_tower(config.vision)
        language_model, _ = load_language_model(LLMConfig(pretrained=sources["llm"]))
        vocab = language_model.get_input_embeddings().num_embeddings
        model = cls(config, tower, language_model, tokenizer)
        for param in model.parameters():
            param.data = param.data.to(base_dtype)
        if adapter is not None:
            model.language_model = PeftModel.from_pretrained(model.language_model, adapter).merge_and_unload()
        return model, vocab

    @classmethod
    def _from_base(
        cls, path: Path, config: ModelConfig, meta: dict[str, Any], tokenizer, dtype: torch.dtype
    ) -> LlavaModel:
        """A compact directory (`unillava.hub.compact`): the tower and the LLM come from their named
        sources, the LoRA adapter in `adapter/` is merged in the dtype the run merged it in, and
        `model.safetensors` holds only the tensors that differ from that base (new token rows as rows)."""
        base = meta["base"]
        adapter = path / base["adapter"] if base.get("adapter") else None
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise CheckpointError(f"{adapter}: missing adapter_config.json (the LoRA adapter of this model)")
        try:
            model, _ = cls.build_base(config, base, tokenizer, getattr(torch, base["dtype"]), adapter)
        except KeyError as err:
            raise CheckpointError(f"{path / CONFIG_NAME}: base is missing {err}") from None
        model = model.to(dtype)
        weights = path / WEIGHTS_NAME
        stored = load_file(weights)
        own = model.state_dict()
        unknown = sorted(k for k in stored if k not in own)
        if unknown:
            raise CheckpointError(
                f"{weights}: {len(unknown)} key(s) the model does not have: {key_list(unknown)}"
            )
        for key, start in base.get("rows", {}).items():
            full = own[key].clone()
            if key not in stored or full.shape[0] - start != stored[key].shape[0]:
                raise CheckpointError(f"{weights}: {key} should hold rows {start}.. of {tuple(full.shape)}")
            full[start:] = stored[key].to(full.dtype)
            stored[key] = full
        model.load_state_dict(stored, strict=False)
        model.language_model.tie_weights()
        model.merged_adapter = adapter
        return model

    def load_state_dict_checked(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load weights, naming missing and unexpected keys; tied LM-head weights may be absent."""
        check_state_dict(self.state_dict(), state, source, optional=set(self._tied_keys()))
        self.load_state_dict(state, strict=False)
        self.language_model.tie_weights()

    def _tied_keys(self) -> list[str]:
        """State-dict keys of output embeddings that share storage with the input embeddings."""
        out = self.language_model.get_output_embeddings()
        inp = self.language_model.get_input_embeddings()
        if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
            return []
        return [
            f"language_model.{name}.weight"
            for name, module in self.language_model.named_modules()
            if module is out
        ]

    def save_pretrained(self, path: str | Path) -> None:
        """Write config, tokenizer and one safetensors file; the directory is complete on its own."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model_config = asdict(self.config)
        model_config["vision"]["pretrained"] = None
        model_config["vision"]["hf_config"] = None
        model_config["llm"] = {"pretrained": None, "hf_config": None, "tokenizer": None}
        if model_config["template"] == "auto":  # record the prompt format the model was trained with
            model_config["template"] = resolve_template_name("auto", self.tokenizer)
        meta: dict[str, Any] = {
            "format": "unillava",
            "format_version": FORMAT_VERSION,
            "model": model_config,
            "vision_hf_config": self.vision_tower.hf_config_dict(),
            "llm_hf_config": self.language_model.config.to_dict(),
            # where the tower's and the LLM's weights started from (a compact export refers to them)
            "sources": self.sources,
        }
        tied = set(self._tied_keys())
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in tied}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(path)
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=str))

    # -- forward -----------------------------------------------------------------------------------

    def cache_tower_features(self, enable: bool = True) -> None:
        """Reuse a frozen tower's features per image (training epochs and stages, repeated evaluations).

        Refused while any tower parameter trains: its features change with every step."""
        if enable and any(p.requires_grad for p in self.vision_tower.parameters()):
            raise ValueError("the vision tower trains, so its features cannot be cached")
        self.feature_cache = FeatureCache.for_tower(self.vision_tower) if enable else None

    def batch_fields(self) -> BatchFields:
        """What the training dataset adds to each sample and batch for this model: nothing here."""
        return BatchFields()

    def loss_counts(self, inputs: Mapping[str, Any]) -> dict[str, int]:
        """Each loss part's count for one batch of forward inputs (with labels), known before the forward:
        the trainer sums them over the global batch to scale every micro-batch's backward. The keys are
        the same for every batch, whichever parts its forward returns."""
        return {TEXT_LOSS: supervised_tokens(inputs["labels"])}

    def encode_images(self, images: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Per-image projected features, each (tokens_i, llm_hidden)."""
        if self.feature_cache is not None:
            features = self.feature_cache(self.vision_tower, images)
        else:
            features = self.vision_tower(images)
        return [self.projector(f) for f in features]

    def embed_inputs(self, input_ids: torch.Tensor, images: list[torch.Tensor] | None) -> torch.Tensor:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        features = self.encode_images(images) if images is not None and len(images) else []
        return splice_image_features(embeds, input_ids, self.image_token_id, features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        loss_reduction: str | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """With `loss_reduction="sum"` (training), logits are computed only where a label is supervised and
        `loss` is the summed next-token cross-entropy in float32, also given as `loss_parts["text_ce"]`;
        `logits` is then None. That skips the vocabulary projection of every prompt and image position, a
        large share of a small LLM's compute.
        """
        inputs_embeds = self.embed_inputs(input_ids, images)
        if loss_reduction is None:
            return self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
            )
        if loss_reduction != "sum" or labels is None:
            raise ValueError('loss_reduction="sum" is the only reduction and needs labels')
        hidden = self.language_model.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        ).last_hidden_state
        loss, count = supervised_token_loss(self.language_model, hidden, labels, "sum")
        return LlavaOutput(loss=loss, loss_parts={TEXT_LOSS: LossPart(loss, count)})

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: list[torch.Tensor] | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids only (the prompt is given as embeddings, so it is not echoed)."""
        inputs_embeds = self.embed_inputs(input_ids, images)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype


def supervised_token_loss(
    language_model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy (float32) over the supervised positions only, and their count: only
    those hidden states are projected onto the vocabulary."""
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    logits = language_model.get_output_embeddings()(hidden[:, :-1][supervised])
    return F.cross_entropy(logits.float(), targets[supervised], reduction=reduction), int(supervised.sum())


def ensure_image_token(tokenizer, language_model: nn.Module, image_token: str) -> int:
    """Add the image token as a special token if the tokenizer lacks it, growing the embeddings."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id >= language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return token_id
