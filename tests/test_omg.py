"""OMG-LLaVA: special tokens, the omg tower's token counts, [SEG] losses and decoding, the segment CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unillava.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from unillava.conversation import Message, encode_segments, get_template, user_message
from unillava.llm import EMBEDDED_DEFAULT
from unillava.modeling import LlavaModel
from unillava.omg import OMG_TOKENS, SEG_TOKEN, OMGLlavaModel, phrases_for_segs, seg_batch
from unillava.perception import tiny_perception_config
from unillava.testing import tiny_llama_config
from unillava.vision import build_vision_tower
from unillava.vision.omg import perception_prior

IMAGE_SIZE = 128  # stride 64 (ConvNeXt 32 x pixel shuffle 2): a 2 x 2 grid of pixel tokens


def omg_config(**extra) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(type="omg", hf_config=tiny_perception_config(), image_size=IMAGE_SIZE, extra=extra),
        projector=ProjectorConfig(),
        llm=LLMConfig(pretrained=None, tokenizer=EMBEDDED_DEFAULT, hf_config=tiny_llama_config()),
        max_length=512,
    )


@pytest.fixture(scope="module")
def model() -> OMGLlavaModel:
    torch.manual_seed(0)
    return LlavaModel.from_config(omg_config()).eval()


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from unillava.data.shapes import generate_dataset

    out = tmp_path_factory.mktemp("omg-shapes") / "data"
    generate_dataset(out, 3, 5, n_val=1, n_test=1, min_size=96, max_size=128, difficulty="easy", workers=1,
                     tasks=["refseg"])
    return out


def _pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 120), (64, 64))]


def _force_answer(model, monkeypatch, text: str) -> None:
    """Make greedy generation return `text` (a random tiny LM never says [SEG] by itself)."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"] + [model.tokenizer.eos_token_id]

    def fake_generate(self, input_ids, attention_mask=None, images=None, **kwargs):
        return torch.tensor([ids] * input_ids.shape[0])

    monkeypatch.setattr(OMGLlavaModel, "generate", fake_generate)


def test_special_tokens_are_single_ids_everywhere(model):
    tokenizer = model.tokenizer
    for token in OMG_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    answer = "<p> the red circle </p> [SEG]. Region <region> and point <mark>."
    template = get_template("auto", tokenizer)
    messages = [Message("user", ["Please segment the red circle."]), Message("assistant", [answer])]
    encoded = encode_segments(template.segments(messages, False), tokenizer, model.image_token_id, [])
    for token, token_id in model.token_ids.items():
        assert encoded.input_ids.count(token_id) == 1, token
        assert token_id in [label for label in encoded.labels if label >= 0]
    supervised = [label for label in encoded.labels if label >= 0]
    assert answer in tokenizer.decode(supervised, skip_special_tokens=True)


@pytest.mark.parametrize("use_prior", [True, False])
def test_tower_token_counts(use_prior):
    torch.manual_seed(0)
    extra = {"use_prior": use_prior}
    tower = build_vision_tower(VisionConfig(type="omg", hf_config=tiny_perception_config(), image_size=IMAGE_SIZE,
                                            extra=extra))
    backbone = tower.perception.backbone_channels
    assert tower.hidden_size == 4 * backbone + (2 * tower.perception.hidden_dim if use_prior else 0)
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    features = tower(pixels)
    objects = tower.object_query_indices(pixels)
    for image, feature, winners in zip(pixels, features, objects, strict=True):
        assert 1 <= len(winners) <= tower.perception.config.num_queries
        assert feature.shape == (4 + 1 + len(winners), tower.hidden_size)
        assert tower.num_tokens_for_image(image) == feature.shape[0]
    with pytest.raises(Exception, match="depends on the image"):
        tower.num_tokens(IMAGE_SIZE, IMAGE_SIZE)
    if use_prior:  # the prior is the tail of each pixel token
        prior, _ = perception_prior(tower.memory_for(pixels[0]), (2, 2))
        assert torch.allclose(features[0][:4, 4 * backbone :], prior[0], atol=1e-6)


def test_ablation_flags_fix_the_count():
    torch.manual_seed(0)
    base = VisionConfig(type="omg", hf_config=tiny_perception_config(), image_size=256)
    pixel_only = build_vision_tower(VisionConfig(**{**base.__dict__, "extra": {"object_tokens": False}}))
    assert pixel_only.num_tokens(256, 256) == 16
    assert [f.shape[0] for f in pixel_only(torch.randn(2, 3, 256, 256))] == [16, 16]
    capped = build_vision_tower(VisionConfig(**{**base.__dict__, "extra": {"max_object_tokens": 1}}))
    assert capped.num_tokens_for_image(torch.randn(3, 256, 256)) == 16 + 1 + 1


