"""OMG-LLaVA: special tokens, the omg tower's token counts, [SEG] losses and decoding, the segment CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from omg_batches import seg_batch
from unillava.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from unillava.conversation import Message, encode_segments, get_template, user_message
from unillava.errors import ConfigError, UnillavaError
from unillava.llm import EMBEDDED_DEFAULT
from unillava.modeling import LlavaModel, splice_image_features
from unillava.omg import OMG_TOKENS, SEG_TOKEN, OMGLlavaModel, phrases_for_segs
from unillava.omg.perception import tiny_perception_config
from unillava.omg.tower import perception_prior
from unillava.testing import tiny_llama_config
from unillava.vision import build_vision_tower

IMAGE_SIZE = 128  # stride 64 (ConvNeXt 32 x pixel shuffle 2): a 2 x 2 grid of pixel tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def omg_config(**extra) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            type="omg", hf_config=tiny_perception_config(), image_size=IMAGE_SIZE, extra=extra
        ),
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
    generate_dataset(
        out,
        3,
        5,
        n_val=1,
        n_test=1,
        min_size=96,
        max_size=128,
        difficulty="easy",
        workers=1,
        tasks=["refseg", "region_caption"],
    )
    return out


def _pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 120), (64, 64))
    ]


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
    tower = build_vision_tower(
        VisionConfig(
            type="omg",
            hf_config=tiny_perception_config(),
            image_size=IMAGE_SIZE,
            extra={"use_prior": use_prior},
        )
    )
    backbone = tower.perception.backbone_channels
    assert tower.hidden_size == 4 * backbone + (2 * tower.perception.hidden_dim if use_prior else 0)
    queries = tower.perception.config.num_queries
    assert tower.num_tokens(IMAGE_SIZE, IMAGE_SIZE) == 4 + 1 + queries  # 2 x 2 pixels, separator, max objects
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    parts = tower.encode_parts(pixels)
    winners = tower.object_query_indices(pixels)
    assert [p.pixels.shape for p in parts] == [(4, tower.hidden_size)] * 3
    assert [p.objects.shape for p in parts] == [(len(w), tower.query_dim) for w in winners]
    assert all(1 <= len(w) <= queries for w in winners)
    if use_prior:  # the prior is the tail of each pixel token
        prior, _ = perception_prior(tower.memory_for(pixels[0]), (2, 2), (IMAGE_SIZE, IMAGE_SIZE))
        assert torch.allclose(parts[0].pixels[:, 4 * backbone :], prior[0], atol=1e-6)
    tower.attach_language_model(64)
    features, valid = tower.embed(pixels, torch.nn.Linear(tower.hidden_size, 64))
    for feature, mask, won in zip(features, valid, winners, strict=True):
        assert feature.shape == (4 + 1 + queries, 64)
        assert mask.tolist() == [True] * (4 + 1 + len(won)) + [False] * (queries - len(won))
        assert not feature[~mask].any()  # empty slots are zeros (and masked by the model)
    listed, _ = tower.embed(list(pixels), torch.nn.Linear(tower.hidden_size, 64))
    assert [f.shape for f in listed] == [f.shape for f in features]


@pytest.mark.parametrize("image_size,grid", [((64, 64), (2, 2)), ((96, 64), (3, 2)), ((256, 256), (4, 4))])
def test_prior_map_follows_the_released_order(image_size, grid):
    """Released: upsample the mask logits to the image, sigmoid, times the smoothed score, resize to the
    grid, softmax over queries; the sigmoid does not commute with the resizes, so the order matters."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    queries, dim = 5, 6
    logits = 4 * torch.randn(2, queries, image_size[0] // 4, image_size[1] // 4)
    class_logits = torch.randn(2, queries, 4)
    embeddings = torch.randn(2, queries, dim)
    output = SimpleNamespace(
        mask_logits=[logits],
        scores=lambda: class_logits.softmax(-1)[..., :-1].max(-1).values,
        query_embeddings=embeddings,
    )
    prior, prior_map = perception_prior(output, grid, image_size)
    upsampled = F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False).sigmoid()
    expected_map = (0.5 * output.scores() + 0.5)[..., None, None] * upsampled
    expected_map = F.interpolate(expected_map, size=grid, mode="bilinear", align_corners=False).flatten(2)
    assert torch.allclose(prior_map, expected_map, atol=1e-5)
    assert torch.allclose(prior, torch.einsum("bqn,bqc->bnc", expected_map.softmax(1), embeddings), atol=1e-5)
    stride4_first = (0.5 * output.scores() + 0.5)[..., None, None] * logits.sigmoid()
    stride4_first = F.interpolate(stride4_first, size=grid, mode="bilinear", align_corners=False).flatten(2)
    assert not torch.allclose(stride4_first, expected_map, atol=1e-3)  # the order the test tells apart


