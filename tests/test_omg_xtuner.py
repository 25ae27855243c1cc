"""The released OMG-LLaVA layout: tiny random state dicts written with the released key names (an mmdet
OMG-Seg segmenter, an InternLM2 directory, an XTuner .pth with LoRA deltas and projectors), converted,
loaded, and compared with references computed directly from the released weights."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from unillava.errors import CheckpointError
from unillava.hub import load_model
from unillava.omg import OMGLlavaModel
from unillava.omg.converter import REPORT_NAME, convert_segmenter, convert_xtuner_checkpoint, split_wqkv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTHS = [8, 16, 32, 64]  # ConvNeXt stages (one block each), patch 4
D, HEADS, QUERIES, LAYERS, EMBED = 32, 4, 8, 3, 16  # decoder width, heads, queries, mmdet layers, CLIP dim
CLASSES, PROTOTYPES = 5, 2
H, LLM_HEADS, KV_HEADS, LLM_LAYERS, FF, RANK, ALPHA = 64, 4, 2, 2, 96, 4, 8.0
IMAGE = 128
UNUSED_SEGMENTER = {
    "backbone.head.0.norm.weight",
    "backbone.head.0.norm.bias",
    "backbone.head.1.mlp.fc1.weight",
    "backbone.head.1.mlp.fc1.bias",
    "backbone.head.1.mlp.fc2.weight",
    "panoptic_head.iou_embed.0.weight",
    "panoptic_head.iou_embed.0.bias",
    "panoptic_head.future_part.weight",
}


class Weights(dict):
    """A state dict filled with seeded random tensors by name and shape."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, name: str, *shape: int, scale: float = 0.2) -> None:
        self[name] = torch.randn(*shape, generator=self.generator) * scale

    def linear(self, name: str, out: int, inp: int, *kernel: int) -> None:
        self.add(f"{name}.weight", out, inp, *kernel)
        self.add(f"{name}.bias", out, scale=0.05)

    def norm(self, name: str, width: int) -> None:
        self[f"{name}.weight"] = 1 + torch.randn(width, generator=self.generator) * 0.1
        self[f"{name}.bias"] = torch.randn(width, generator=self.generator) * 0.1


def omg_seg_state() -> dict[str, torch.Tensor]:
    """OMG-Seg (`Mask2formerVideo` with `Mask2FormerVideoSemSamHead`, sphere classifier) key layout."""
    w = Weights(0)
    w.linear("backbone.stem.0", WIDTHS[0], 3, 4, 4)
    w.norm("backbone.stem.1", WIDTHS[0])
    for i, width in enumerate(WIDTHS):
        stage = f"backbone.layer{i + 1}."
        if i:
            w.norm(stage + "downsample.0", WIDTHS[i - 1])
            w.linear(stage + "downsample.1", width, WIDTHS[i - 1], 2, 2)
        w.linear(stage + "blocks.0.conv_dw", width, 1, 7, 7)
        w.norm(stage + "blocks.0.norm", width)
        w.linear(stage + "blocks.0.mlp.fc1", 4 * width, width)
        w.linear(stage + "blocks.0.mlp.fc2", width, 4 * width)
        w.add(stage + "blocks.0.gamma", width, scale=0.5)
    w.norm("backbone.head.0.norm", WIDTHS[-1])
    w.linear("backbone.head.1.mlp.fc1", 32, WIDTHS[-1])
    w.add("backbone.head.1.mlp.fc2.weight", EMBED, 32)
    pixel = "panoptic_head.pixel_decoder."
    for i in range(3):
        w.linear(f"{pixel}input_convs.{i}.conv", D, WIDTHS[3 - i], 1, 1)
        w.norm(f"{pixel}input_convs.{i}.gn", D)
    layer = f"{pixel}encoder.layers.0."
    w.linear(layer + "self_attn.sampling_offsets", HEADS * 3 * 4 * 2, D)
    w.linear(layer + "self_attn.attention_weights", HEADS * 3 * 4, D)
    w.linear(layer + "self_attn.value_proj", D, D)
    # zero output projection: the deformable attention adds nothing, so the pixel decoder has a short
    # hand-written reference below (its other weights are plain renames, checked by value)
    w[layer + "self_attn.output_proj.weight"], w[layer + "self_attn.output_proj.bias"] = (
        torch.zeros(D, D),
        torch.zeros(D),
    )
    w.norm(layer + "norms.0", D)
    w.norm(layer + "norms.1", D)
    w.linear(layer + "ffn.layers.0.0", 64, D)
    w.linear(layer + "ffn.layers.1", D, 64)
    w.add(f"{pixel}level_encoding.weight", 3, D)
    w.add(f"{pixel}lateral_convs.0.conv.weight", D, WIDTHS[0], 1, 1)
    w.norm(f"{pixel}lateral_convs.0.gn", D)
    w.add(f"{pixel}output_convs.0.conv.weight", D, D, 3, 3, scale=0.1)
    w.norm(f"{pixel}output_convs.0.gn", D)
    w.linear(f"{pixel}mask_feature", D, D, 1, 1)
    decoder = "panoptic_head.transformer_decoder."
    for i in range(LAYERS):
        for attention in ("cross_attn", "self_attn"):
            w.add(f"{decoder}layers.{i}.{attention}.attn.in_proj_weight", 3 * D, D)
            w.add(f"{decoder}layers.{i}.{attention}.attn.in_proj_bias", 3 * D, scale=0.05)
            w.linear(f"{decoder}layers.{i}.{attention}.attn.out_proj", D, D)
        for n in range(3):
            w.norm(f"{decoder}layers.{i}.norms.{n}", D)
        w.linear(f"{decoder}layers.{i}.ffn.layers.0.0", 64, D)
        w.linear(f"{decoder}layers.{i}.ffn.layers.1", D, 64)
    w.norm(f"{decoder}post_norm", D)
    head = "panoptic_head."
    w.add(head + "query_feat.weight", QUERIES, D, scale=1.0)
    w.add(head + "query_embed.weight", QUERIES, D, scale=1.0)
    w.add(head + "level_embed.weight", 3, D)
    for index in (0, 2, 4):
        w.linear(f"{head}mask_embed.{index}", D, D)
        w.linear(f"{head}cls_proj.{index}", EMBED if index == 4 else D, D)
    w.norm(head + "mask_pooling_proj.0", D)
    w.linear(head + "mask_pooling_proj.1", D, D)
    w.add(head + "mask_tokens.weight", 1, D)  # the visual-prompt query start
    w.add(head + "pb_embedding.weight", 2, D)
    w.linear(head + "pos_linear", D, 2 * D)
    # released parts OMG-LLaVA never uses, and a key this converter does not know
    w.linear(head + "iou_embed.0", D, D)
    w.add(head + "future_part.weight", 2)
    return dict(w)


