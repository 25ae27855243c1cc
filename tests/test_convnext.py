"""ConvNeXt tower (ConvLLaVA): token counts, the size policy, stage 5, partial unfreezing, checkpoint layouts.

Every layout test compares against transformers' own `ConvNextModel` (last hidden state, flattened), so a
wrong key mapping cannot hide behind a shape that happens to fit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from unillava.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig, load_config
from unillava.conversation import Message, split_image_markers
from unillava.errors import CheckpointError, ConfigError
from unillava.hub import detect_layout, export_hf, load_model
from unillava.llm import EMBEDDED_DEFAULT
from unillava.modeling import LlavaModel
from unillava.processor import Processor
from unillava.testing import tiny_llama_config
from unillava.training.config import TrainConfig
from unillava.vision import build_vision_tower
from unillava.vision.convnext import ConvNeXtTower, convert_timm_convnext, load_convnext_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEPTHS = [1, 2, 1, 1, 1]
WIDTHS = [8, 16, 32, 64, 128]
SIZE = 128
STAGE5 = {"depth": 1, "width": 128}


def _hf_config(stages: int = 5) -> dict:
    return {
        "depths": DEPTHS[:stages],
        "hidden_sizes": WIDTHS[:stages],
        "num_stages": stages,
        "layer_norm_eps": 1e-6,
    }


def _reference(stages: int = 5, seed: int = 0) -> ConvNextModel:
    torch.manual_seed(seed)
    model = ConvNextModel(ConvNextConfig(**_hf_config(stages))).eval()
    with torch.no_grad():  # random layer scales so every block visibly contributes
        for name, param in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                param.uniform_(0.5, 1.5)
    return model


def _reference_features(model: ConvNextModel, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        last = model(pixels, output_hidden_states=True).hidden_states[-1]
    return last.flatten(2).transpose(1, 2)


def _tower(**fields) -> ConvNeXtTower:
    fields.setdefault("hf_config", _hf_config())
    fields.setdefault("select_layer", -1)
    fields.setdefault("image_size", SIZE)
    return build_vision_tower(VisionConfig(type="convnext", **fields)).eval()  # type: ignore[return-value]


def _pixels(height: int = SIZE, width: int = SIZE, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def _assert_matches(
    tower: ConvNeXtTower, reference: ConvNextModel, height: int = SIZE, width: int = SIZE
) -> None:
    pixels = _pixels(height, width)
    with torch.no_grad():
        ours = tower.encode_batch(pixels)
    expected = _reference_features(reference, pixels)
    assert ours.shape == (2, tower.num_tokens(height, width), tower.hidden_size)
    assert (ours - expected).abs().max().item() < 1e-5


# -- token counts and the size policy ---------------------------------------------------------------


def test_token_counts_follow_the_stride():
    five, four = _tower(), _tower(hf_config=_hf_config(4))
    assert (five.stride, four.stride) == (64, 32)
    assert [five.num_tokens(s, s) for s in (768, 1024, 1536)] == [144, 256, 576]
    assert four.num_tokens(768, 768) == 576
    assert five.num_tokens(768, 1536) == 2 * five.num_tokens(768, 768)
    assert five.hidden_size == 128 and four.hidden_size == 64


@pytest.mark.parametrize("size", [(100, 128), (128, 0), (32, 32), (-64, 64)])
def test_impossible_sizes_are_refused_with_the_policy(size):
    tower = _tower()
    with pytest.raises(ConfigError, match="multiples of 64"):
        tower.num_tokens(*size)
    if min(size) > 0:
        with pytest.raises(ConfigError, match="multiples of 64"):
            tower.encode_batch(torch.zeros(1, 3, *size))


def test_settings_the_preprocessor_cannot_satisfy_are_refused():
    with pytest.raises(ConfigError, match="use 960 or 1024"):
        _tower(image_size=1000)
    with pytest.raises(ConfigError, match="multiple of the ConvNeXt stride 64"):
        _tower(image_mode="any", extra={"multiple_of": 32})
    with pytest.raises(ConfigError, match="select_layer"):
        _tower(select_layer=-2)
    with pytest.raises(ConfigError, match="unknown key"):
        _tower(extra={"add_stage_5": STAGE5})
    with pytest.raises(ConfigError, match="unfreeze_from_stage"):
        _tower(extra={"unfreeze_from_stage": 6})
    with pytest.raises(ConfigError, match="num_stages 4 but 5 depths"):
        _tower(hf_config={**_hf_config(), "num_stages": 4})
    assert _tower(image_mode="any").config.extra["multiple_of"] == 64


def test_a_five_stage_config_without_num_stages_keeps_stage_five():
    config = _hf_config()
    del config["num_stages"]
    assert _tower(hf_config=config).stride == 64


# -- stage 5 and partial unfreezing ------------------------------------------------------------------


def test_added_stage5_starts_near_identity_and_keeps_earlier_stages():
    four = _reference(stages=4)
    tower = _tower(hf_config=_hf_config(4), extra={"add_stage5": {**STAGE5, "layer_scale_init": 1e-6}})
    tower.model.load_state_dict(
        {k: v for k, v in four.state_dict().items() if not k.startswith("layernorm.")}, strict=False
    )
    assert tower.stride == 64 and tower.hidden_size == 128
    stage5 = tower.model.encoder.stages[4]
    assert len(stage5.layers) == 1 and len(stage5.downsampling_layer) == 2
    assert torch.all(stage5.layers[0].layer_scale_parameter == 1e-6)
    pixels = _pixels()
    with torch.no_grad():
        ours = tower.model(pixels, output_hidden_states=True).hidden_states
        downsampled = stage5.downsampling_layer[1](stage5.downsampling_layer[0](ours[4]))
    assert (ours[4] - four(pixels).last_hidden_state).abs().max().item() < 1e-5
    assert (ours[5] - downsampled).abs().max().item() < 1e-4  # blocks ~ identity at layer scale 1e-6
    # The saved config already has stage 5: rebuilding with the same `add_stage5` must not add a sixth.
    again = _tower(hf_config=tower.hf_config_dict(), extra={"add_stage5": STAGE5})
    assert again.model.config.num_stages == 5
    with pytest.raises(ConfigError, match="only be added to a 4-stage"):
        _tower(hf_config=tower.hf_config_dict(), extra={"add_stage5": {"depth": 2, "width": 128}})


def _trainable(tower: ConvNeXtTower) -> set[str]:
    prefixes = set()
    for name, param in tower.named_parameters():
        if param.requires_grad:
            prefixes.add(re.sub(r"^model\.(encoder\.stages\.\d+|embeddings|layernorm).*$", r"\1", name))
    return prefixes


def test_unfreeze_from_stage_trains_only_later_stages():
    stages = {f"encoder.stages.{i}" for i in range(5)}
    tower = _tower(trainable=True, extra={"unfreeze_from_stage": 3})
    assert _trainable(tower) == {"encoder.stages.2", "encoder.stages.3", "encoder.stages.4"}
    tower.requires_grad_(False)
    assert _trainable(tower) == set()
    tower.requires_grad_(True)  # what the trainer does with train_vision: the same partial unfreezing
    assert _trainable(tower) == {"encoder.stages.2", "encoder.stages.3", "encoder.stages.4"}
    tower.set_unfreeze_from_stage(5)
    assert _trainable(tower) == {"encoder.stages.4"} and tower.config.extra["unfreeze_from_stage"] == 5
    assert _trainable(_tower(trainable=True)) == stages | {"embeddings"}  # the unused final norm stays frozen
    assert _trainable(_tower(trainable=True, extra={"unfreeze_from_stage": 0})) == stages | {"embeddings"}
    assert _trainable(_tower(trainable=False, extra={"unfreeze_from_stage": 3})) == set()


# -- checkpoint layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("stages", [4, 5])
def test_transformers_directory(tmp_path, stages):
    reference = _reference(stages)
    reference.save_pretrained(tmp_path)
    tower = _tower(pretrained=str(tmp_path), hf_config=None)
    assert tower.stride == (64 if stages == 5 else 32)
    _assert_matches(tower, reference, SIZE, 2 * SIZE)


def test_convllava_tower_quirks_and_classifier_checkpoints(tmp_path):
    reference = _reference()
    # ConvLLaVA appends stage 5 without resizing the (unused) final norm, and may omit num_stages' peers.
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("layernorm.")}
    state.update({"layernorm.weight": torch.ones(64), "layernorm.bias": torch.zeros(64)})
    quirky = tmp_path / "convllava"
    quirky.mkdir()
    config = {**reference.config.to_dict(), "out_features": ["stage5"], "architectures": ["ConvNextModel"]}
    (quirky / "config.json").write_text(json.dumps(config))
    save_file(state, str(quirky / "model.safetensors"))
    _assert_matches(_tower(pretrained=str(quirky), hf_config=None), reference)
    # An ImageNet classification checkpoint: weights under `convnext.`, classifier dropped.
    classifier = ConvNextForImageClassification(ConvNextConfig(**_hf_config(), num_labels=3))
    classifier.convnext.load_state_dict(reference.state_dict())
    classifier.save_pretrained(tmp_path / "cls")
    _assert_matches(_tower(pretrained=str(tmp_path / "cls"), hf_config=None), reference)


def test_transformers_directory_with_stray_or_missing_keys_is_refused(tmp_path):
    reference = _reference()
    reference.save_pretrained(tmp_path)
    state = dict(reference.state_dict())
    state["encoder.stages.4.layers.1.dwconv.weight"] = torch.zeros(128, 1, 7, 7)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unused key\(s\) \[encoder\.stages\.4\.layers\.1\.dwconv"):
        load_convnext_model(tmp_path)
    del state["encoder.stages.4.layers.1.dwconv.weight"], state["encoder.stages.0.layers.0.pwconv1.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"1 missing key\(s\) \[encoder\.stages\.0\.layers\.0\.pwconv1\.bias"
    ):
        load_convnext_model(tmp_path)


_TIMM_NAMES = [
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.gamma"),
    (r"^layernorm\.", "head.norm."),
]


def _timm_state(reference: ConvNextModel, prefix: str = "") -> dict[str, torch.Tensor]:
    """The reference's weights under timm's names, written out independently of the converter."""
    out = {}
    for key, tensor in reference.state_dict().items():
        for pattern, replacement in _TIMM_NAMES:
            new, n = re.subn(pattern, replacement, key)
            if n:
                out[prefix + new] = tensor.clone()
                break
        else:
            raise AssertionError(f"no timm name for {key}")
    return out


@pytest.mark.parametrize("stages", [4, 5])
def test_timm_state_dict_converts_with_inferred_geometry(tmp_path, stages):
    reference = _reference(stages)
    state = _timm_state(reference)
    state.update({"head.fc.weight": torch.zeros(10, WIDTHS[stages - 1]), "head.fc.bias": torch.zeros(10)})
    config, converted = convert_timm_convnext(state)
    assert list(config.depths) == DEPTHS[:stages] and list(config.hidden_sizes) == WIDTHS[:stages]
    assert config.num_stages == stages and config.patch_size == 4
    assert set(converted) == set(reference.state_dict())
    save_file(state, str(tmp_path / "timm.safetensors"))
    _assert_matches(_tower(pretrained=str(tmp_path / "timm.safetensors"), hf_config=None), reference)


def test_open_clip_trunk_is_found_under_its_prefix(tmp_path):
    reference = _reference(stages=4)
    state = _timm_state(reference, prefix="visual.trunk.")
    state.update(
        {
            "visual.head.mlp.fc1.weight": torch.zeros(4, 64),  # CLIP projection and text tower: not the trunk
            "text.token_embedding.weight": torch.zeros(10, 4),
            "logit_scale": torch.ones(()),
        }
    )
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    tower = _tower(pretrained=str(tmp_path), hf_config=None, extra={"add_stage5": STAGE5})
    pixels = _pixels()
    with torch.no_grad():
        stage4 = tower.model(pixels, output_hidden_states=True).hidden_states[4]
    assert (stage4 - reference(pixels).last_hidden_state).abs().max().item() < 1e-5


def test_timm_unknown_and_missing_keys_are_listed():
    state = _timm_state(_reference(stages=4), prefix="visual.trunk.")
    with pytest.raises(
        CheckpointError, match=r"unknown key\(s\) \[visual\.trunk\.stages\.0\.blocks\.0\.extra"
    ):
        convert_timm_convnext({**state, "visual.trunk.stages.0.blocks.0.extra.weight": torch.zeros(1)})
    del state["visual.trunk.stages.2.downsample.1.bias"]
    with pytest.raises(
        CheckpointError, match=r"missing key\(s\) \[encoder\.stages\.2\.downsampling_layer\.1\.bias"
    ):
        convert_timm_convnext(state)
    with pytest.raises(CheckpointError, match="no `stem.0.weight`"):
        convert_timm_convnext({"stages.0.blocks.0.gamma": torch.zeros(8)})


# -- whole models: ConvLLaVA's LLaVA layout, save/load, preprocessing, export ---------------------------


def _llama(vocab: int) -> LlamaConfig:
    kwargs = tiny_llama_config(vocab_size=vocab)
    del kwargs["model_type"]
    return LlamaConfig(**kwargs)


def _model_config(image_mode: str = "pad", **extra) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            type="convnext",
            hf_config=_hf_config(4),
            select_layer=-1,
            image_size=SIZE,
            image_mode=image_mode,
            extra={"add_stage5": STAGE5, **extra},
        ),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        llm=LLMConfig(pretrained=None, tokenizer=EMBEDDED_DEFAULT, hf_config=tiny_llama_config()),
        template="vicuna_v1",
        max_length=512,
    )


def test_convllava_original_layout_loads_trained_tower(tmp_path, make_tokenizer):
    tower_dir, llava_dir = tmp_path / "ConvLLaVA-ConvNeXt-128", tmp_path / "ConvLLaVA-sft-128"
    _reference(seed=1).save_pretrained(tower_dir)  # the tower repo; the LLM repo holds trained weights
    (tower_dir / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 256}, "crop_size": {"height": 256, "width": 256}})
    )
    trained = _reference(seed=2)
    tokenizer = make_tokenizer()
    llm = LlamaForCausalLM(_llama(len(tokenizer))).eval()
    llm_config = llm.config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "dtype"):
        llm_config.pop(key, None)
    llava_dir.mkdir()
    (llava_dir / "config.json").write_text(
        json.dumps(
            {
                **llm_config,
                "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava_llama",
                "mm_vision_tower": str(tower_dir),
                "mm_hidden_size": 128,
                "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -1,
                "mm_vision_resolution": SIZE,
                "image_aspect_ratio": "pad",
                "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False,
            }
        )
    )
    tokenizer.save_pretrained(llava_dir)
    state = {k: v for k, v in llm.state_dict().items() if k != "lm_head.weight"}  # tied to the embeddings
    state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in trained.state_dict().items()})
    projector = {"0.weight": (64, 128), "0.bias": (64,), "2.weight": (64, 64), "2.bias": (64,)}
    state.update({f"model.mm_projector.{k}": torch.randn(shape) * 0.1 for k, shape in projector.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(llava_dir / "model.safetensors"))

    assert detect_layout(llava_dir) == "original_llava"
    model = load_model(llava_dir)
    assert model.config.vision.type == "convnext" and model.config.vision.image_size == SIZE
    _assert_matches(model.vision_tower, trained)
    assert torch.equal(model.projector[0].weight, state["model.mm_projector.0.weight"])


@pytest.fixture(scope="module")
def any_mode_model() -> LlavaModel:
    torch.manual_seed(0)
    return LlavaModel.from_config(_model_config(image_mode="any", max_long_side=4 * SIZE)).eval()


def test_extreme_tiny_and_huge_images_get_valid_sizes(any_mode_model):
    processor = Processor.for_model(any_mode_model)
    sizes = [(20, 200), (12, 9), (3000, 2000), (6000, 500)]  # 1:10, tiny, huge, huge and 12:1
    pixels = processor.preprocess_images([Image.new("RGB", size, "red") for size in sizes])
    assert [tuple(p.shape[-2:]) for p in pixels] == [(512, 64), (128, 192), (128, 192), (64, 512)]
    counts = [any_mode_model.vision_tower.num_tokens(*p.shape[-2:]) for p in pixels]
    assert counts == [8, 6, 6, 8]
    messages = [Message("user", split_image_markers("<image><image><image><image>\nDescribe."))]
    encoded = processor.encode(messages, pixels, add_generation_prompt=True)
    batch = processor.collate([encoded], [pixels], padding_side="left")
    with torch.no_grad():
        out = any_mode_model(**batch.model_inputs())
    assert out.logits.shape[1] == len(encoded.input_ids)


def test_save_and_load_gives_identical_outputs(any_mode_model, tmp_path):
    any_mode_model.save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.vision_tower.model.config.num_stages == 5
    assert loaded.config.vision.extra["multiple_of"] == 64
    processor = Processor.for_model(loaded)
    pixels = processor.preprocess_images([Image.new("RGB", (200, 100), "green")])
    messages = [Message("user", split_image_markers("<image>\nWhat colour?"))]
    batch = processor.collate([processor.encode(messages, pixels, True)], [pixels], padding_side="left")
    with torch.no_grad():
        before = any_mode_model(**batch.model_inputs()).logits
        after = loaded(**batch.model_inputs()).logits
    assert torch.equal(before, after)


def test_export_to_llava_hf_is_refused(any_mode_model, tmp_path):
    with pytest.raises(CheckpointError, match="'convnext' tower"):
        export_hf(any_mode_model, tmp_path / "hf")
    assert not Path(tmp_path / "hf" / "model.safetensors").exists()


# -- recipes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [768, 1024, 1536])
def test_convllava_recipes_follow_the_paper(resolution):
    s1, s2, s3 = (
        load_config(TrainConfig, CONFIGS / f"convllava-{resolution}/stage{i}.yaml") for i in (1, 2, 3)
    )
    assert s1.model is not None
    vision = s1.model.vision
    assert (vision.type, vision.image_size, vision.image_mode, vision.select_layer) == (
        "convnext",
        resolution,
        "pad",
        -1,
    )
    assert vision.extra == {
        "add_stage5": {"depth": 6, "width": 3072, "layer_scale_init": 1e-6},
        "unfreeze_from_stage": 5,
    }
    assert (s1.train_vision, s1.train_projector, s1.train_llm, s1.lr, s1.global_batch_size) == (
        True,
        True,
        "none",
        3e-4,
        256,
    )
    assert (s2.init_from, s2.train_vision, s2.train_llm, s2.lr) == (
        f"runs/convllava-{resolution}-stage1/model",
        True,
        "full",
        2e-5,
    )
    assert (s3.init_from, s3.train_vision, s3.train_llm, s3.lr, s3.global_batch_size) == (
        f"runs/convllava-{resolution}-stage2/model",
        False,
        "full",
        2e-5,
        128,
    )
    assert all((c.epochs, c.warmup_ratio, c.lr_scheduler) == (1, 0.03, "cosine") for c in (s1, s2, s3))


def test_tiny_convllava_config_builds_a_stride_64_model():
    config = load_config(TrainConfig, CONFIGS / "tiny/convllava.yaml")
    assert config.model is not None
    tower = build_vision_tower(config.model.vision)
    assert tower.num_tokens(128, 128) == 4 and tower.hidden_size == 128


def test_stage2_recipe_key_unfreezes_from_stage3(tmp_path):
    """A stage-1 model saved with `unfreeze_from_stage: 5` trains stages 3-5 in stage 2 via the recipe key."""
    from unillava.training.config import DataConfig
    from unillava.training.trainer import Trainer

    torch.manual_seed(0)
    stage1 = LlavaModel.from_config(_model_config(unfreeze_from_stage=5))
    stage1.save_pretrained(tmp_path / "stage1")
    data = tmp_path / "data.jsonl"
    Image.new("RGB", (SIZE, SIZE), "red").save(tmp_path / "red.png")
    record = {
        "id": "a",
        "image": "red.png",
        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}],
    }
    data.write_text(json.dumps(record) + "\n")
    config = TrainConfig(
        init_from=str(tmp_path / "stage1"),
        data=DataConfig(train_files=[str(data)], image_root=str(tmp_path), num_workers=0),
        train_vision=True,
        vision_unfreeze_from_stage=3,
        max_steps=1,
        per_device_batch_size=1,
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    encoder = Trainer(config).model.vision_tower.model.encoder
    trainable = {name.split(".")[1] for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"2", "3", "4"}  # zero-based: stages 3, 4 and 5


def test_layer_wise_lr_decay_gives_each_stage_its_own_lr():
    """vision_lr_layer_decay d: stage 5 at vision_lr, each stage below one more factor d, the stem d^5."""
    from unillava.training.trainer import param_groups

    torch.manual_seed(0)
    model = LlavaModel.from_config(_model_config(unfreeze_from_stage=3))
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.vision_tower.requires_grad_(True)
    config = TrainConfig(model=_model_config(), lr=1e-2, vision_lr=1e-3, vision_lr_layer_decay=0.5)
    config.data.train_files = ["unused.jsonl"]
    config.validate()
    groups = {g["name"]: g for g in param_groups(model, config)}
    assert {name: g["lr"] for name, g in groups.items()} == pytest.approx(
        {"projector": 1e-2, "vision.depth0": 1e-3, "vision.depth1": 5e-4, "vision.depth2": 2.5e-4}
    )
    stages = model.vision_tower.model.encoder.stages
    for index, depth in ((4, 0), (3, 1), (2, 2)):  # zero-based stages 5, 4, 3
        params = groups[f"vision.depth{depth}"]["params"]
        assert {id(p) for p in stages[index].parameters()} == {id(p) for p in params}

    model.vision_tower.set_unfreeze_from_stage(0)  # the whole tower; weight decay splits each stage in two
    config.weight_decay = 0.1
    lrs = {g["name"]: g["lr"] for g in param_groups(model, config)}
    assert lrs["vision.depth5"] == lrs["vision.depth5.no_decay"] == pytest.approx(1e-3 * 0.5**5)  # the stem
    assert len([n for n in lrs if n.startswith("vision.")]) == 12
    config.vision_lr_layer_decay = 1.0  # off: one vision group, as without the field
    names = {g["name"] for g in param_groups(model, config)}
    assert names == {"projector", "projector.no_decay", "vision", "vision.no_decay"}
    config.vision_lr_layer_decay = 1.5
    with pytest.raises(ConfigError, match="vision_lr_layer_decay"):
        config.validate()


def test_layer_wise_lr_decay_needs_a_staged_tower():
    from unillava.training.trainer import param_groups

    config = load_config(TrainConfig, CONFIGS / "tiny/stage1.yaml")
    assert config.model is not None
    config.vision_lr_layer_decay = 0.8
    with pytest.raises(ConfigError, match="'clip' tower has no stages"):
        param_groups(LlavaModel.from_config(config.model), config)