def test_pixel_tokens_use_the_released_channel_order():
    from unillava.omg.tower import pixel_tokens

    feature = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)  # C=2, 4 x 4
    tokens = pixel_tokens(feature)
    assert tokens.shape == (1, 4, 8)
    # token (0, 1) covers rows 0-1, columns 2-3; channels run (row offset, column offset, channel)
    block = feature[0, :, 0:2, 2:4]
    assert tokens[0, 1].tolist() == [
        block[ch, i, j].item() for i in range(2) for j in range(2) for ch in range(2)
    ]


def test_ablation_flags_fix_the_count():
    torch.manual_seed(0)
    base = VisionConfig(type="omg", hf_config=tiny_perception_config(), image_size=256)
    pixel_only = build_vision_tower(VisionConfig(**{**base.__dict__, "extra": {"object_tokens": False}}))
    assert pixel_only.num_tokens(256, 256) == 16
    pixel_only.attach_language_model(8)
    features, valid = pixel_only.embed(
        torch.randn(2, 3, 256, 256), torch.nn.Linear(pixel_only.hidden_size, 8)
    )
    assert [f.shape[0] for f in features] == [16, 16] and all(bool(v.all()) for v in valid)
    capped = build_vision_tower(VisionConfig(**{**base.__dict__, "extra": {"max_object_tokens": 1}}))
    assert capped.num_tokens(256, 256) == 16 + 1 + 1
    capped.attach_language_model(8)
    features, valid = capped.embed(torch.randn(1, 3, 256, 256), torch.nn.Linear(capped.hidden_size, 8))
    assert features[0].shape[0] == 18 and bool(valid[0].all())