def class_embeddings() -> torch.Tensor:
    return F.normalize(
        torch.randn(CLASSES, PROTOTYPES, EMBED, generator=torch.Generator().manual_seed(1)), dim=-1
    )


def train_sentencepiece(folder) -> None:
    import sentencepiece

    text = folder / "corpus.txt"
    text.write_text(
        "\n".join(
            [
                "Please segment the cat in this image.",
                "What is in the region? A red circle.",
                "the quick brown fox jumps over the lazy dog",
                "数字 123 and more text",
            ]
            * 40
        )
    )
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=360,
        model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    text.unlink()


def internlm2_state(vocab: int) -> dict[str, torch.Tensor]:
    w = Weights(2)
    head_dim = H // LLM_HEADS
    w.add("model.tok_embeddings.weight", vocab, H, scale=1.0)
    for i in range(LLM_LAYERS):
        p = f"model.layers.{i}."
        w.add(p + "attention.wqkv.weight", (LLM_HEADS + 2 * KV_HEADS) * head_dim, H)
        w.add(p + "attention.wo.weight", H, H)
        w.add(p + "feed_forward.w1.weight", FF, H)
        w.add(p + "feed_forward.w3.weight", FF, H)
        w.add(p + "feed_forward.w2.weight", H, FF)
        w.norm(p + "attention_norm", H)
        w.norm(p + "ffn_norm", H)
    w.norm("model.norm", H)
    w.add("output.weight", vocab, H)
    return {k: v for k, v in w.items() if not k.endswith("norm.bias")}  # RMSNorm: weights only


