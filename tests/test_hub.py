"""Hub interop: read llava-hf and original-LLaVA checkpoints, write llava-hf, and match transformers' outputs.

Every checkpoint here is tiny and random, written the way its producer writes it (transformers'
`save_pretrained`, or by hand as the original LLaVA code would), then compared logit by logit with a
`LlavaForConditionalGeneration` holding the same weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

import unillava
import unillava.cli as cli
from unillava.config import VisionConfig
from unillava.conversation import Message, user_message
from unillava.errors import CheckpointError, UnillavaError
from unillava.hub import detect_layout, export_hf, load_model, tower_config_from_dir
from unillava.inference import GenerationSettings
from unillava.modeling import LlavaModel
from unillava.processor import Processor
from unillava.testing import tiny_clip_config, tiny_llama_config, tiny_model_config
from unillava.vision import TOWERS, VisionTower

N_PATCHES = 16  # 32px images, 8px patches
MEAN = [0.5, 0.4, 0.3]
STD = [0.2, 0.25, 0.3]


def _llama(vocab_size: int, tie: bool = False) -> LlamaConfig:
    settings = tiny_llama_config(vocab_size=vocab_size)
    settings.pop("model_type")
    settings["tie_word_embeddings"] = tie
    return LlamaConfig(**settings)


def _inputs(image_token_id: int, n_tokens: int, seed: int = 0):
    """Two prompts with one image each, the second left-padded; ids, mask and (2, 3, 32, 32) pixels."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(100, 40000, (2, 5), generator=g)
    image = torch.full((2, n_tokens), image_token_id)
    ids = torch.cat([text[:, :3], image, text[:, 3:]], dim=1)
    mask = torch.ones_like(ids)
    ids[1, :2] = 0
    mask[1, :2] = 0
    return ids, mask, torch.randn(2, 3, 32, 32, generator=g)


def _assert_same_outputs(
    ours: LlavaModel, ref: LlavaForConditionalGeneration, image_token_id: int, n_tokens: int
):
    ids, mask, pixels = _inputs(image_token_id, n_tokens)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, images=list(pixels)).logits
        want = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    keep = mask.bool()
    assert (got[keep] - want[keep]).abs().max().item() < 1e-4
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    new_ours = ours.generate(ids, attention_mask=mask, images=list(pixels), **settings)
    new_ref = ref.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **settings)[
        :, ids.shape[1] :
    ]
    assert new_ours.tolist() == new_ref.tolist()


# ---------------------------------------------------------------------------------------------------
# llava-hf layout
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory, make_tokenizer):
    """A random tiny LlavaForConditionalGeneration saved by transformers, with its tokenizer."""
    tokenizer = make_tokenizer("<image>")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**tiny_clip_config()),
        text_config=_llama(len(tokenizer)),
        image_token_index=image_token_id,
        image_seq_length=N_PATCHES,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("llava_hf_base")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, image_token_id, tokenizer


def _copy(base: Path, target: Path) -> Path:
    shutil.copytree(base, target)
    return target


def _rewrite_weights(folder: Path, rename, shards: int = 1, as_bin: bool = False) -> None:
    state = {rename(k): v for k, v in load_file(folder / "model.safetensors").items()}
    (folder / "model.safetensors").unlink()
    if as_bin:
        torch.save(state, folder / "pytorch_model.bin")
        return
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def _new_nesting(key: str) -> str:
    key = re.sub(r"^language_model\.lm_head\.", "lm_head.", key)
    key = re.sub(r"^language_model\.model\.", "model.language_model.", key)
    return re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", key)


def _published(key: str) -> str:
    return re.sub(r"^vision_tower\.", "vision_tower.vision_model.", key)


