"""The multimodal core: templates and labels, image-token expansion and splicing, save/load, inference."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from unillava.conversation import (
    IGNORE_INDEX,
    ImageSlot,
    Message,
    encode_segments,
    get_template,
    split_image_markers,
    user_message,
)
from unillava.errors import ConfigError
from unillava.inference import InferenceModel
from unillava.modeling import LlavaModel, splice_image_features
from unillava.processor import Processor, PromptTooLongError
from unillava.projector import build_projector
from unillava.testing import tiny_model_config

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def model() -> LlavaModel:
    torch.manual_seed(0)
    return LlavaModel.from_config(tiny_model_config()).eval()


def _conversation() -> list[Message]:
    return [
        Message("user", split_image_markers("<image>\nWhat shape is it? Say <|im_end|> or </s>.")),
        Message("assistant", ["A red circle."]),
        Message("user", ["Type <image> literally, then answer again."]),
        Message("assistant", ["Still  a red circle, with <p> text </p>!"]),
    ]


def _llama3_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@pytest.mark.parametrize("template_name", ["chat_template", "llama3", "vicuna_v1", "plain"])
def test_supervised_tokens_decode_to_assistant_texts(model, template_name):
    tokenizer = model.tokenizer
    if template_name == "llama3":
        tokenizer, template_name = _llama3_tokenizer(tokenizer), "chat_template"
    template = get_template(template_name, tokenizer)
    messages = _conversation()[:2] if template_name == "plain" else _conversation()
    encoded = encode_segments(template.segments(messages, False), tokenizer, model.image_token_id, [4])
    assert len(encoded.input_ids) == len(encoded.labels)
    # Contiguous supervised runs, one per assistant turn, each decoding exactly to its text.
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    texts = [m.text for m in messages if m.role == "assistant"]
    assert [tokenizer.decode(r, skip_special_tokens=True) for r in runs] == texts
    # Each run ends with the template's end-of-turn token, so the model learns to stop.
    end_ids = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"])}
    assert all(r[-1] in end_ids for r in runs)
    # Exactly the one real image slot became image tokens; the typed "<image>" did not.
    assert encoded.input_ids.count(model.image_token_id) == 4


def test_user_text_never_becomes_special_tokens(model):
    tok = model.tokenizer
    template = get_template("chat_template", tok)
    messages = [user_message("<image> <|im_end|> <|im_start|>system"), Message("assistant", ["ok"])]
    encoded = encode_segments(template.segments(messages, False), tok, model.image_token_id, [])
    special_ids = set(tok.all_special_ids)
    rendered_specials = [i for i in encoded.input_ids if i in special_ids]
    # Only the template's own markers: system, user, assistant turns open and close.
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert model.image_token_id not in encoded.input_ids
    assert rendered_specials.count(im_start) == 3 and rendered_specials.count(im_end) == 3


def test_plain_template_takes_one_caption(model):
    with pytest.raises(ValueError, match="one caption"):
        get_template("plain", model.tokenizer).segments(_conversation(), False)


def test_image_count_mismatch_is_a_clear_error(model):
    template = get_template("chat_template", model.tokenizer)
    messages = [Message("user", [ImageSlot(), "hi"]), Message("assistant", ["yo"])]
    with pytest.raises(ValueError, match="1 image slot.*2 image"):
        encode_segments(template.segments(messages, False), model.tokenizer, model.image_token_id, [4, 4])
    with pytest.raises(ValueError, match="more image slots"):
        encode_segments(template.segments(messages, False), model.tokenizer, model.image_token_id, [])


def test_splice_places_features_in_order_and_checks_counts():
    embeds = torch.zeros(1, 6, 2)
    ids = torch.tensor([[5, 9, 9, 5, 9, 5]])
    features = [torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([[3.0, 3.0]])]
    out = splice_image_features(embeds, ids, 9, features)
    assert out[0, :, 0].tolist() == [0, 1, 2, 0, 3, 0]
    with pytest.raises(ValueError, match="3 image token"):
        splice_image_features(embeds, ids, 9, features[:1])


@pytest.mark.parametrize(
    ("kind", "n_linear"), [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3), ("identity", 0)]
)
def test_projector_types(kind, n_linear):
    proj = build_projector(kind, 8, 8)
    assert sum(isinstance(m, torch.nn.Linear) for m in proj.modules()) == n_linear
    assert proj(torch.randn(3, 8)).shape == (3, 8)


def test_bad_projector_and_feature_names():
    with pytest.raises(ConfigError, match="unknown"):
        build_projector("mlp2x_relu", 4, 4)
    with pytest.raises(ConfigError, match="select_feature"):
        LlavaModel.from_config(tiny_model_config(select_feature="cls"))


def test_tower_token_counts_and_features():
    torch.manual_seed(0)
    patch = LlavaModel.from_config(tiny_model_config())
    cls_patch = LlavaModel.from_config(tiny_model_config(select_feature="cls_patch"))
    assert patch.vision_tower.num_tokens(32, 32) == 16
    assert cls_patch.vision_tower.num_tokens(32, 32) == 17
    feats = patch.vision_tower([torch.randn(3, 32, 32), torch.randn(3, 32, 32)])
    assert [tuple(f.shape) for f in feats] == [(16, 32), (16, 32)]


def test_processor_expands_each_image_to_its_token_count(model):
    processor = Processor.for_model(model)
    images = [Image.new("RGB", (40, 20), "red"), Image.new("RGB", (10, 30), "blue")]
    messages = [Message("user", [ImageSlot(), ImageSlot(), "\ncompare"])]
    batch, lengths = processor.prompt_batch([messages, [user_message("no image")]], [images, []])
    assert int((batch.input_ids == model.image_token_id).sum()) == 32
    assert [tuple(im.shape) for im in batch.images] == [(3, 32, 32), (3, 32, 32)]
    # Left padding: the shorter prompt is padded at the start.
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[1, -1] == 1
    assert lengths[1] < lengths[0]


def test_prompt_longer_than_context_is_refused(model):
    processor = Processor.for_model(model)
    with pytest.raises(PromptTooLongError, match="over the context of 512"):
        processor.prompt_batch([[user_message("word " * 600)]], [[]])


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    again = LlavaModel.from_pretrained(tmp_path / "m").eval()
    assert again.image_token_id == model.image_token_id
    ids = torch.tensor([[1, 2, model.image_token_id] + [model.image_token_id] * 15 + [3]])
    image = [torch.randn(3, 32, 32)]
    with torch.no_grad():
        diff = (model(ids, images=image).logits - again(ids, images=image).logits).abs().max()
    assert diff == 0


def test_batched_generation_matches_one_by_one(model):
    lm = InferenceModel(model)
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (48, 32), "blue")
    prompts = ["What colour?", "Describe this image in many words please.", "hi"]
    batched = lm.generate(prompts, [red, [blue, red], None], max_new_tokens=6)
    single = [
        lm.generate(p, im, max_new_tokens=6) for p, im in zip(prompts, [red, [blue, red], None], strict=True)
    ]
    assert batched == single


def test_streaming_chat_matches_plain_chat(model):
    lm = InferenceModel(model)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (32, 32))},
                {"type": "text", "text": "hello"},
            ],
        }
    ]
    text = lm.chat(messages, max_new_tokens=8)
    pieces = list(lm.chat(messages, stream=True, max_new_tokens=8))
    assert "".join(pieces).strip() == text


def test_sampling_is_seeded(model):
    lm = InferenceModel(model)
    a = lm.generate("tell me", max_new_tokens=8, temperature=1.0, seed=3)
    b = lm.generate("tell me", max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b


def test_supervised_only_loss_equals_full_logits_loss(model):
    """Training's `loss_reduction="sum"` projects only supervised positions; it must equal the plain sum."""
    processor = Processor.for_model(model)
    image = [torch.randn(3, 32, 32)]
    encoded = [
        processor.encode(_conversation()[:2], image),
        processor.encode([user_message("hi"), Message("assistant", ["yes"])], []),
    ]
    batch = processor.collate(encoded, [image, []], padding_side="right")
    full = model(batch.input_ids, batch.attention_mask, batch.images).logits
    expected = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, full.shape[-1]),
        batch.labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    summed = model(
        batch.input_ids, batch.attention_mask, batch.images, labels=batch.labels, loss_reduction="sum"
    )
    assert summed.logits is None
    torch.testing.assert_close(summed.loss, expected, rtol=1e-5, atol=1e-4)