def test_empty_object_slots_change_nothing(model):
    pictures = _pictures()
    batch, _ = model.processor.prompt_batch(
        [[user_message("a", 1)] for _ in pictures], [[p] for p in pictures]
    )
    slots = (batch.input_ids == model.image_token_id).sum(1).tolist()
    assert slots == [model.vision_tower.num_tokens(IMAGE_SIZE, IMAGE_SIZE)] * 2
    embeds, mask, positions, _ = model.prepare_inputs(batch.input_ids, batch.attention_mask, batch.images)
    empty = (batch.attention_mask == 1) & (mask == 0)
    assert empty.any()
    lm = model.language_model
    with torch.no_grad():
        logits = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        noisy = embeds.clone()
        noisy[empty] = torch.randn_like(noisy[empty]) * 10
        again = lm(inputs_embeds=noisy, attention_mask=mask, position_ids=positions).logits
        assert torch.allclose(logits[mask == 1], again[mask == 1], atol=1e-4)
        model(**batch.model_inputs())  # splicing checks that features and slots agree
    from unillava.inference import InferenceModel

    answers = InferenceModel(model).generate(["a", "b"], [[p] for p in pictures], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_tower_encode_batch_is_the_sequence_the_model_splices(model):
    """`encode_batch` (so `VisionTower.forward` and `encode_images`) gives each image's LLM-space tokens,
    pixel tokens then separator and object tokens, exactly as `prepare_inputs` splices them."""
    pictures = _pictures()
    batch, _ = model.processor.prompt_batch(
        [[user_message("a", 1)] for _ in pictures], [[p] for p in pictures]
    )
    tower = model.vision_tower
    hidden = model.language_model.get_input_embeddings().embedding_dim
    with torch.no_grad():
        stacked = tower.encode_batch(torch.stack(batch.images))
        listed = tower(batch.images)
        features, valid = tower.embed(batch.images, model.projector)
        embeds, _, _, _ = model.prepare_inputs(batch.input_ids, batch.attention_mask, batch.images)
        spliced = splice_image_features(
            model.language_model.get_input_embeddings()(batch.input_ids),
            batch.input_ids,
            model.image_token_id,
            model.encode_images(batch.images),
        )
    assert stacked.shape == (2, tower.num_tokens(IMAGE_SIZE, IMAGE_SIZE), hidden)
    for row, (feature, mask) in enumerate(zip(features, valid, strict=True)):
        assert torch.equal(stacked[row], feature) and torch.equal(listed[row], feature)
        assert not feature[~mask].any()  # empty object slots: zeros, masked by the model
    assert torch.equal(spliced, embeds)
    assert "_projector" not in dict(tower.named_modules()) and not any(
        k.startswith("vision_tower._projector") for k in model.state_dict()
    )
    bare = build_vision_tower(
        VisionConfig(type="omg", hf_config=tiny_perception_config(), image_size=IMAGE_SIZE)
    )
    bare.attach_language_model(hidden)
    with pytest.raises(ConfigError, match="attach_language_model"):
        bare.encode_batch(torch.stack(batch.images))


def test_save_and_load_give_the_omg_model(model, tmp_path):
    model.save_pretrained(tmp_path / "omg")
    loaded = LlavaModel.from_pretrained(tmp_path / "omg")
    assert isinstance(loaded, OMGLlavaModel) and loaded.supports_segmentation
    assert loaded.token_ids == model.token_ids
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def _records(root, task: str, n: int = 2) -> list[dict]:
    lines = (root / "tasks" / "train" / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def test_seg_loss_trains_the_seg_head(shapes_root):
    torch.manual_seed(0)
    model = LlavaModel.from_config(omg_config())
    seg = seg_batch(model, _records(shapes_root, "refseg"), shapes_root)
    assert [len(t) for t in seg.seg_masks] == [1, 1] and seg.seg_masks[0].shape[-1] == IMAGE_SIZE
    out = model(**seg.inputs(), loss_reduction="sum")
    expected = out.text_loss + 2.0 * out.mask_bce + 0.5 * out.mask_dice
    assert torch.allclose(out.loss, expected)
    model.requires_grad_(False)
    model.seg_head.requires_grad_(True)
    optimizer = torch.optim.Adam(model.seg_head.parameters(), lr=1e-2)
    mask_losses = []
    for _ in range(8):
        out = model(**seg.inputs())
        mask_loss = 2.0 * out.mask_bce + 0.5 * out.mask_dice
        optimizer.zero_grad()
        mask_loss.backward()
        optimizer.step()
        mask_losses.append(float(mask_loss.detach()))
    assert mask_losses[-1] < mask_losses[0]
    assert all(p.grad is None for p in model.vision_tower.perception.parameters())
    with pytest.raises(ValueError, match="target mask"):
        model(**{**seg.inputs(), "seg_masks": [seg.seg_masks[0], seg.seg_masks[1][:0]]})


def test_trainable_seg_decoder_copy_trains_alone(shapes_root, tmp_path):
    torch.manual_seed(0)
    model = LlavaModel.from_config(omg_config(seg_decoder="trainable"))
    tower = model.vision_tower
    original = tower.perception.model.transformer_module.decoder
    assert tower.seg_decoder is not original
    seg = seg_batch(model, _records(shapes_root, "refseg"), shapes_root)
    hidden = torch.randn(2, model.language_model.config.hidden_size)
    pixels = seg.inputs()["images"][0]
    with torch.no_grad():
        copied = model.decode_seg(pixels, hidden).mask_logits[-1]
        memory = tower.memory_for(pixels).memory.select(0, repeat=2)
        content, position = model.seg_head(hidden).split(tower.perception.hidden_dim, dim=-1)
        frozen = tower.perception.decode(memory, content[:, None], position[:, None]).mask_logits[-1]
    assert torch.allclose(copied, frozen, atol=1e-6)  # the copy starts as the frozen decoder
    model.requires_grad_(False)
    tower.requires_grad_(True)
    out = model(**seg.inputs())
    (2.0 * out.mask_bce + 0.5 * out.mask_dice).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.seg_decoder.parameters())
    assert all(p.grad is None for p in tower.perception.parameters())
    with torch.no_grad():
        next(tower.seg_decoder.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "omg")
    loaded = LlavaModel.from_pretrained(tmp_path / "omg")
    for key, value in loaded.vision_tower.seg_decoder.state_dict().items():
        assert torch.equal(value, tower.seg_decoder.state_dict()[key]), key
    with pytest.raises(ConfigError, match="seg_decoder"):
        LlavaModel.from_config(omg_config(seg_decoder="copy"))


def test_prompts_outside_the_image_follow_the_stated_rule():
    from unillava.errors import DataError
    from unillava.omg.perception.prompts import prompt_region

    clipped = prompt_region(
        {"type": "box", "box": [90, 50, -20, 500]}, 100, 60, 128
    )  # reversed, past the edges
    assert torch.equal(
        clipped.region, prompt_region({"type": "box", "box": [0, 50, 90, 60]}, 100, 60, 128).region
    )
    with pytest.raises(DataError, match="outside the 100x60 image"):
        prompt_region({"type": "box", "box": [120, 10, 150, 40]}, 100, 60, 128)
    with pytest.raises(DataError, match="no area"):
        prompt_region({"type": "box", "box": [10, 10, 10, 40]}, 100, 60, 128)
    with pytest.raises(DataError, match="outside the 100x60 image"):
        prompt_region({"type": "point", "point": [50, 61]}, 100, 60, 128)
    with pytest.raises(DataError, match="'point' as 2 numbers"):
        prompt_region({"type": "point", "point": [50]}, 100, 60, 128)
    with pytest.raises(DataError, match="empty"):
        prompt_region({"type": "mask", "mask": np.zeros((60, 100), bool)}, 100, 60, 128)


def test_prompt_regions_in_the_input_frame():
    from unillava.omg.perception.prompts import deepest_point, prompt_region

    box = prompt_region({"type": "box", "box": [0, 10, 50, 30]}, 100, 50, 100)  # padded by 25 px top
    assert box.region.sum() == 50 * 20 and box.region[35:55, 0:50].all()
    assert box.anchor == pytest.approx((0.25, 0.45))
    point = prompt_region({"type": "point", "point": [50, 25]}, 100, 50, 100)
    assert 1 <= point.region.sum() <= 16 and point.region[50, 50]
    ring = np.zeros((50, 100), dtype=bool)
    ring[5:45, 10:60] = True
    mask = prompt_region({"type": "mask", "mask": ring, "image_index": 0}, 100, 50, 100)
    x, y = deepest_point(mask.region)
    assert 25 <= x <= 45 and 45 <= y <= 55


def test_visual_prompts_fill_region_tokens(shapes_root):
    torch.manual_seed(0)
    model = LlavaModel.from_config(omg_config())
    seg = seg_batch(model, _records(shapes_root, "region_caption"), shapes_root)
    assert [len(p) for p in seg.visual_prompts] == [1, 1]
    batch = seg.batch
    region_ids = torch.tensor([model.token_ids["<region>"], model.token_ids["<mark>"]])
    where = torch.isin(batch.input_ids, region_ids)
    plain, _, _, _ = model.prepare_inputs(batch.input_ids, batch.attention_mask, batch.images)
    filled, _, _, _ = model.prepare_inputs(
        batch.input_ids, batch.attention_mask, batch.images, seg.visual_prompts
    )
    assert where.sum() == 2
    assert not torch.allclose(plain[where], filled[where]) and torch.equal(plain[~where], filled[~where])
    model.vision_tower.requires_grad_(True)  # the tower's own parts; its segmenter stays frozen
    out = model(**seg.inputs())
    out.loss.backward()
    assert model.vision_tower.query_projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_tower.perception.parameters())
    with pytest.raises(ValueError, match="prompt"):
        model(**{**seg.inputs(), "visual_prompts": [[], []]})


