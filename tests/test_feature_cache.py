"""The frozen tower's feature cache: same numbers as no cache, one tower pass per image, never a stale entry."""

from __future__ import annotations

import pytest
import torch

from unillava.modeling import LlavaModel
from unillava.testing import tiny_model_config
from unillava.vision.feature_cache import FeatureCache, clear_feature_caches


@pytest.fixture
def model() -> LlavaModel:
    clear_feature_caches()
    torch.manual_seed(0)
    model = LlavaModel.from_config(tiny_model_config()).eval()
    model.vision_tower.requires_grad_(False)
    yield model
    clear_feature_caches()


def _count_tower_calls(model: LlavaModel) -> list[int]:
    calls = [0]

    def hook(module, args, output):
        calls[0] += len(args[0])

    model.vision_tower.register_forward_hook(hook)
    return calls


def test_cached_features_equal_uncached_and_skip_repeated_images(model: LlavaModel) -> None:
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = model.encode_images(images)
        calls = _count_tower_calls(model)
        model.cache_tower_features()
        first = model.encode_images(images)
        again = model.encode_images([images[2], images[0], torch.randn(3, 32, 32)])
    assert calls[0] == 3 + 1  # the second batch computed only its new image
    for got, want in zip(first, reference, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(again[0], reference[2]) and torch.equal(again[1], reference[0])
    assert model.feature_cache.stats()["hits"] == 2


def test_a_changed_tower_or_pixel_is_a_new_entry(model: LlavaModel) -> None:
    model.cache_tower_features()
    cache = model.feature_cache
    assert FeatureCache.for_tower(model.vision_tower) is cache  # shared by a rebuilt model of the same tower
    with torch.no_grad():
        model.vision_tower.parameters().__next__().add_(0.5)
    assert FeatureCache.for_tower(model.vision_tower) is not cache
    image = torch.zeros(3, 32, 32)
    nudged = image.clone()
    nudged[0, 0, 0] = 1e-3
    with torch.no_grad():
        cache(model.vision_tower, [image, nudged])
    assert cache.stats()["images"] == 2


def test_refused_while_the_tower_trains(model: LlavaModel) -> None:
    model.vision_tower.requires_grad_(True)
    with pytest.raises(ValueError, match="vision tower trains"):
        model.cache_tower_features()


def test_stops_storing_past_its_budget_but_still_answers(model: LlavaModel) -> None:
    cache = FeatureCache("test", max_bytes=1)
    with torch.no_grad():
        features = cache(model.vision_tower, torch.randn(2, 3, 32, 32))
    assert len(features) == 2 and cache.stats()["images"] == 0


def test_features_cached_under_autocast_are_not_served_without_it(model: LlavaModel) -> None:
    images = torch.randn(2, 3, 32, 32)
    model.cache_tower_features()
    with torch.no_grad():
        reference = model.vision_tower(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.feature_cache(model.vision_tower, images)
        served = model.feature_cache(model.vision_tower, images)
    assert model.feature_cache.stats()["images"] == 4
    for got, want in zip(served, reference, strict=True):
        assert torch.equal(got, want)