def xtuner_pth(vocab: int) -> dict[str, torch.Tensor]:
    """`OMG_LLaVA.state_dict()` after the QLoRA finetune: embeddings and output head (resized for the four
    added tokens), LoRA on every Linear of the LLM (output included, so its base weight is `base_layer`),
    and the projectors."""
    w = Weights(3)
    llm = "llm.base_model.model."
    w.add(llm + "model.tok_embeddings.weight", vocab + 4, H, scale=1.0)
    w.add(llm + "output.base_layer.weight", vocab + 4, H)
    head_dim = H // LLM_HEADS
    modules = {"output": (vocab + 4, H)}
    for i in range(LLM_LAYERS):
        p = f"model.layers.{i}."
        modules |= {
            p + "attention.wqkv": ((LLM_HEADS + 2 * KV_HEADS) * head_dim, H),
            p + "attention.wo": (H, H),
            p + "feed_forward.w1": (FF, H),
            p + "feed_forward.w3": (FF, H),
            p + "feed_forward.w2": (H, FF),
        }
    for module, (out, inp) in modules.items():
        w.add(f"{llm}{module}.lora_A.default.weight", RANK, inp)
        w.add(f"{llm}{module}.lora_B.default.weight", out, RANK, scale=0.1)
    pixel, query = 4 * WIDTHS[-1], 2 * D
    w.linear("projector.model.model_feat.0", H, pixel + query)
    w.linear("projector.model.model_feat.2", H, H)
    w.linear("projector.model.query_proj", pixel, query)
    w.linear("projector.model.model.0", H, pixel)
    w.linear("projector.model.model.2", H, H)
    w.add("projector.model.seperate_embed.weight", 1, H)
    w.linear("projector_text2vision.model.0", query, H)
    w.linear("projector_text2vision.model.2", query, query)
    w.linear(
        "projector.model.visual_prompt_query_proj", pixel, query
    )  # the visual_prompt_proj variant's copy
    return dict(w)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The four released inputs on disk, in their layouts."""
    import sentencepiece

    root = tmp_path_factory.mktemp("omg-release")
    llm = root / "internlm2-chat-7b"
    llm.mkdir()
    train_sentencepiece(llm)
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(llm / "tokenizer.model")).get_piece_size()
    (llm / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["InternLM2ForCausalLM"],
                "model_type": "internlm2",
                "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
                "hidden_size": H,
                "intermediate_size": FF,
                "num_attention_heads": LLM_HEADS,
                "num_key_value_heads": KV_HEADS,
                "num_hidden_layers": LLM_LAYERS,
                "rms_norm_eps": 1e-5,
                "rope_theta": 1000000,
                "rope_scaling": {"type": "dynamic", "factor": 2.0},
                "max_position_embeddings": 256,
                "vocab_size": vocab,
                "bias": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 2,
                "tie_word_embeddings": False,
                "hidden_act": "silu",
            }
        )
    )
    (llm / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "InternLM2Tokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "added_tokens_decoder": {
                    "3": {"content": "<|im_start|>", "special": True},
                    "4": {"content": "<|im_end|>", "special": True},
                },
            }
        )
    )
    base = internlm2_state(vocab)
    save_file(base, str(llm / "model.safetensors"))
    segmenter, pth = omg_seg_state(), xtuner_pth(vocab)
    torch.save({"meta": {"epoch": 12}, "state_dict": segmenter}, root / "omg_seg_convl.pth")
    torch.save(class_embeddings(), root / "ov_classes.pth")
    torch.save(pth, root / "omg_llava_7b_finetune_8gpus.pth")
    return {
        "root": root,
        "llm": llm,
        "vocab": vocab,
        "base": base,
        "segmenter": segmenter,
        "pth": pth,
        "seg_path": root / "omg_seg_convl.pth",
        "pth_path": root / "omg_llava_7b_finetune_8gpus.pth",
        "ov_path": root / "ov_classes.pth",
    }


def convert(released, out, **overrides):
    kwargs = {
        "segmenter": released["seg_path"],
        "llm": released["llm"],
        "class_embeddings": released["ov_path"],
        "lora_alpha": ALPHA,
        "image_size": IMAGE,
        "dtype": torch.float32,
    }
    pth = overrides.pop("pth", released["pth_path"])
    return convert_xtuner_checkpoint(pth, out, **(kwargs | overrides))


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory):
    out = tmp_path_factory.mktemp("omg-converted") / "model"
    result = convert(released, out)
    return result, load_model(out)


def test_every_released_key_is_loaded_or_reported(released, converted):
    result, model = converted
    assert isinstance(model, OMGLlavaModel)
    seg, pth = str(released["seg_path"]), str(released["pth_path"])
    assert set(result.unused) == {seg, pth}  # nothing of the LLM directory is left over
    assert set(result.unused[seg]) == UNUSED_SEGMENTER
    assert "unknown key" in result.unused[seg]["panoptic_head.future_part.weight"]
    assert "IoU head" in result.unused[seg]["panoptic_head.iou_embed.0.weight"]
    assert set(result.unused[pth]) == {
        "projector.model.visual_prompt_query_proj.weight",
        "projector.model.visual_prompt_query_proj.bias",
    }
    report = json.loads((result.out_dir / REPORT_NAME).read_text())
    assert report["not_loaded"] == result.unused
    assert any("r=4, alpha=8, scale 2" in note for note in result.notes)
    assert "not loaded from" in result.summary()
    # everything else is in the model: projectors one to one, the separator flattened
    sd = released["pth"]
    tower = model.vision_tower
    assert torch.equal(model.projector[0].weight, sd["projector.model.model_feat.0.weight"])
    assert torch.equal(tower.query_projection.bias, sd["projector.model.query_proj.bias"])
    assert torch.equal(tower.object_mlp[2].weight, sd["projector.model.model.2.weight"])
    assert torch.equal(tower.separator, sd["projector.model.seperate_embed.weight"][0])
    assert torch.equal(tower.seg_head[0].weight, sd["projector_text2vision.model.0.weight"])
    attention = tower.perception.model.pixel_level_module.decoder.encoder.layers[0].self_attn
    assert torch.equal(
        attention.sampling_offsets.weight,
        released["segmenter"][
            "panoptic_head.pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.weight"
        ],
    )


def test_tokenizer_keeps_the_released_token_ids(released, converted):
    import sentencepiece

    _, model = converted
    tokenizer, vocab = model.tokenizer, released["vocab"]
    processor = sentencepiece.SentencePieceProcessor(model_file=str(released["llm"] / "tokenizer.model"))
    for text in ("Please segment the cat in this image.", " two  spaces\nline", "数字 é"):
        assert tokenizer(text)["input_ids"] == [1] + processor.encode(text)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("[SEG]", "<p>", "</p>", "<region>", "<mark>")]
    assert ids == [vocab, vocab + 1, vocab + 2, vocab + 3, vocab + 4]  # the rows the .pth trained
    assert tokenizer("a [SEG] b")["input_ids"].count(vocab) == 1
    assert "<|im_start|>" in tokenizer.chat_template
    assert model.language_model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_split_wqkv_follows_internlm2_packing():
    heads, kv_heads, head_dim = 4, 2, 3
    groups = heads // kv_heads
    # row r of wqkv holds its own label: (kv head, slot in [q_0 .. q_{g-1}, k, v], dim)
    labels = [(h, s, d) for h in range(kv_heads) for s in range(groups + 2) for d in range(head_dim)]
    packed = torch.tensor([[h * 100 + s * 10 + d] for h, s, d in labels], dtype=torch.float32)
    q, k, v = split_wqkv(packed, heads, kv_heads)
    # query head i = h * g + j is slot j of KV head h; k and v are slots g and g + 1
    expected_q = [
        h * 100 + j * 10 + d for h in range(kv_heads) for j in range(groups) for d in range(head_dim)
    ]
    assert q[:, 0].tolist() == expected_q
    assert k[:, 0].tolist() == [h * 100 + groups * 10 + d for h in range(kv_heads) for d in range(head_dim)]
    assert v[:, 0].tolist() == [
        h * 100 + (groups + 1) * 10 + d for h in range(kv_heads) for d in range(head_dim)
    ]


def internlm2_reference(base, pth, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2's forward written from its modeling code, on the packed weights, with the LoRA deltas
    as separate adapter paths (not merged): logits (T, rows)."""
    weights = dict(base)
    weights["model.tok_embeddings.weight"] = pth["llm.base_model.model.model.tok_embeddings.weight"]
    weights["output.weight"] = pth["llm.base_model.model.output.base_layer.weight"]
    scale = ALPHA / RANK

    def linear(x, module):
        y = x @ weights[f"{module}.weight"].T
        down = pth.get(f"llm.base_model.model.{module}.lora_A.default.weight")
        if down is not None:
            y = y + scale * (x @ down.T) @ pth[f"llm.base_model.model.{module}.lora_B.default.weight"].T
        return y

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    steps, head_dim = len(ids), H // LLM_HEADS
    groups = LLM_HEADS // KV_HEADS
    inv_freq = 1.0 / (1000000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(steps).float(), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]

    def rotate(x):
        return x * cos + torch.cat([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], -1) * sin

    hidden = weights["model.tok_embeddings.weight"][ids]
    causal = torch.full((steps, steps), float("-inf")).triu(1)
    for i in range(LLM_LAYERS):
        p = f"model.layers.{i}."
        x = rms(hidden, weights[p + "attention_norm.weight"])
        qkv = linear(x, p + "attention.wqkv").reshape(steps, KV_HEADS, groups + 2, head_dim)  # "(h gs d)"
        q = rotate(qkv[:, :, :groups].reshape(steps, LLM_HEADS, head_dim))
        k = rotate(qkv[:, :, -2]).repeat_interleave(groups, dim=1)
        v = qkv[:, :, -1].repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim) + causal
        attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(steps, H)
        hidden = hidden + linear(attended, p + "attention.wo")
        x = rms(hidden, weights[p + "ffn_norm.weight"])
        hidden = hidden + linear(
            F.silu(linear(x, p + "feed_forward.w1")) * linear(x, p + "feed_forward.w3"), p + "feed_forward.w2"
        )
    return linear(rms(hidden, weights["model.norm.weight"]), "output")


