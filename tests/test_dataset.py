"""SupervisedDataset (encoding, truncation policy, collate) and the modality/length grouped sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from unillava.config import ModelConfig, from_dict, load_yaml
from unillava.conversation import IGNORE_INDEX, Encoded
from unillava.errors import DataError
from unillava.modeling import LlavaModel
from unillava.processor import Processor
from unillava.training.dataset import (
    ModalityLengthGroupedSampler,
    Status,
    SupervisedDataset,
    TrainItem,
    supervised_tokens,
    truncate,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage1.yaml"
IMG = 99


@pytest.fixture(scope="module")
def processor() -> Processor:
    torch.manual_seed(0)
    model = LlavaModel.from_config(from_dict(ModelConfig, load_yaml(TINY)["model"]))
    return Processor.for_model(model)


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (40, 32), (255, 0, 0)).save(root / "red.png")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(root / "blue.png")
    return root


# -- truncate -----------------------------------------------------------------------------------------


def _enc(ids: list[int], labels: list[int]) -> Encoded:
    return Encoded(ids, labels, ids.count(IMG) and 1)


def test_truncate_keeps_short_and_cuts_long_on_the_right() -> None:
    enc = _enc([1, IMG, IMG, 5, 6, 7], [-100, -100, -100, -100, 6, 7])
    assert truncate(enc, 6, IMG) == (enc, Status.KEPT)
    kept, status = truncate(enc, 5, IMG)
    assert status is Status.TRUNCATED
    assert kept.input_ids == [1, IMG, IMG, 5, 6] and kept.labels == [-100, -100, -100, -100, 6]


def test_truncate_never_cuts_an_image_and_needs_a_supervised_token() -> None:
    enc = _enc([1, 2, IMG, IMG, 5, 6], [-100, -100, -100, -100, -100, 6])
    assert truncate(enc, 3, IMG)[1] is Status.IMAGE_CUT  # inside the image run
    assert truncate(enc, 2, IMG)[1] is Status.IMAGE_CUT  # image entirely beyond the cut
    assert truncate(enc, 5, IMG)[1] is Status.NO_SUPERVISION
    # the label at position 0 is never predicted, so it does not count
    assert truncate(_enc([1, 2], [1, -100]), 8, IMG)[1] is Status.NO_SUPERVISION


# -- dataset -----------------------------------------------------------------------------------------


def test_dataset_policy_counts_and_items(tmp_path: Path, images: Path, processor: Processor) -> None:
    words = " ".join(["word"] * 120)
    data = _write(
        tmp_path / "train.jsonl",
        [
            {"id": "ok", "image": "red.png", "conversations": _turns("<image>\nWhat color?", "Red.")},
            {"id": "long-answer", "image": "blue.png", "conversations": _turns("<image>\nDescribe.", words)},
            {"id": "long-question", "conversations": _turns(words, "Yes.")},
            {"id": "late-image", "image": "red.png", "conversations": _turns(words + " <image>", "Red.")},
            {"id": "text", "conversations": _turns("Hi?", "Hello.")},
        ],
    )
    ds = SupervisedDataset([data], processor, image_root=images, max_length=80)
    report = ds.report.as_dict()
    assert (report["total"], report["kept"], report["truncated"]) == (5, 3, 1)
    assert report["skipped_no_supervision"] == 1 and report["skipped_image_cut"] == 1
    assert report["examples"]["skipped_no_supervision"] == [f"{data}:3"]
    assert report["examples"]["skipped_image_cut"] == [f"{data}:4"]
    assert report["examples"]["truncated"] == [f"{data}:2"]
    assert len(ds) == 3 and ds.has_images == [True, True, False]
    assert ds.lengths[1] == 80 and max(ds.lengths) <= 80

    item = ds[1]
    assert isinstance(item, TrainItem) and item.source == f"{data}:2"
    assert len(item.encoded.input_ids) == 80 and [tuple(p.shape) for p in item.pixel_values] == [(3, 32, 32)]
    assert item.encoded.input_ids.count(processor.image_token_id) == 16

    batch = ds.collate([ds[i] for i in range(3)])
    assert batch.input_ids.shape == (3, 80) and len(batch.images) == 2
    assert batch.attention_mask[2].tolist()[-1] == 0  # right padding
    assert batch.attention_mask[2, 0] == 1
    assert supervised_tokens(batch.labels) > 0


def test_response_format_is_applied(tmp_path: Path, processor: Processor) -> None:
    data = _write(tmp_path / "t.jsonl", [{"conversations": _turns("Capital of France?", "Paris")}])
    plain = SupervisedDataset([data], processor, max_length=128)
    short = SupervisedDataset([data], processor, max_length=128, response_format="short")
    text = processor.tokenizer.decode(short[0].encoded.input_ids)
    assert "single word or phrase" in text
    assert short.lengths[0] > plain.lengths[0]


def test_all_samples_skipped_is_an_error_naming_file_and_line(tmp_path: Path, processor: Processor) -> None:
    words = " ".join(["word"] * 100)
    data = _write(tmp_path / "bad.jsonl", [{"conversations": _turns(words, "ok")} for _ in range(3)])
    with pytest.raises(DataError, match=rf"{data}: all 3 samples were skipped.*{data}:1"):
        SupervisedDataset([data], processor, max_length=40)


def test_plan_cache_is_reused_and_keyed(
    tmp_path: Path, images: Path, processor: Processor, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [{"image": "red.png", "conversations": _turns("<image>\nColor?", "Red.")}]
    records.append({"conversations": _turns(" ".join(["word"] * 100), "ok")})
    data = _write(tmp_path / "c.jsonl", records)
    first = SupervisedDataset(
        [data], processor, image_root=images, max_length=60, cache_dir=tmp_path / "cache"
    )
    assert first.cache_file is not None and first.cache_file.is_file()

    def no_scan(self: SupervisedDataset, progress: bool) -> None:
        raise AssertionError("the cached plan should have been used")

    monkeypatch.setattr(SupervisedDataset, "_scan", no_scan)
    again = SupervisedDataset(
        [data], processor, image_root=images, max_length=60, cache_dir=tmp_path / "cache"
    )
    assert again.lengths == first.lengths and again.report == first.report and len(again) == 1
    with pytest.raises(AssertionError, match="cached plan"):
        SupervisedDataset([data], processor, image_root=images, max_length=61, cache_dir=tmp_path / "cache")


def test_collate_refuses_a_batch_without_supervised_tokens(processor: Processor) -> None:
    ds = SupervisedDataset.__new__(SupervisedDataset)
    ds.processor = processor
    items = [TrainItem(Encoded([1, 2, 3], [-100, -100, -100], 0), [], "x.jsonl:7")]
    with pytest.raises(DataError, match="x.jsonl:7"):
        ds.collate(items)


def test_batches_of_a_whole_epoch_are_supervised(tmp_path: Path, images: Path, processor: Processor) -> None:
    records = [
        {"image": "red.png", "conversations": _turns("<image>\nColor?", "Red " * (i + 1))} for i in range(5)
    ]
    records += [{"conversations": _turns("Q" * (i + 1), "A.")} for i in range(4)]
    ds = SupervisedDataset(
        [_write(tmp_path / "m.jsonl", records)], processor, image_root=images, max_length=128
    )
    sampler = ModalityLengthGroupedSampler(
        ds.lengths, ds.has_images, micro_batch_size=2, grad_accum=2, seed=3
    )
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)
    batches = list(loader)
    assert len(batches) == sampler.steps_per_epoch * 2
    for batch in batches:
        assert (batch.labels[:, 1:] != IGNORE_INDEX).any(dim=1).all()


# -- sampler -----------------------------------------------------------------------------------------


def _sampler(rank: int = 0, world: int = 1, **kw) -> ModalityLengthGroupedSampler:
    lengths = [(i * 37) % 101 + 1 for i in range(23)]
    has_images = [i % 3 != 0 for i in range(23)]
    args = {"micro_batch_size": 2, "num_processes": world, "process_index": rank, "grad_accum": 2, "seed": 7}
    return ModalityLengthGroupedSampler(lengths, has_images, **(args | kw))


def test_sampler_is_deterministic_and_covers_every_sample() -> None:
    a, b = _sampler(), _sampler()
    assert a.global_batches(0) == b.global_batches(0)
    assert a.global_batches(0) != a.global_batches(1)
    assert _sampler(seed=8).global_batches(0) != a.global_batches(0)
    batches = a.global_batches(0)
    assert all(len(batch) == 4 for batch in batches) and len(batches) == a.steps_per_epoch == 6
    assert set(i for batch in batches for i in batch) == set(range(23))


def test_sampler_groups_by_modality_and_length() -> None:
    s = _sampler()
    batches = s.global_batches(0)
    pure = [batch for batch in batches if len({s.has_images[i] for i in batch}) == 1]
    assert len(pure) >= len(batches) - 2  # only the leftover batches at the end may mix
    for batch in batches:
        lengths = [s.lengths[i] for i in batch]
        assert lengths == sorted(lengths, reverse=True)


def test_sampler_shards_are_disjoint_and_make_the_global_batch() -> None:
    ranks = [_sampler(rank=r, world=2, grad_accum=1) for r in range(2)]
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0])
    for step, batch in enumerate(ranks[0].global_batches(0)):
        shards = [per_rank[r][step] for r in range(2)]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == sorted(batch)
    single = _sampler(micro_batch_size=4, grad_accum=1)
    assert single.global_batches(0) == ranks[0].global_batches(0)


def test_sampler_resumes_from_a_sample_position() -> None:
    s = _sampler()
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_sample=3 * s.global_batch_size)
    assert list(s) == full[3 * 2 :] and len(s) == len(full) - 6
    with pytest.raises(ValueError, match="multiple of the global batch"):
        s.set_epoch(2, start_sample=3)
