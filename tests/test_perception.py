"""The perception model (stage 0): Hungarian matching, cached memory + extra queries, training, mask AP."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from unillava.omg.perception import (
    PadGeometry,
    PerceptionModel,
    evaluate_segmenter,
    load_instances,
    tiny_perception_config,
    train_segmenter,
)
from unillava.omg.perception.matching import linear_sum_assignment

IMAGE_SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from unillava.data.shapes import generate_dataset

    out = tmp_path_factory.mktemp("shapes") / "data"
    generate_dataset(
        out,
        4,
        3,
        n_val=1,
        n_test=2,
        min_size=96,
        max_size=128,
        difficulty="easy",
        workers=1,
        tasks=["refseg"],
    )
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PerceptionModel(tiny_perception_config()).eval()


@pytest.mark.parametrize("shape", [(3, 3), (3, 5), (5, 3), (1, 4), (0, 2)])
def test_assignment_is_optimal(shape):
    rng = np.random.default_rng(sum(shape))
    cost = rng.normal(size=shape)
    rows, cols = linear_sum_assignment(cost)
    assert len(rows) == min(shape) and list(rows) == sorted(rows)
    assert len(set(cols.tolist())) == len(cols)
    n, m = shape
    if n and m:
        best = min(
            sum(cost[i, j] for i, j in zip(r, c, strict=True))
            for r in itertools.permutations(range(n), min(n, m))
            for c in itertools.permutations(range(m), min(n, m))
            if list(r) == sorted(r)
        )
        assert cost[rows, cols].sum() == pytest.approx(best)


def test_save_load_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path / "seg")
    config = json.loads((tmp_path / "seg" / "perception_config.json").read_text())
    assert config["backbone_config"]["model_type"] == "convnext"
    loaded = PerceptionModel.from_pretrained(tmp_path / "seg").eval()
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.allclose(model(x).mask_logits[-1], loaded(x).mask_logits[-1], atol=1e-5)


def test_cached_memory_decodes_extra_queries_independently(model):
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        out = model(x)
        assert len(out.mask_logits) == model.config.decoder_layers
        # The learned queries decoded again over the cached memory give the same masks.
        again = model(x, memory=out.memory)
        assert torch.allclose(out.mask_logits[-1], again.mask_logits[-1], atol=1e-5)
        queries = torch.randn(3, model.hidden_dim * 2)
        content, position = queries.split(model.hidden_dim, dim=-1)
        three = model.decode(out.memory.select(1, repeat=3), content[:, None], position[:, None])
        one = model.decode(out.memory.select(1, repeat=1), content[1:2, None], position[1:2, None])
    assert three.mask_logits[-1].shape == (3, 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    assert torch.allclose(three.mask_logits[-1][1], one.mask_logits[-1][0], atol=1e-5)


def test_region_restricts_cross_attention(model):
    logits = torch.zeros(1, 2, 16, 16)  # sigmoid 0.5: the mask alone blocks nothing
    region = torch.zeros(1, 2, 64, 64, dtype=torch.bool)
    region[0, 0, 0:16, 0:16] = True  # a box in the top-left quarter
    blocked = model._attention_mask(logits, (4, 4), region, "prefer_region")
    heads = model.config.num_attention_heads
    assert blocked.shape == (heads, 2, 16)
    allowed = ~blocked[0, 0].view(4, 4)
    assert allowed[:1, :1].all() and allowed.sum() == 1
    assert not blocked[0, 1].any()  # an empty region falls back to everything, never to nothing


def _cells(rows: slice, cols: slice) -> torch.Tensor:
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[rows, cols] = True
    return grid


@pytest.mark.parametrize(
    "rule,allowed_apart,allowed_overlapping",
    [  # the query's own mask covers the right half; the region is the top-left quarter or the top half
        ("prefer_region", _cells(slice(0, 2), slice(0, 2)), _cells(slice(0, 2), slice(2, 4))),
        ("within_region", _cells(slice(0, 4), slice(0, 4)), _cells(slice(0, 2), slice(2, 4))),
        ("region_only", _cells(slice(0, 2), slice(0, 2)), _cells(slice(0, 2), slice(0, 4))),
        ("unrestricted", _cells(slice(0, 4), slice(2, 4)), _cells(slice(0, 4), slice(2, 4))),
    ],
)
def test_region_rules(model, rule, allowed_apart, allowed_overlapping):
    """How a visual-prompt query's region and its own predicted mask combine (OMG-Seg's rules per prompt
    kind, and unillava's default), including the fall-backs when nothing would be left."""
    logits = torch.full((1, 2, 16, 16), -5.0)
    logits[..., 8:] = 5.0
    region = torch.zeros(1, 2, 64, 64, dtype=torch.bool)
    region[0, 0, 0:32, 0:32] = True
    region[0, 1, 0:32, :] = True
    blocked = model._attention_mask(logits, (4, 4), region, rule)
    assert torch.equal(~blocked[0, 0].view(4, 4), allowed_apart)
    assert torch.equal(~blocked[0, 1].view(4, 4), allowed_overlapping)