def test_converted_llama_reproduces_internlm2_with_lora(released, converted):
    _, model = converted
    rows = released["vocab"] + 4
    ids = torch.randint(0, rows, (9,), generator=torch.Generator().manual_seed(4))
    expected = internlm2_reference(released["base"], released["pth"], ids)
    with torch.no_grad():
        logits = model.language_model(input_ids=ids[None]).logits[0]
    assert type(model.language_model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits[:, :rows], expected, atol=1e-4, rtol=1e-4)


# -- the segmenter: references written from the released layout --------------------------------------


def layer_norm_2d(x, sd, name):
    return F.layer_norm(
        x.permute(0, 2, 3, 1), x.shape[1:2], sd[name + ".weight"], sd[name + ".bias"], 1e-6
    ).permute(0, 3, 1, 2)


def timm_convnext(sd, pixels):
    """The four stage outputs of open_clip's timm ConvNeXt, as OMG-Seg's backbone returns them."""
    x = layer_norm_2d(
        F.conv2d(pixels, sd["backbone.stem.0.weight"], sd["backbone.stem.0.bias"], stride=4),
        sd,
        "backbone.stem.1",
    )
    outs = []
    for i in range(4):
        stage = f"backbone.layer{i + 1}."
        if i:
            x = layer_norm_2d(x, sd, stage + "downsample.0")
            x = F.conv2d(x, sd[stage + "downsample.1.weight"], sd[stage + "downsample.1.bias"], stride=2)
        b = stage + "blocks.0."
        y = F.conv2d(x, sd[b + "conv_dw.weight"], sd[b + "conv_dw.bias"], padding=3, groups=x.shape[1])
        y = F.layer_norm(
            y.permute(0, 2, 3, 1), y.shape[1:2], sd[b + "norm.weight"], sd[b + "norm.bias"], 1e-6
        )
        y = F.linear(
            F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
            sd[b + "mlp.fc2.weight"],
            sd[b + "mlp.fc2.bias"],
        )
        x = x + (y * sd[b + "gamma"]).permute(0, 3, 1, 2)
        outs.append(x)
    return outs