def test_phrases_follow_seg_order():
    text = "<p> the red circle </p> [SEG] and <p> a square </p> [SEG], then [SEG]"
    assert phrases_for_segs(text) == ["the red circle", "a square", ""]


def test_generate_with_masks_returns_text_masks_and_rle(model, monkeypatch):
    from unillava.data.masks import decode_mask
    from unillava.inference import InferenceModel

    lm = InferenceModel(model)
    _force_answer(model, monkeypatch, "<p> red shape </p> [SEG] and <p> blue </p> [SEG].")
    pictures = _pictures()
    result = lm.segment(pictures[0], "Please segment the red shape in this image.")
    assert result.text.count(SEG_TOKEN) == 2 and result.phrases == ["red shape", "blue"]
    assert [m.shape for m in result.masks] == [(90, 120), (90, 120)]
    assert result.plain_text == "red shape and blue."
    outputs = lm.generate_with_masks(
        [[user_message("segment", 1)]] * 2, [[p] for p in pictures], batch_size=2
    )
    assert len(outputs) == 2
    text, rles = outputs[1]
    assert len(rles) == 2 and decode_mask(rles[0]).shape == (64, 64)
    json.dumps(rles)
    from unillava.generation import GenerationSettings

    answer, masks = lm.chat_pixels(
        [user_message("segment", 1)],
        pictures[:1],
        [],
        settings=GenerationSettings(max_new_tokens=8),
        return_masks=True,
    )
    assert masks[0]["phrase"] == "red shape" and masks[0]["mask"].shape == (90, 120)
    prompts = [
        {"type": "box", "box": [10, 10, 60, 40], "label": 1, "image_index": 0},
        {"type": "point", "point": [5, 5], "label": 1, "image_index": 0},
    ]
    answer, masks = lm.chat_pixels(
        [user_message("What is this?", 1)],
        pictures[:1],
        prompts,
        settings=GenerationSettings(max_new_tokens=8),
        return_masks=True,
    )
    assert len(masks) == 2