def _save_processor(folder: Path, tokenizer, do_pad: bool) -> None:
    image_processor = LlavaImageProcessorPil(
        size={"height": 32, "width": 32},
        do_center_crop=False,
        do_pad=do_pad,
        image_mean=MEAN,
        image_std=STD,
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(folder)


def test_llava_hf_as_transformers_writes_it(hf_reference, tmp_path):
    base, ref, image_token_id, tokenizer = hf_reference
    folder = _copy(base, tmp_path / "hf")
    _save_processor(folder, tokenizer, do_pad=True)
    assert detect_layout(folder) == "llava_hf"
    model = load_model(folder)
    assert model.image_token_id == image_token_id
    vision = model.config.vision
    assert (vision.image_size, vision.image_mode, vision.select_layer, vision.select_feature) == (
        32,
        "pad",
        -2,
        "patch",
    )
    assert vision.image_mean == MEAN and vision.image_std == STD
    assert model.config.template == "chat_template"
    _assert_same_outputs(model, ref, image_token_id, N_PATCHES)


def test_llava_hf_new_nesting_sharded(hf_reference, tmp_path):
    base, ref, image_token_id, tokenizer = hf_reference
    folder = _copy(base, tmp_path / "hf")
    _rewrite_weights(folder, _new_nesting, shards=3)
    _save_processor(folder, tokenizer, do_pad=False)
    model = load_model(folder)
    assert model.config.vision.image_mode == "resize"
    _assert_same_outputs(model, ref, image_token_id, N_PATCHES)


def test_llava_hf_published_layout_bin(hf_reference, tmp_path):
    """Key names, config and preprocessor file as on the hub (transformers 4.36), weights as a .bin."""
    base, ref, image_token_id, tokenizer = hf_reference
    folder = _copy(base, tmp_path / "hf")
    _rewrite_weights(folder, _published, as_bin=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        {"ignore_index": -100, "vocab_size": config["text_config"]["vocab_size"], "torch_dtype": "float32"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True,
        "image_mean": MEAN,
        "image_std": STD,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    with pytest.warns(UserWarning, match="no chat template; using the 'vicuna_v1' template"):
        model = load_model(folder)
    assert model.config.vision.image_mode == "center_crop"
    assert model.config.template == "vicuna_v1"
    _assert_same_outputs(model, ref, image_token_id, N_PATCHES)


def test_llava_hf_bad_weights_are_named(hf_reference, tmp_path):
    base, _, _, _ = hf_reference
    stray = _copy(base, tmp_path / "stray")
    state = load_file(stray / "model.safetensors")
    state["multi_modal_projector.linear_3.weight"] = torch.zeros(2)
    del state["language_model.model.norm.weight"]
    save_file(state, stray / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(stray)
    message = str(err.value)
    assert (
        "multi_modal_projector.linear_3.weight" in message and "language_model.model.norm.weight" in message
    )

    no_weights = _copy(base, tmp_path / "none")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_model(no_weights)

    wrong_token = _copy(base, tmp_path / "token")
    config = json.loads((wrong_token / "config.json").read_text())
    config["image_token_index"] = 5
    (wrong_token / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="image_token_index=5"):
        load_model(wrong_token)


# ---------------------------------------------------------------------------------------------------
# Original LLaVA layout
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original_parts(tmp_path_factory, make_tokenizer):
    """A CLIP tower directory, a base LLM directory, a projector and a trained-tower variant, all random."""
    root = tmp_path_factory.mktemp("original")
    torch.manual_seed(1)
    clip = CLIPVisionModel(CLIPVisionConfig(**tiny_clip_config())).eval()
    clip_dir = root / "clip"
    clip.save_pretrained(clip_dir)
    preprocessor = {
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True,
    }
    (clip_dir / "preprocessor_config.json").write_text(
        json.dumps({**preprocessor, "image_mean": MEAN, "image_std": STD})
    )
    tokenizer = make_tokenizer()
    llm = LlamaForCausalLM(_llama(len(tokenizer))).eval()
    base_dir = root / "base"
    llm.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    projector = {
        "model.mm_projector.0.weight": torch.randn(64, 32) * 0.1,
        "model.mm_projector.0.bias": torch.randn(64) * 0.1,
        "model.mm_projector.2.weight": torch.randn(64, 64) * 0.1,
        "model.mm_projector.2.bias": torch.randn(64) * 0.1,
    }
    trained_tower = {k: v + 0.01 * torch.randn_like(v) for k, v in clip.state_dict().items()}
    return {
        "root": root,
        "clip": clip,
        "clip_dir": clip_dir,
        "llm": llm,
        "base_dir": base_dir,
        "tokenizer": tokenizer,
        "projector": projector,
        "trained_tower": trained_tower,
    }


def _original_config(parts, tower: str) -> dict:
    llm = parts["llm"].config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "dtype"):
        llm.pop(key, None)
    return {
        **llm,
        "_name_or_path": str(parts["base_dir"]),
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "torch_dtype": "float32",
        "mm_vision_tower": tower,
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 32,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "tokenizer_model_max_length": 512,
        "tokenizer_padding_side": "right",
    }


def _write_original(parts, folder: Path, trained_tower: bool, tower: str | None = None) -> Path:
    """Config, tokenizer and sharded `pytorch_model-*.bin` with an index, as LLaVA-1.5's releases have."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_original_config(parts, tower or str(parts["clip_dir"]))))
    parts["tokenizer"].save_pretrained(folder)
    state = {k: v.clone() for k, v in parts["llm"].state_dict().items()}
    state.update(parts["projector"])
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # saved by old transformers
    if trained_tower:
        state.update(
            {
                f"model.vision_tower.vision_tower.vision_model.{k}": v
                for k, v in parts["trained_tower"].items()
            }
        )
    keys = sorted(state)
    weight_map = {}
    for i, chunk in enumerate((keys[::2], keys[1::2])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in chunk}, folder / name)
        weight_map.update(dict.fromkeys(chunk, name))
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


def _reference_for_original(parts, ours: LlavaModel, trained_tower: bool) -> LlavaForConditionalGeneration:
    """The llava-hf model with the same weights, assembled by hand, plus our added `<image>` row."""
    vocab = parts["llm"].config.vocab_size
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**tiny_clip_config()),
        text_config=_llama(vocab + 1),
        image_token_index=vocab,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    ref = LlavaForConditionalGeneration(config).eval()
    tower = parts["trained_tower"] if trained_tower else parts["clip"].state_dict()
    state = {f"model.vision_tower.{k}": v for k, v in tower.items()}
    for k, v in parts["llm"].state_dict().items():
        state[k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k] = v
    for ours_name, key in (("0", "linear_1"), ("2", "linear_2")):
        for what in ("weight", "bias"):
            state[f"model.multi_modal_projector.{key}.{what}"] = parts["projector"][
                f"model.mm_projector.{ours_name}.{what}"
            ]
    for key, module in (
        ("model.language_model.embed_tokens.weight", ours.language_model.get_input_embeddings()),
        ("lm_head.weight", ours.language_model.get_output_embeddings()),
    ):
        assert torch.allclose(module.weight[vocab], state[key].mean(dim=0), atol=1e-6)
        state[key] = torch.cat([state[key], module.weight[vocab:].detach()])
    ref.load_state_dict(state, strict=True)
    return ref


@pytest.mark.parametrize("trained_tower", [False, True])
def test_original_llava_matches_hand_converted_reference(original_parts, tmp_path, trained_tower):
    folder = _write_original(original_parts, tmp_path / "llava", trained_tower)
    assert detect_layout(folder) == "original_llava"
    model = load_model(folder)
    vocab = original_parts["llm"].config.vocab_size
    assert model.image_token_id == vocab and model.tokenizer.convert_ids_to_tokens(vocab) == "<image>"
    assert model.config.vision.image_mean == MEAN and model.config.vision.image_mode == "pad"
    assert model.config.max_length == 512
    ref = _reference_for_original(original_parts, model, trained_tower)
    _assert_same_outputs(model, ref, vocab, N_PATCHES)


def test_original_stage1_projector_with_base_llm_and_hub_named_tower(original_parts, tmp_path):
    folder = tmp_path / "stage1"
    folder.mkdir()
    config = _original_config(original_parts, "openai/clip-vit-large-patch14-336")
    config["tune_mm_mlp_adapter"] = True
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(original_parts["projector"], folder / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="base_llm_path"):
        load_model(folder, vision_tower_path=original_parts["clip_dir"])
    with pytest.raises(CheckpointError, match="openai/clip-vit-large-patch14-336.*vision_tower_path"):
        load_model(folder, base_llm_path=original_parts["base_dir"])
    model = load_model(
        folder, base_llm_path=original_parts["base_dir"], vision_tower_path=original_parts["clip_dir"]
    )
    vocab = original_parts["llm"].config.vocab_size
    ref = _reference_for_original(original_parts, model, trained_tower=False)
    _assert_same_outputs(model, ref, vocab, N_PATCHES)


def test_tower_config_from_dir_dispatches_on_model_type(original_parts, tmp_path):
    vision = tower_config_from_dir(original_parts["clip_dir"])
    assert (vision.type, vision.pretrained, vision.image_size) == (
        "clip",
        str(original_parts["clip_dir"]),
        32,
    )
    other = tmp_path / "siglip"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(CheckpointError, match="siglip_vision_model.*known: clip"):
        tower_config_from_dir(other)


# ---------------------------------------------------------------------------------------------------
# Export to llava-hf
# ---------------------------------------------------------------------------------------------------


def _collapse(ids: list[int], image_token_id: int) -> list[int]:
    """Each run of image tokens as one, as a prompt has it before the processor expands it."""
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


def _picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 57, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("template", "vision", "shard_bytes"),
    [
        ("auto", {"select_feature": "patch", "image_mode": "pad"}, None),
        ("vicuna_v1", {"select_feature": "cls_patch", "image_mode": "resize"}, 2_000_000),
    ],
)
def test_export_loads_in_transformers_with_same_tokens_pixels_and_logits(
    tmp_path, template, vision, shard_bytes
):
    torch.manual_seed(2)
    model = LlavaModel.from_config(tiny_model_config(template=template, **vision)).eval()
    out = tmp_path / "exported"
    export_hf(model, out, **({"max_shard_bytes": shard_bytes} if shard_bytes else {}))
    assert (out / "model.safetensors.index.json").is_file() == bool(shard_bytes)

    ref, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    hf_inputs = processor(text=[text], images=[_picture()], return_tensors="pt")

    batch, _ = Processor.for_model(model).prompt_batch([[user_message("What is this?", 1)]], [[_picture()]])
    image_token_id = model.image_token_id
    ours_text = model.tokenizer.decode(_collapse(batch.input_ids[0].tolist(), image_token_id))
    assert ours_text == text
    if template == "auto":
        # Our vicuna_v1 tokenizes "<system> " and "USER: " separately, so only the text is compared there.
        assert hf_inputs["input_ids"].tolist() == batch.input_ids.tolist()
    assert torch.allclose(hf_inputs["pixel_values"][0], batch.images[0], atol=1e-6)
    with torch.no_grad():
        got = model(hf_inputs["input_ids"], images=batch.images).logits
        want = ref.eval()(**hf_inputs).logits
    assert (got - want).abs().max().item() < 1e-4
    n_tokens = model.vision_tower.num_tokens(32, 32)
    _assert_same_outputs(model, ref, model.image_token_id, n_tokens)

    back = load_model(out)
    assert back.config.template == (template if template != "auto" else "chat_template")
    assert (back.config.vision.select_feature, back.config.vision.image_mode) == (
        vision["select_feature"],
        vision["image_mode"],
    )
    with torch.no_grad():
        assert (back(hf_inputs["input_ids"], images=batch.images).logits - got).abs().max().item() < 1e-5


def test_export_refuses_what_llava_hf_cannot_represent(tmp_path):
    model = LlavaModel.from_config(tiny_model_config(projector="linear"))
    with pytest.raises(CheckpointError, match="'linear' projector.*mlp2x_gelu"):
        export_hf(model, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------
# Layout detection and the CLI
# ---------------------------------------------------------------------------------------------------


def test_unrecognised_directories_say_what_they_hold(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        load_model(tmp_path / "absent")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "file.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        load_model(empty)
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"found: notes\.txt"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"BertModel.*'bert'"):
        load_model(empty)


def test_cli_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", [cli.export_cmd])
    bad = tmp_path / "bad"
    bad.mkdir()
    assert cli.main(["export", "--to", "hf", str(bad), str(tmp_path / "out")]) == 2
    assert "not a model directory" in capsys.readouterr().err

    torch.manual_seed(3)
    ours = tmp_path / "ours"
    LlavaModel.from_config(tiny_model_config()).save_pretrained(ours)
    assert cli.main(["export", "--to", "hf", str(ours), str(tmp_path / "out")]) == 0
    assert detect_layout(tmp_path / "out") == "llava_hf"
    assert cli.main(["export", "--to", "hf", str(ours), str(tmp_path / "out")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# A loaded llava-hf checkpoint keeps its chat template and its preprocessing (transformers' outputs)
# ---------------------------------------------------------------------------------------------------

# llava-hf's own template (llava-1.5-7b-hf): typed content, images first, no system prompt, no BOS text.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' %}{{ '<image>' }}{% else %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _crop_checkpoint(hf_reference, folder: Path, template: str) -> Path:
    """The reference model saved with a CLIP-style processor (shortest edge + centre crop) and `template`."""
    base, _, _, tokenizer = hf_reference
    _copy(base, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(folder)
    return folder


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


CONVERSATIONS = {
    "single": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    "multi_turn": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": [{"type": "text", "text": "And its size?"}]},
    ],
    "multi_image": [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}],
        }
    ],
}


def _ours(messages: list[dict]) -> list:
    """The same conversation as unillava messages (images first, then a newline and the text)."""
    out = []
    for m in messages:
        n = sum(c["type"] == "image" for c in m["content"])
        text = "".join(c.get("text", "") for c in m["content"])
        out.append(user_message(text, n) if m["role"] == "user" else Message("assistant", [text]))
    return out


@pytest.mark.parametrize("template", [LLAVA_HF_TEMPLATE, CHATML_TEMPLATE])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_llava_hf_prompts_equal_the_processors(hf_reference, tmp_path, template, name):
    folder = _crop_checkpoint(hf_reference, tmp_path / "hf", template)
    model = load_model(folder)
    assert model.config.template == "processor_chat_template"
    processor = AutoProcessor.from_pretrained(folder)
    messages = CONVERSATIONS[name]
    images = [
        _image(40 + 9 * k, 32 + 13 * k, k)
        for k in range(sum(c["type"] == "image" for m in messages for c in m["content"]))
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = processor(text=[text], images=images, return_tensors="pt")
    batch, _ = Processor.for_model(model).prompt_batch([_ours(messages)], [images])
    assert batch.input_ids.tolist() == want["input_ids"].tolist()
    assert torch.equal(torch.stack(batch.images), want["pixel_values"])


@pytest.mark.parametrize("size", [(32, 32), (57, 40)])
def test_llava_hf_greedy_text_equals_transformers(hf_reference, tmp_path, size):
    """`unillava generate` on a checkpoint with a typed template and a cropping processor = transformers."""
    folder = _crop_checkpoint(hf_reference, tmp_path / "hf", LLAVA_HF_TEMPLATE)
    _, ref, _, _ = hf_reference
    image = _image(*size, seed=3)
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(CONVERSATIONS["single"], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    model = unillava.load(folder)
    stops = model.processor.stop_token_ids
    want = ref.generate(
        **inputs,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=model.tokenizer.pad_token_id,
    )[0, inputs["input_ids"].shape[1] :]
    got = model._run([_ours(CONVERSATIONS["single"])], [[image]], GenerationSettings(max_new_tokens=12))
    assert got[0].tolist() == want.tolist()


def test_round_trip_keeps_the_checkpoints_template_byte_for_byte(hf_reference, tmp_path):
    folder = _crop_checkpoint(hf_reference, tmp_path / "hf", LLAVA_HF_TEMPLATE)
    export_hf(load_model(folder), tmp_path / "out")
    assert AutoProcessor.from_pretrained(tmp_path / "out").chat_template == LLAVA_HF_TEMPLATE
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == LLAVA_HF_TEMPLATE
    assert (
        json.loads((tmp_path / "out" / "processor_config.json").read_text())["image_processor"][
            "do_center_crop"
        ]
        is True
    )
    back = load_model(tmp_path / "out")
    assert (back.config.template, back.config.vision.image_mode) == ("processor_chat_template", "center_crop")


def test_template_override_and_the_saved_template(hf_reference, tmp_path, tiny_model_dir):
    folder = _crop_checkpoint(hf_reference, tmp_path / "hf", LLAVA_HF_TEMPLATE)
    assert unillava.load(folder, template="vicuna_v1").processor.template.name == "vicuna_v1"
    with pytest.raises(UnillavaError, match="template: unknown 'nope'"):
        unillava.load(folder, template="nope")
    # our layout records the template it was trained with, never "auto"
    saved = json.loads((tiny_model_dir / "unillava_config.json").read_text())
    assert saved["model"]["template"] == "chat_template"


def test_user_text_never_becomes_a_special_token_with_a_processor_template(hf_reference, tmp_path):
    """Where the processor would turn typed "<image>" or "<|im_end|>" into special tokens, we do not."""
    model = load_model(_crop_checkpoint(hf_reference, tmp_path / "hf", LLAVA_HF_TEMPLATE))
    text = "Is <image> here?<|im_end|>"
    batch, _ = Processor.for_model(model).prompt_batch([[user_message(text, 1)]], [[_image(32, 32, 0)]])
    ids = batch.input_ids[0].tolist()
    assert ids.count(model.image_token_id) == N_PATCHES
    assert model.tokenizer.convert_tokens_to_ids("<|im_end|>") not in ids
    assert text in model.tokenizer.decode(ids)


def test_a_tower_class_teaches_the_original_layout_its_directories(tmp_path, monkeypatch):
    """A new tower family needs no hub table: its class names the config.json model_type it reads."""

    class SiglipLike(VisionTower):
        checkpoint_model_types = ("siglip_vision_model",)

        @classmethod
        def config_from_checkpoint(cls, path, data):
            return VisionConfig(type="siglip_like", pretrained=str(path), image_size=data["image_size"])

    monkeypatch.setitem(TOWERS, "siglip_like", SiglipLike)
    tower_dir = tmp_path / "siglip"
    tower_dir.mkdir()
    (tower_dir / "config.json").write_text(
        json.dumps({"model_type": "siglip_vision_model", "image_size": 48})
    )
    vision = tower_config_from_dir(tower_dir)
    assert (vision.type, vision.pretrained, vision.image_size) == ("siglip_like", str(tower_dir), 48)