def group_norm(x, sd, name):
    return F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"])


def pixel_decoder(sd, feats):
    """mmdet's MSDeformAttnPixelDecoder with the deformable attention's output zeroed (see omg_seg_state)."""
    p = "panoptic_head.pixel_decoder."
    enc = p + "encoder.layers.0."

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"])

    outs = []
    for i in range(3):  # coarse to fine, input_convs[i] on level 3 - i
        x = group_norm(
            F.conv2d(
                feats[3 - i], sd[f"{p}input_convs.{i}.conv.weight"], sd[f"{p}input_convs.{i}.conv.bias"]
            ),
            sd,
            f"{p}input_convs.{i}.gn",
        ).permute(0, 2, 3, 1)
        x = ln(x, enc + "norms.0")
        ffn = F.linear(
            F.relu(F.linear(x, sd[enc + "ffn.layers.0.0.weight"], sd[enc + "ffn.layers.0.0.bias"])),
            sd[enc + "ffn.layers.1.weight"],
            sd[enc + "ffn.layers.1.bias"],
        )
        outs.append(ln(x + ffn, enc + "norms.1").permute(0, 3, 1, 2))
    lateral = group_norm(
        F.conv2d(feats[0], sd[p + "lateral_convs.0.conv.weight"]), sd, p + "lateral_convs.0.gn"
    )
    y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
    y = F.relu(
        group_norm(F.conv2d(y, sd[p + "output_convs.0.conv.weight"], padding=1), sd, p + "output_convs.0.gn")
    )
    return outs, F.conv2d(y, sd[p + "mask_feature.weight"], sd[p + "mask_feature.bias"])