def test_markers_and_prompts_must_pair_up_and_no_seg_means_no_masks(model, monkeypatch):
    from unillava.inference import InferenceModel

    lm = InferenceModel(model)
    picture = _pictures()[0]
    box = {"type": "box", "box": [10, 10, 60, 40]}
    with pytest.raises(UnillavaError, match="1 <region>/<mark> marker"):
        lm.segment(picture, "What is in <region>?")
    with pytest.raises(UnillavaError, match="2 <region>/<mark> marker"):
        lm.segment(picture, "Compare <region> and <region>.", visual_prompts=[box])
    _force_answer(model, monkeypatch, "A red shape.")
    result = lm.segment(picture, "What is in <region>?", visual_prompts=[box])
    assert result.text == "A red shape." and result.masks == [] and result.rles == []


def test_segment_cli_writes_masks_and_overlay(model, tmp_path, monkeypatch, capsys):
    from unillava.cli import main

    model.save_pretrained(tmp_path / "omg")
    _pictures()[0].save(tmp_path / "in.png")
    _force_answer(model, monkeypatch, "<p> it </p> [SEG].")
    code = main(
        [
            "segment",
            "--model",
            str(tmp_path / "omg"),
            "--image",
            str(tmp_path / "in.png"),
            "--prompt",
            "Please segment it in this image.",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    assert "[SEG]" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["phrases"] == ["it"] and len(result["masks"]) == 1
    assert Image.open(tmp_path / "out" / "mask_0.png").size == (120, 90)
    assert Image.open(tmp_path / "out" / "overlay.png").size == (120, 90)
    code = main(
        [
            "segment",
            "--model",
            str(tmp_path / "omg"),
            "--image",
            str(tmp_path / "in.png"),
            "--prompt",
            "What is <region> and <mark>?",
            "--box",
            "5,5,50,40",
            "--point",
            "60,30",
            "--out",
            str(tmp_path / "out2"),
        ]
    )
    assert code == 0 and (tmp_path / "out2" / "mask_0.png").is_file()
    assert (
        main(
            [
                "segment",
                "--model",
                str(tmp_path / "omg"),
                "--image",
                str(tmp_path / "in.png"),
                "--prompt",
                "x",
                "--box",
                "1,2",
                "--out",
                str(tmp_path / "out3"),
            ]
        )
        == 2
    )


def test_tiny_stage1_recipe_runs_in_the_generic_trainer(tmp_path):
    from pathlib import Path

    from unillava.training import Trainer, load_train_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "omg-stage1.yaml"
    records = []
    for i, picture in enumerate(_pictures()):
        picture.save(tmp_path / f"{i}.png")
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe it."},
                    {"from": "gpt", "value": "Noise."},
                ],
            }
        )
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = load_train_config(
        recipe,
        [
            f"data.train_files=[{tmp_path / 'caps.jsonl'}]",
            f"data.image_root={tmp_path}",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=2",
            "per_device_batch_size=2",
            "global_batch_size=2",
        ],
    )
    torch.manual_seed(0)
    trainer = Trainer(config)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert {
        "vision_tower.separator",
        "vision_tower.seg_head.0.weight",
        "vision_tower.object_mlp.0.weight",
    } <= trainable
    assert not any(".perception." in n for n in trainable)
    result = trainer.train()
    loaded = LlavaModel.from_pretrained(result.model_dir)
    assert isinstance(loaded, OMGLlavaModel)
    assert loaded.vision_tower.separator.abs().sum() > 0  # trained away from its zero init


