"""The fast decoding path: the same tokens as transformers' generate, and int4 weights that stay close."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

import unillava
from unillava.cli import main as cli_main
from unillava.decoding import (
    FastDecoder,
    Int4Linear,
    RescoredHead,
    _int4_fused,
    fast_decoding_unsupported,
    lora_factors,
)
from unillava.errors import UnillavaError
from unillava.inference import InferenceModel
from unillava.modeling import LlavaModel
from unillava.testing import tiny_llama_config, tiny_model_config

PAD = 0
EOS = [3, 7]


def _tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**{**tiny_llama_config(vocab_size=96), "num_hidden_layers": 3})
    return LlamaForCausalLM(config).to(dtype).eval()


def _left_padded_batch(language_model: LlamaForCausalLM, lengths: list[int]):
    torch.manual_seed(1)
    width = max(lengths)
    ids = torch.randint(10, 96, (len(lengths), width))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
        ids[row, : width - length] = PAD
    return language_model.get_input_embeddings()(ids).detach(), mask


def _both(language_model, embeds, mask, **kwargs):
    with torch.inference_mode():
        reference = language_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        fast = FastDecoder(language_model).generate(embeds, mask, **kwargs)
    return reference, fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[9], [5, 12, 1]])
def test_greedy_tokens_equal_generate(dtype, lengths):
    language_model = _tiny_llama(dtype)
    embeds, mask = _left_padded_batch(language_model, lengths)
    reference, fast = _both(
        language_model, embeds, mask, max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=EOS
    )
    assert torch.equal(reference, fast)


def test_eos_min_new_tokens_and_stopping_criteria_as_generate():
    language_model = _tiny_llama()
    embeds, mask = _left_padded_batch(language_model, [6, 10])
    with torch.inference_mode():
        free = language_model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD
        )
    # The first generated token of row 0 becomes an end token: without min_new_tokens row 0 stops at
    # once and is padded; with it, the end token is suppressed for the first 4 steps.
    eos = [int(free[0, 0])]
    common = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": PAD, "eos_token_id": eos}
    reference, fast = _both(language_model, embeds, mask, **common)
    assert torch.equal(reference, fast) and (fast[0, 1:] == PAD).all()
    reference, fast = _both(language_model, embeds, mask, min_new_tokens=4, **common)
    assert torch.equal(reference, fast) and fast[0, 0] != eos[0]

    class StopAfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 3, dtype=torch.bool)

    reference, fast = _both(
        language_model, embeds, mask, stopping_criteria=StoppingCriteriaList([StopAfterThree()]), **common
    )
    assert torch.equal(reference, fast) and fast.shape[1] <= 3


def test_seeded_sampling_equals_generate():
    language_model = _tiny_llama()
    embeds, mask = _left_padded_batch(language_model, [7, 4])
    kwargs = {"max_new_tokens": 16, "do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0}
    with torch.inference_mode():
        torch.manual_seed(5)
        reference = language_model.generate(
            inputs_embeds=embeds, attention_mask=mask, pad_token_id=PAD, **kwargs
        )
        torch.manual_seed(5)
        fast = FastDecoder(language_model).generate(embeds, mask, pad_token_id=PAD, **kwargs)
    assert torch.equal(reference, fast)


@pytest.fixture(scope="module")
def model() -> LlavaModel:
    torch.manual_seed(0)
    return LlavaModel.from_config(tiny_model_config()).eval()


def _pictures() -> list[Image.Image]:
    return [Image.new("RGB", (32 + 8 * i, 32), (60 * i, 200 - 40 * i, 90)) for i in range(3)]


def test_inference_model_texts_equal_on_both_paths(model):
    fast, plain = InferenceModel(model), InferenceModel(model, fast=False)
    assert fast.decode_path == "fast" and plain.decode_path.startswith("generate")
    prompts = ["Describe it.", "What colour is the big shape here?", "Count."]
    pictures = _pictures()
    settings = {"max_new_tokens": 12, "batch_size": 3}
    assert fast.generate(prompts, pictures, **settings) == plain.generate(prompts, pictures, **settings)
    stop = fast.generate(prompts[0], pictures[0], max_new_tokens=12)[3:6]
    with_stop = {"max_new_tokens": 12, "stop": [stop]}
    assert fast.generate(prompts[0], pictures[0], **with_stop) == plain.generate(
        prompts[0], pictures[0], **with_stop
    )
    messages = [{"role": "user", "content": "Tell me about the weather."}]
    streamed = "".join(fast.chat(messages, stream=True, max_new_tokens=10))
    assert streamed.strip() == plain.chat(messages, max_new_tokens=10)


def test_int4_linear_is_close_and_exact_on_its_own_grid():
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    x = torch.randn(3, 64)
    layer = Int4Linear(weight)
    dense = F.linear(x, weight)
    assert (layer(x) - dense).abs().max() < 0.15 * dense.abs().max()
    # Weights already on an int4 grid (code * scale + low, per group of 32, bf16-exact scales) come back
    # as themselves: the kernel then differs from a bf16 matmul of those weights by rounding only.
    codes = torch.randint(0, 16, (48, 64)).float()
    codes[:, 0::32], codes[:, 1::32] = 0, 15  # every group spans the whole code range
    scale = torch.tensor([0.25, 0.125]).repeat(48, 1).repeat_interleave(32, dim=1)
    gridded = codes * scale - 1.0
    reference = F.linear(x.bfloat16(), gridded.bfloat16()).float()
    assert torch.allclose(Int4Linear(gridded)(x), reference, rtol=1e-2, atol=0.1)


def test_int4_path_decodes_and_reports_itself(model):
    quantized = InferenceModel(model, quantize="int4")
    assert quantized.decode_path == "fast int4"
    answer = quantized.generate("Describe it.", _pictures()[0], max_new_tokens=6)
    assert isinstance(answer, str)


def test_unsupported_models_fall_back_with_a_reason(model):
    class Custom(LlamaForCausalLM):
        pass

    assert fast_decoding_unsupported(Custom(_tiny_llama().config)) is not None
    with pytest.raises(UnillavaError, match="quantize must be one of"):
        InferenceModel(model, quantize="int3")


def test_cli_quantize_flag(tiny_model_dir, tmp_path, capsys):
    picture = tmp_path / "p.png"
    _pictures()[0].save(picture)
    args = ["generate", "--model", str(tiny_model_dir), "--image", str(picture), "--prompt", "Hi."]
    assert cli_main([*args, "--max-new-tokens", "6", "--quantize", "int4", "--json"]) in (0, None)
    printed = json.loads(capsys.readouterr().out)["text"]
    quantized = unillava.load(tiny_model_dir, quantize="int4")
    assert printed == quantized.generate("Hi.", str(picture), max_new_tokens=6)
    assert unillava.load(tiny_model_dir, fast=False).decode_path.startswith("generate")


def test_int4_keeps_a_merged_lora_adapter_apart(tmp_path):
    """A fine-tune's update is smaller than an int4 step: quantizing the merged weight rounds it away,
    quantizing the base and adding the adapter's factors keeps it."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (48, 64)).float()
    codes[:, 0::32], codes[:, 1::32] = 0, 15
    base = codes * 0.25 - 2.0  # on the int4 grid, as a Q4_1 GGUF's weights are
    down, up = torch.randn(4, 64) * 0.1, torch.randn(48, 4) * 0.1  # B A: about a fifth of a step
    merged = torch.nn.Linear(64, 48, bias=False)
    merged.weight.data = base + up @ down
    x = torch.randn(3, 64)
    exact = merged(x).detach()
    kept = _int4_fused([("proj", merged)], {"proj": (down, up)})(x)
    rounded = _int4_fused([("proj", merged)], {})(x)
    assert (kept - exact).abs().max() < 0.25 * (rounded - exact).abs().max()


def test_lora_factors_read_a_peft_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    language_model = _tiny_llama()
    adapted = get_peft_model(
        language_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.01)
    adapted.save_pretrained(tmp_path / "adapter")
    lora_q = adapted.base_model.model.model.layers[1].self_attn.q_proj
    expected = lora_q.lora_B["default"].weight @ lora_q.lora_A["default"].weight * 2.0
    factors = lora_factors(tmp_path / "adapter")
    assert len(factors) == 2 * 3
    down, up = factors["model.layers.1.self_attn.q_proj"]
    assert torch.allclose(up @ down, expected.detach(), atol=1e-7)


def test_rescored_head_picks_the_dense_best_token():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 500, bias=False)
    x = torch.randn(6, 64)
    dense = head(x).detach()
    rescored = RescoredHead(head, top=16)(x)
    assert torch.equal(rescored.argmax(-1), dense.argmax(-1))
    best = dense.topk(3, dim=-1).indices
    assert torch.allclose(rescored.gather(-1, best), dense.gather(-1, best), atol=1e-5)
    approximate = Int4Linear(head.weight)(x)
    assert (approximate - dense).abs().max() > 1e-3  # the rescoring is what makes them equal