def sine_3d(batch, height, width, feats=D // 2, temperature=10000, eps=1e-6):
    """mmdet's SinePositionalEncoding3D(normalize=True) for one frame -> (B, HW, 2 * feats). Its frame term
    adds one constant vector to every position, which cancels in the cross-attention softmax."""
    ones = torch.ones(batch, 1, height, width)
    scale = 2 * math.pi
    z = ones.cumsum(1) / (ones.cumsum(1)[:, -1:] + eps) * scale
    y = ones.cumsum(2) / (ones.cumsum(2)[:, :, -1:] + eps) * scale
    x = ones.cumsum(3) / (ones.cumsum(3)[:, :, :, -1:] + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(feats) // 2) / feats)
    dim_z = temperature ** (2 * (torch.arange(2 * feats) // 2) / (2 * feats))

    def sincos(v, dims):
        v = v[..., None] / dims
        return torch.stack((v[..., 0::2].sin(), v[..., 1::2].cos()), dim=5).flatten(4)

    pos = torch.cat([sincos(y, dim_t), sincos(x, dim_t)], dim=4) + sincos(z, dim_z)
    return pos[:, 0].flatten(1, 2)


def mha(sd, name):
    module = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
    module.load_state_dict(
        {
            "in_proj_weight": sd[name + ".in_proj_weight"],
            "in_proj_bias": sd[name + ".in_proj_bias"],
            "out_proj.weight": sd[name + ".out_proj.weight"],
            "out_proj.bias": sd[name + ".out_proj.bias"],
        }
    )
    return module


def mmdet_decoder(sd, ov, multi_scale, mask_features, query=None, query_pos=None, restrict=None):
    """Mask2FormerVideoSemSamHead.forward for images: per layer (class logits, mask logits), and the query
    states it hands on (the last layer's output, not normalised). With `query`/`query_pos` (B, K, D) and
    `restrict(mask_logits_at_size) -> blocked` it is the head's visual-prompt forward instead."""
    head, dec = "panoptic_head.", "panoptic_head.transformer_decoder."

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"])

    def mlp(x, name, layers, last_act=False):
        for n, index in enumerate(layers):
            x = F.linear(x, sd[f"{name}.{index}.weight"], sd[f"{name}.{index}.bias"])
            x = F.relu(x) if n < len(layers) - 1 or last_act else x
        return x

    batch = mask_features.shape[0]
    inputs = [
        m.flatten(2).transpose(1, 2) + sd[head + "level_embed.weight"][i] for i, m in enumerate(multi_scale)
    ]
    positions = [sine_3d(batch, *m.shape[-2:]) for m in multi_scale]
    query = sd[head + "query_feat.weight"].expand(batch, -1, -1) if query is None else query
    query_pos = sd[head + "query_embed.weight"].expand(batch, -1, -1) if query_pos is None else query_pos
    text = torch.cat([ov, torch.zeros(1, PROTOTYPES, EMBED)]).permute(2, 0, 1)  # background: zero prototype

    def predict(q, size):
        normed = ln(q, dec + "post_norm")
        masks = torch.einsum("bqc,bchw->bqhw", mlp(normed, head + "mask_embed", (0, 2, 4)), mask_features)
        binary = (masks > 0).float()
        pooled = torch.einsum(
            "bchw,bqhw->bqc", mask_features, binary / (binary.sum((-1, -2), keepdim=True) + 1e-8)
        )
        pooled = F.linear(
            ln(pooled, head + "mask_pooling_proj.0"),
            sd[head + "mask_pooling_proj.1.weight"],
            sd[head + "mask_pooling_proj.1.bias"],
        )
        embedding = F.normalize(mlp(pooled + normed, head + "cls_proj", (0, 2, 4)), dim=-1)
        classes = torch.einsum("bnc,ckp->bnkp", embedding, text).max(-1).values * math.exp(4.6052)
        resized = F.interpolate(masks, size, mode="bilinear", align_corners=False)
        attn = resized.flatten(2).sigmoid() < 0.5 if restrict is None else restrict(resized)
        return classes, masks, attn.repeat_interleave(HEADS, dim=0)

    classes, masks, attn = predict(query, multi_scale[0].shape[-2:])
    results = [(classes, masks)]
    for i in range(LAYERS):
        level = i % 3
        attn[attn.all(-1)] = False
        layer = f"{dec}layers.{i}."
        with torch.no_grad():
            cross = mha(sd, layer + "cross_attn.attn")(
                query + query_pos,
                inputs[level] + positions[level],
                inputs[level],
                attn_mask=attn,
                need_weights=False,
            )[0]
            query = ln(query + cross, layer + "norms.0")
            self_out = mha(sd, layer + "self_attn.attn")(
                query + query_pos, query + query_pos, query, need_weights=False
            )[0]
            query = ln(query + self_out, layer + "norms.1")
            query = ln(query + mlp(query, layer + "ffn.layers", ("0.0", "1")), layer + "norms.2")
        classes, masks, attn = predict(query, multi_scale[(i + 1) % 3].shape[-2:])
        results.append((classes, masks))
    return results, query


def test_converted_segmenter_matches_the_released_computation(released, converted):
    _, model = converted
    perception = model.vision_tower.perception
    sd = released["segmenter"]
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        backbone = perception.model.pixel_level_module.encoder(pixels).feature_maps
        for ours, theirs in zip(
            backbone, timm_convnext(sd, pixels), strict=True
        ):  # raw stage outputs, no norm
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        pixel = perception.model.pixel_level_module(pixels)
        multi_scale, mask_features = pixel_decoder(sd, list(backbone))
        for ours, theirs in zip(pixel.decoder_hidden_states, multi_scale, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pixel.decoder_last_hidden_state, mask_features, atol=1e-4, rtol=1e-4)
        out = perception(pixels)
        expected, queries = mmdet_decoder(
            sd, class_embeddings(), list(pixel.decoder_hidden_states), pixel.decoder_last_hidden_state
        )
    assert len(out.class_logits) == len(expected) == LAYERS + 1
    for ours_classes, ours_masks, (classes, masks) in zip(
        out.class_logits, out.mask_logits, expected, strict=True
    ):
        torch.testing.assert_close(ours_masks, masks, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours_classes, classes, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(
        out.queries, queries, atol=1e-4, rtol=1e-4
    )  # what OMG-LLaVA's tokens are built from
    assert out.class_logits[-1].shape == (2, QUERIES, CLASSES + 1)
    assert (out.class_logits[-1][..., -1] == 0).all()  # the zero background prototype


def released_prompt_start(sd, points):
    """OMG-Seg's prepare_sam_query: a +-3 px box around each point (N, 2) in input pixels, normalised,
    cxcywh, through inverse_sigmoid and sigmoid, mmdet's coordinate_to_encoding, pos_linear."""
    boxes = torch.cat([points - 3, points + 3], dim=-1) / IMAGE
    boxes = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=-1)
    x = boxes.clamp(0, 1)
    boxes = torch.log(x.clamp(min=1e-5) / (1 - x).clamp(min=1e-5)).sigmoid()
    feats = sd["panoptic_head.pos_linear.weight"].shape[1] // 4
    dim_t = 10000 ** (2 * (torch.arange(feats) // 2) / feats)

    def encode(v):
        v = (v * 2 * math.pi)[:, None] / dim_t
        return torch.stack((v[:, 0::2].sin(), v[:, 1::2].cos()), dim=-1).flatten(1)

    encoding = torch.cat(
        [encode(boxes[:, 1]), encode(boxes[:, 0]), encode(boxes[:, 2]), encode(boxes[:, 3])], -1
    )
    position = F.linear(encoding, sd["panoptic_head.pos_linear.weight"], sd["panoptic_head.pos_linear.bias"])
    content = sd["panoptic_head.pb_embedding.weight"][0] + sd["panoptic_head.mask_tokens.weight"][0]
    return content.expand(len(points), -1)[:, None], position[:, None]


def test_visual_prompts_use_the_released_prompt_queries(released, converted):
    """Box, point and mask prompts through the converted segmenter against OMG-Seg's own prompt forward:
    the query start from pb_embedding / mask_tokens / pos_linear, a box limiting the query's predicted
    mask, a point unrestricted, a mask prompt the only place the query looks."""
    from unillava.omg.perception.prompts import encode_prompts, prompt_region

    _, model = converted
    perception = model.vision_tower.perception
    assert perception.config.prompt_queries == "omg_seg"
    sd = released["segmenter"]
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(IMAGE, IMAGE, dtype=torch.bool)
    mask[40:90, 20:70] = True
    prompts = [
        {"type": "box", "box": [32, 64, 96, 128]},  # on the coarsest (stride 32) cell edges
        {"type": "point", "point": [50.5, 70.5]},
        {"type": "mask", "mask": mask.numpy()},
    ]
    regions = [prompt_region(p, IMAGE, IMAGE, IMAGE) for p in prompts]
    with torch.no_grad():
        memory = perception.encode(pixels)
        ours = encode_prompts(perception, memory, regions)
        pixel = perception.model.pixel_level_module(pixels)
        levels, mask_features = list(pixel.decoder_hidden_states), pixel.decoder_last_hidden_state

        def box_rule(resized):
            h, w = resized.shape[-2:]
            inside = torch.zeros(h, w, dtype=torch.bool)
            inside[int(64 / IMAGE * h) : int(128 / IMAGE * h), int(32 / IMAGE * w) : int(96 / IMAGE * w)] = (
                True
            )
            return torch.where(inside, resized, torch.full_like(resized, -100.0)).flatten(2).sigmoid() < 0.5

        def mask_rule(resized):
            return (
                ~F.interpolate(mask[None, None].float(), resized.shape[-2:], mode="nearest").flatten(2).bool()
            )

        anchors = torch.tensor(
            [[64.0, 96.0], [50.5, 70.5], [regions[2].anchor[0] * IMAGE, regions[2].anchor[1] * IMAGE]]
        )
        content, position = released_prompt_start(sd, anchors)
        for row, rule in enumerate((box_rule, None, mask_rule)):
            _, query = mmdet_decoder(
                sd,
                class_embeddings(),
                levels,
                mask_features,
                content[row : row + 1],
                position[row : row + 1],
                restrict=rule,
            )
            expected = torch.cat([query[0, 0], position[row, 0]])
            torch.testing.assert_close(ours[row], expected, atol=1e-4, rtol=1e-4)
        mean_start = encode_prompts(model_with_mean_queries(perception), memory, regions)
    assert not torch.allclose(mean_start, ours, atol=1e-3)  # the released start is what made the difference


def model_with_mean_queries(perception):
    """The same segmenter without OMG-Seg's prompt-query weights (unillava's default start)."""
    import copy

    plain = copy.deepcopy(perception)
    plain.prompt_query = None
    return plain


def test_trainable_decoder_copy_loads_as_the_seg_decoder(released, tmp_path):
    pth = dict(released["pth"])
    copies = {}
    for key, value in released["segmenter"].items():
        for source, target in (
            ("panoptic_head.transformer_decoder.", "transformer_decoder_llm."),
            ("panoptic_head.mask_embed.", "mask_embed_llm."),
        ):
            if key.startswith(source):
                copies["visual_encoder.panoptic_head." + target + key[len(source) :]] = value + 1
    pth |= copies
    torch.save(pth, tmp_path / "refseg.pth")
    result = convert(released, tmp_path / "model", pth=tmp_path / "refseg.pth")
    model = load_model(result.out_dir)
    assert model.config.vision.extra["seg_decoder"] == "trainable"
    copy = model.vision_tower.seg_decoder
    assert torch.equal(
        copy.layers[1].fc1.weight,
        copies["visual_encoder.panoptic_head.transformer_decoder_llm.layers.1.ffn.layers.0.0.weight"],
    )
    assert torch.equal(
        copy.get_submodule("mask_predictor.mask_embedder.2.0").bias,
        copies["visual_encoder.panoptic_head.mask_embed_llm.4.bias"],
    )
    assert not torch.equal(
        copy.layers[1].fc1.weight,
        model.vision_tower.perception.model.transformer_module.decoder.layers[1].fc1.weight,
    )


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("segmenter", "panoptic_head.transformer_decoder.layers.1.ffn.layers.1.weight"),
        ("segmenter", "backbone.layer3.blocks.0.gamma"),
        ("llm", "model.layers.1.feed_forward.w2.weight"),
        ("pth", "projector.model.query_proj.weight"),
    ],
)
def test_a_missing_key_is_named_with_its_file(released, tmp_path, where, key):
    paths = {}
    if where == "segmenter":
        state = {k: v for k, v in released["segmenter"].items() if k != key}
        torch.save({"state_dict": state}, tmp_path / "seg.pth")
        paths["segmenter"] = tmp_path / "seg.pth"
        named = key if key.startswith("panoptic") else "encoder.stages.2.layers.0.layer_scale_parameter"
    elif where == "pth":
        torch.save({k: v for k, v in released["pth"].items() if k != key}, tmp_path / "x.pth")
        paths["pth"] = tmp_path / "x.pth"
        named = key
    else:
        llm = tmp_path / "llm"
        llm.mkdir()
        for name in ("config.json", "tokenizer_config.json", "tokenizer.model"):
            (llm / name).write_bytes((released["llm"] / name).read_bytes())
        save_file({k: v for k, v in released["base"].items() if k != key}, str(llm / "model.safetensors"))
        paths["llm"] = llm
        named = key
    source = str(next(iter(paths.values())))
    with pytest.raises(CheckpointError, match="missing") as err:
        convert(released, tmp_path / "out", **paths)
    assert source in str(err.value) and named in str(err.value)
    assert not (tmp_path / "out").exists()


def test_open_vocabulary_head_needs_the_class_embeddings(released, tmp_path):
    with pytest.raises(CheckpointError, match="class_embeddings="):
        convert(released, tmp_path / "out", class_embeddings=None)


def test_open_clip_backbone_for_a_segmenter_without_one(released):
    segmenter = {k: v for k, v in released["segmenter"].items() if not k.startswith("backbone.")}
    open_clip = {
        "visual.trunk." + re.sub(r"^layer(\d)", lambda m: f"stages.{int(m.group(1)) - 1}", k[9:]): v
        for k, v in released["segmenter"].items()
        if k.startswith("backbone.") and not k.startswith("backbone.head.")
    }  # timm names, CLIP prefix
    open_clip |= {
        "visual.trunk.head.norm.weight": torch.ones(WIDTHS[-1]),
        "visual.trunk.head.norm.bias": torch.zeros(WIDTHS[-1]),
        "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 1),
    }
    config, state, unused = convert_segmenter(
        segmenter, "seg.pth", class_embeddings(), open_clip, "open_clip.bin"
    )
    _, reference, _ = convert_segmenter(released["segmenter"], "seg.pth", class_embeddings())
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert set(unused["open_clip.bin"]) == {
        "transformer.resblocks.0.attn.in_proj_weight",
        "visual.trunk.head.norm.weight",
        "visual.trunk.head.norm.bias",
    }
    assert config["backbone_config"]["depths"] == [1, 1, 1, 1] and config["decoder_layers"] == LAYERS + 1


def test_convert_cli(released, tmp_path, capsys):
    from unillava.cli import main

    out = tmp_path / "model"
    code = main(
        [
            "convert",
            "omg-xtuner",
            "--pth",
            str(released["pth_path"]),
            "--segmenter",
            str(released["seg_path"]),
            "--llm",
            str(released["llm"]),
            "--class-embeddings",
            str(released["ov_path"]),
            "--lora-alpha",
            str(ALPHA),
            "--image-size",
            str(IMAGE),
            "--dtype",
            "float32",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and f"wrote {out}" in printed and "IoU head" in printed
    assert (out / "unillava_config.json").is_file() and (out / REPORT_NAME).is_file()
    assert (
        main(
            [
                "convert",
                "omg-xtuner",
                "--pth",
                str(released["pth_path"]),
                "--segmenter",
                str(released["seg_path"]),
                "--llm",
                str(released["llm"]),
                "--out",
                str(out),
            ]
        )
        == 2
    )  # OUT is not empty