def test_xtuner_projector_weights_load(model, tmp_path):
    from unillava.omg import convert_xtuner_projectors, load_xtuner_projectors

    torch.manual_seed(1)
    tower = model.vision_tower
    released = {
        "projector.model.model_feat.0.weight": torch.randn_like(model.projector[0].weight),
        "projector.model.model_feat.2.bias": torch.randn_like(model.projector[2].bias),
        "projector.model.query_proj.weight": torch.randn_like(tower.query_projection.weight),
        "projector.model.model.2.weight": torch.randn_like(tower.object_mlp[2].weight),
        "projector.model.seperate_embed.weight": torch.randn(1, tower.separator.shape[0]),
        "projector_text2vision.model.0.weight": torch.randn_like(tower.seg_head[0].weight),
        "llm.base_model.model.output.weight": torch.randn(3, 3),
    }
    converted, left = convert_xtuner_projectors(released)
    assert left == ["llm.base_model.model.output.weight"] and len(converted) == 6
    torch.save({"state_dict": released}, tmp_path / "omg.pth")
    copy = LlavaModel.from_config(omg_config())
    assert load_xtuner_projectors(copy, tmp_path / "omg.pth") == left
    assert torch.equal(copy.vision_tower.separator, released["projector.model.seperate_embed.weight"][0])
    assert torch.equal(copy.seg_head[0].weight, released["projector_text2vision.model.0.weight"])
    assert torch.equal(copy.projector[0].weight, released["projector.model.model_feat.0.weight"])
    with pytest.raises(ConfigError, match="is \\("):
        torch.save({"projector.model.query_proj.weight": torch.zeros(2, 2)}, tmp_path / "bad.pth")
        load_xtuner_projectors(copy, tmp_path / "bad.pth")


def test_server_answers_with_masks_and_takes_visual_prompts(model, monkeypatch):
    import base64
    import io

    import httpx

    from unillava.data.masks import decode_mask
    from unillava.inference import InferenceModel
    from unillava.serving import ServerConfig, ServerThread, create_app

    _force_answer(model, monkeypatch, "<p> it </p> [SEG].")
    buffer = io.BytesIO()
    _pictures()[0].save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in the box?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    body = {
        "model": "omg",
        "messages": messages,
        "return_masks": True,
        "visual_prompts": [{"type": "box", "box": [10, 10, 60, 40]}],
    }
    with ServerThread(create_app(InferenceModel(model), ServerConfig(model_name="omg"))) as server:
        card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
        assert card["capabilities"] == {"vision": True, "visual_prompts": True, "segmentation": True}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    message = reply["choices"][0]["message"]
    assert "[SEG]" in message["content"]
    [mask] = message["masks"]
    assert mask["phrase"] == "it" and decode_mask(mask["segmentation"]).shape == (90, 120)