def test_geometry_roundtrip():
    geometry = PadGeometry(width=40, height=20, size=80)
    mask = np.zeros((20, 40), dtype=bool)
    mask[5:15, 10:30] = True
    square = geometry.mask_to_input(mask)
    assert square.shape == (80, 80)
    logits = (square * 20 - 10)[None]
    back = geometry.logits_to_image(logits)[0] > 0
    assert back.shape == (20, 40)
    assert (back.numpy() == mask).mean() > 0.97


def test_stage0_training_lowers_the_loss_and_evaluates_ap(shapes_root):
    _, categories = load_instances(shapes_root, "train")
    torch.manual_seed(0)
    model = PerceptionModel(tiny_perception_config(num_labels=len(categories)))
    losses = train_segmenter(model, shapes_root, steps=16, image_size=IMAGE_SIZE, batch_size=2, lr=1e-3)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    metrics = evaluate_segmenter(model, shapes_root, image_size=IMAGE_SIZE, split="test")
    assert set(metrics) == {"AP", "AP50", "AP75", "best_query_iou"}
    assert all(-1.0 <= v <= 1.0 for v in metrics.values())


def test_train_and_eval_segmenter_cli(shapes_root, tmp_path, capsys):
    from unillava.cli import main

    out = tmp_path / "seg"
    code = main(
        [
            "train-segmenter",
            "--data",
            str(shapes_root),
            "--out",
            str(out),
            "--steps",
            "2",
            "--image-size",
            str(IMAGE_SIZE),
            "--log-every",
            "1",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["step"] for line in lines[:2]] == [1, 2]
    assert PerceptionModel.from_pretrained(out).config.num_labels == len(
        load_instances(shapes_root, "train")[1]
    )
    assert (
        main(
            [
                "eval-segmenter",
                "--model",
                str(out),
                "--data",
                str(shapes_root),
                "--image-size",
                str(IMAGE_SIZE),
            ]
        )
        == 0
    )
    assert set(json.loads(capsys.readouterr().out)) == {"AP", "AP50", "AP75", "best_query_iou"}


def test_best_query_iou_is_one_for_a_segmenter_that_outputs_the_truth(shapes_root):
    """`best_query_iou` scores masks alone: queries holding the exact instance masks reach ~1 whatever
    their classes, while a segmenter with only empty masks gets 0."""
    from types import SimpleNamespace

    from unillava.data.masks import decode_mask
    from unillava.omg.perception.geometry import PadGeometry

    samples, _ = load_instances(shapes_root, "test")

    class Oracle(torch.nn.Module):
        def __init__(self, empty: bool):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.todo, self.empty = iter(samples), empty

        def forward(self, pixels):
            sample = next(self.todo)
            geometry = PadGeometry(sample.width, sample.height, IMAGE_SIZE)
            truths = [geometry.mask_to_input(decode_mask(a["segmentation"])) for a in sample.annotations]
            logits = torch.stack(truths + [torch.zeros(IMAGE_SIZE, IMAGE_SIZE)]) * 40 - 20
            if self.empty:
                logits = torch.full_like(logits, -20.0)
            return SimpleNamespace(mask_logits=[logits[None]], class_logits=[torch.zeros(1, len(logits), 3)])

    assert evaluate_segmenter(Oracle(False), shapes_root, image_size=IMAGE_SIZE)["best_query_iou"] > 0.9
    assert evaluate_segmenter(Oracle(True), shapes_root, image_size=IMAGE_SIZE)["best_query_iou"] == 0.0