def test_processor_reserves_each_images_own_count(model):
    pictures = _pictures()
    pixels = model.processor.preprocess_images(pictures)
    counts = [model.vision_tower.num_tokens_for_image(p) for p in pixels]
    batch, _ = model.processor.prompt_batch([[user_message("a", 1)] for _ in pictures], [[p] for p in pictures])
    slots = (batch.input_ids == model.image_token_id).sum(1).tolist()
    assert slots == counts
    with torch.no_grad():
        model(**batch.model_inputs())  # splicing checks that features and slots agree


def test_save_and_load_give_the_omg_model(model, tmp_path):
    model.save_pretrained(tmp_path / "omg")
    loaded = LlavaModel.from_pretrained(tmp_path / "omg")
    assert isinstance(loaded, OMGLlavaModel) and loaded.supports_segmentation
    assert loaded.token_ids == model.token_ids
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_seg_loss_trains_the_seg_head(shapes_root):
    torch.manual_seed(0)
    model = LlavaModel.from_config(omg_config())
    records = [json.loads(line) for line in (shapes_root / "tasks" / "train" / "refseg.jsonl").read_text().splitlines()]
    records = records[:2]
    batch, targets = seg_batch(model, records, shapes_root)
    assert [len(t) for t in targets] == [1, 1] and targets[0].shape[-1] == IMAGE_SIZE
    out = model(**batch.model_inputs(), seg_masks=targets, loss_reduction="sum")
    expected = out.text_loss + 2.0 * out.mask_bce + 0.5 * out.mask_dice
    assert torch.allclose(out.loss, expected)
    model.requires_grad_(False)
    model.seg_head.requires_grad_(True)
    optimizer = torch.optim.Adam(model.seg_head.parameters(), lr=1e-2)
    mask_losses = []
    for _ in range(8):
        out = model(**batch.model_inputs(), seg_masks=targets)
        mask_loss = 2.0 * out.mask_bce + 0.5 * out.mask_dice
        optimizer.zero_grad()
        mask_loss.backward()
        optimizer.step()
        mask_losses.append(float(mask_loss.detach()))
    assert mask_losses[-1] < mask_losses[0]
    assert all(p.grad is None for p in model.vision_tower.perception.parameters())
    with pytest.raises(ValueError, match="target mask"):
        model(**batch.model_inputs(), seg_masks=[targets[0], targets[1][:0]])


def test_phrases_follow_seg_order():
    text = "<p> the red circle </p> [SEG] and <p> a square </p> [SEG], then [SEG]"
    assert phrases_for_segs(text) == ["the red circle", "a square", ""]


def test_generate_with_masks_returns_text_masks_and_rle(model, monkeypatch):
    from unillava.evaluation.metrics import decode_mask

    _force_answer(model, monkeypatch, "<p> red shape </p> [SEG] and <p> blue </p> [SEG].")
    pictures = _pictures()
    result = model.segment(pictures[0], "Please segment the red shape in this image.")
    assert result.text.count(SEG_TOKEN) == 2 and result.phrases == ["red shape", "blue"]
    assert [m.shape for m in result.masks] == [(90, 120), (90, 120)]
    assert result.plain_text == "red shape and blue."
    outputs = model.generate_with_masks([[user_message("segment", 1)]] * 2, [[p] for p in pictures], batch_size=2)
    assert len(outputs) == 2
    text, rles = outputs[1]
    assert len(rles) == 2 and decode_mask(rles[0]).shape == (64, 64)
    json.dumps(rles)
    from unillava.inference import GenerationSettings

    answer, masks = model.chat_pixels([user_message("segment", 1)], pictures[:1], [],
                                      settings=GenerationSettings(max_new_tokens=8), return_masks=True)
    assert masks[0]["phrase"] == "red shape" and masks[0]["mask"].shape == (90, 120)


def test_segment_cli_writes_masks_and_overlay(model, tmp_path, monkeypatch, capsys):
    from unillava.cli import main

    model.save_pretrained(tmp_path / "omg")
    _pictures()[0].save(tmp_path / "in.png")
    _force_answer(model, monkeypatch, "<p> it </p> [SEG].")
    code = main(["segment", "--model", str(tmp_path / "omg"), "--image", str(tmp_path / "in.png"),
                 "--prompt", "Please segment it in this image.", "--out", str(tmp_path / "out")])
    assert code == 0
    assert "[SEG]" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["phrases"] == ["it"] and len(result["masks"]) == 1
    assert Image.open(tmp_path / "out" / "mask_0.png").size == (120, 90)
    assert Image.open(tmp_path / "out" / "overlay.png").size == (120, 90)