def test_stage1_object_regularizer_round_trips_object_queries():
    torch.manual_seed(0)
    model = LlavaModel.from_config(omg_config(object_regularizer=10.0))
    pictures = _pictures()
    batch, _ = model.processor.prompt_batch(
        [[user_message("a", 1)] for _ in pictures], [[p] for p in pictures]
    )
    labels = batch.input_ids.clone()
    labels[:, :-3] = -100
    out = model(batch.input_ids, batch.attention_mask, batch.images, labels=labels, loss_reduction="sum")
    tokens = int((labels[:, 1:] != -100).sum())
    assert float(out.object_regularizer) > 0
    assert torch.allclose(out.loss, out.text_loss + 10.0 * out.object_regularizer * tokens)
    out.loss.backward()
    tower = model.vision_tower
    tower.requires_grad_(True)
    out = model(batch.input_ids, batch.attention_mask, batch.images, labels=labels)
    out.loss.backward()
    assert tower.seg_head[0].weight.grad.abs().sum() > 0 and tower.object_mlp[0].weight.grad.abs().sum() > 0


def test_shapes_eval_scores_the_masks_of_a_segmenting_model(model, shapes_root, tmp_path, monkeypatch):
    """`unillava eval` on refseg: the runner asks a segmenting model for masks and the scorer uses them."""
    from unillava.evaluation.runner import evaluate
    from unillava.inference import InferenceModel

    _force_answer(model, monkeypatch, "<p> it </p> [SEG].")
    lm = InferenceModel(model)
    assert lm.supports_segmentation
    summary = evaluate(lm, shapes_root, ["refseg"], tmp_path, split="test", limit=2, max_new_tokens=8)
    records = [json.loads(line) for line in (tmp_path / "predictions_refseg.jsonl").read_text().splitlines()]
    assert records and all(len(r["masks"]) == 1 for r in records)
    assert summary["tasks"]["refseg"]["counts"]["missing"] == 0
    seen = []
    answer = model.tokenizer("a red circle", add_special_tokens=False)["input_ids"] + [
        model.tokenizer.eos_token_id
    ]

    def generate_recording_prompts(
        self, input_ids, attention_mask=None, images=None, visual_prompts=None, **kw
    ):
        seen.append(visual_prompts)
        return torch.tensor([answer] * input_ids.shape[0])

    monkeypatch.setattr(OMGLlavaModel, "generate", generate_recording_prompts)
    summary = evaluate(lm, shapes_root, ["region_caption"], tmp_path, split="test", limit=2, max_new_tokens=8)
    assert seen and all(
        len(row) == 1 for call in seen for row in call
    )  # each record's prompt reached the model
    assert summary["tasks"]["region_caption"]["counts"]["missing"] == 0


def test_generate_json_prints_masks_for_a_segmenting_model(model, tmp_path, monkeypatch, capsys):
    from unillava.cli import main

    model.save_pretrained(tmp_path / "omg")
    _force_answer(model, monkeypatch, "<p> the red circle </p> [SEG].")
    image = tmp_path / "scene.png"
    _pictures()[0].save(image)
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "omg"),
                "--image",
                str(image),
                "--prompt",
                "Please segment the red circle in this image.",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert "[SEG]" in out["text"] and len(out["masks"]) == 1
    assert set(out["masks"][0]) >= {"size", "counts"}


def _record_prompts(model, monkeypatch, text: str) -> list[tuple[list[int], list]]:
    """Like `_force_answer`, and record each call's prompt ids (row 0) and `visual_prompts` (row 0)."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"] + [model.tokenizer.eos_token_id]
    seen: list[tuple[list[int], list]] = []

    def generate_recording(self, input_ids, attention_mask=None, images=None, visual_prompts=None, **kwargs):
        seen.append((input_ids[0].tolist(), [] if visual_prompts is None else list(visual_prompts[0])))
        return torch.tensor([ids] * input_ids.shape[0])

    monkeypatch.setattr(OMGLlavaModel, "generate", generate_recording)
    return seen


def _markers(model, ids: list[int]) -> list[str]:
    names = {model.token_ids["<region>"]: "region", model.token_ids["<mark>"]: "mark"}
    return [names[t] for t in ids if t in names]


def _mask_png(path, size=(120, 90)):
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[20:60, 30:90] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_generate_cli_takes_box_point_mask_prompts_in_typed_order(model, tmp_path, monkeypatch, capsys):
    from unillava.cli import main

    model.save_pretrained(tmp_path / "omg")
    _pictures()[0].save(tmp_path / "in.png")
    mask = _mask_png(tmp_path / "mask.png")
    seen = _record_prompts(model, monkeypatch, "<p> it </p> [SEG].")
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "omg"),
                "--image",
                str(tmp_path / "in.png"),
                "--prompt",
                "What are these?",
                "--point",
                "60,30",
                "--box",
                "5,5,50,40",
                "--mask",
                str(mask),
                "--max-new-tokens",
                "8",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert "[SEG]" in out["text"] and len(out["masks"]) == 1 and set(out["masks"][0]) >= {"size", "counts"}
    [(ids, regions)] = seen
    assert [r.kind for r in regions] == ["point", "box", "mask"]  # the order typed, not grouped by flag
    assert _markers(model, ids) == ["mark", "region", "region"]  # markers appended, one per prompt
    assert regions[2].region.any() and not regions[2].region.all()


def test_chat_cli_prompts_fill_the_first_message_and_stay_in_the_history(
    model, tmp_path, monkeypatch, capsys
):
    import io
    import sys

    from unillava.cli import main

    model.save_pretrained(tmp_path / "omg")
    _pictures()[0].save(tmp_path / "in.png")
    seen = _record_prompts(model, monkeypatch, "<p> it </p> [SEG].")
    monkeypatch.setattr(sys, "stdin", io.StringIO("/point 60,30\n/box 1,2\nwhat is it?\nand now?\n/quit\n"))
    assert (
        main(
            [
                "chat",
                "--model",
                str(tmp_path / "omg"),
                "--image",
                str(tmp_path / "in.png"),
                "--box",
                "5,5,50,40",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "point prompt attached" in captured.out and "1 mask(s)" in captured.out
    assert "/box takes 4 comma-separated numbers" in captured.err
    assert len(seen) == 2
    assert all([r.kind for r in regions] == ["box", "point"] for _, regions in seen)
    assert _markers(model, seen[1][0]) == ["region", "mark"]


def test_segment_cli_takes_a_mask_prompt_and_names_a_bad_mask_file(model, tmp_path, monkeypatch, capsys):
    from unillava.cli import main

    model.save_pretrained(tmp_path / "omg")
    _pictures()[0].save(tmp_path / "in.png")
    _force_answer(model, monkeypatch, "<p> it </p> [SEG].")
    base = [
        "segment",
        "--model",
        str(tmp_path / "omg"),
        "--image",
        str(tmp_path / "in.png"),
        "--prompt",
        "What is <region>?",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*base, "--mask", str(_mask_png(tmp_path / "mask.png"))]) == 0
    assert json.loads((tmp_path / "out" / "result.json").read_text())["phrases"] == ["it"]
    assert Image.open(tmp_path / "out" / "mask_0.png").size == (120, 90)
    capsys.readouterr()
    small = _mask_png(tmp_path / "small.png", size=(60, 45))
    assert main([*base, "--mask", str(small)]) == 2
    err = capsys.readouterr().err
    assert "small.png" in err and "60x45" in err and "120x90" in err and err.count("\n") == 1
    (tmp_path / "junk.png").write_text("not a png")
    assert main([*base, "--mask", str(tmp_path / "junk.png")]) == 2
    assert "junk.png" in capsys.readouterr().err
