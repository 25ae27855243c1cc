"""OMG-LLaVA in the generic trainer: `masks` / `visual_prompts` of records reach the forward, the mask
losses train the [SEG] head, accumulation stays exact, malformed fields name FILE:LINE, and a recipe's
`model_overrides` turns off stage 1's regulariser."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from omg_batches import seg_batch
from unillava.cli import train_cmd
from unillava.config import ModelConfig, check_override_keys, load_config
from unillava.data.shapes import generate_dataset
from unillava.data.validate import validate_dataset
from unillava.errors import DataError
from unillava.modeling import LlavaModel
from unillava.omg import OMGLlavaModel
from unillava.processor import Processor
from unillava.testing import reset_accelerate_state
from unillava.training import TrainConfig, Trainer, load_train_config
from unillava.training.dataset import SupervisedDataset
from unillava.training.trainer import LOG_NAME

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omg-train-shapes") / "data"
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
        tasks=["refseg", "region_caption", "gcg"],
    )
    return out


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OMG model as stage 1 leaves it: built from the tiny stage-1 recipe, regulariser 10.0."""
    model_config = load_config(TrainConfig, TINY / "omg-stage1.yaml").model
    assert model_config is not None and model_config.vision.extra["object_regularizer"] == 10.0
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("omg-stage1") / "model"
    LlavaModel.from_config(model_config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(stage1_dir: Path) -> OMGLlavaModel:
    loaded = LlavaModel.from_pretrained(stage1_dir).eval()
    assert isinstance(loaded, OMGLlavaModel)
    return loaded


def _task(shapes: Path, task: str) -> Path:
    return shapes / "tasks" / "train" / f"{task}.jsonl"


def _records(shapes: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in _task(shapes, task).read_text().splitlines()]


def _dataset(model: OMGLlavaModel, files: list[Path], shapes: Path, **kwargs) -> SupervisedDataset:
    kwargs.setdefault("fields", model.batch_fields())
    return SupervisedDataset(
        files,
        Processor.for_model(model),
        image_root=shapes,
        max_length=kwargs.pop("max_length", 512),
        **kwargs,
    )


# -- (a) collate ------------------------------------------------------------------------------------


def test_collate_aligns_masks_and_prompts_with_their_rows(model, shapes):
    files = [_task(shapes, t) for t in ("refseg", "region_caption", "gcg")]
    data = _dataset(model, files, shapes)
    sizes = [len(_records(shapes, t)) for t in ("refseg", "region_caption", "gcg")]
    refseg, region, gcg = 0, sizes[0], sizes[0] + sizes[1]
    gcg_record = max(range(sizes[2]), key=lambda i: len(_records(shapes, "gcg")[i]["masks"]))
    batch = data.collate([data[region], data[refseg], data[gcg + gcg_record]])

    # the reference: seg_batch converts the same records one by one
    wanted = [
        _records(shapes, "region_caption")[0],
        _records(shapes, "refseg")[0],
        _records(shapes, "gcg")[gcg_record],
    ]
    reference = seg_batch(model, wanted, shapes)
    assert len(wanted[2]["masks"]) >= 2  # order matters for this row
    assert set(batch.fields) == {"seg_masks", "visual_prompts"}
    seg_masks, visual_prompts = batch.fields["seg_masks"], batch.fields["visual_prompts"]
    assert seg_masks[0] is None and visual_prompts[1] is None and visual_prompts[2] is None
    for row in (1, 2):
        assert torch.equal(seg_masks[row], reference.seg_masks[row]), row
    [region_prompt] = visual_prompts[0]
    assert torch.equal(region_prompt.region, reference.visual_prompts[0][0].region)
    assert region_prompt.anchor == reference.visual_prompts[0][0].anchor
    seg_rows = (batch.input_ids == model.seg_token_id).sum(1).tolist()
    assert seg_rows == [0, 1, len(wanted[2]["masks"])]
    inputs = batch.model_inputs()
    counts = model.loss_counts(inputs)
    assert counts["mask_bce"] == counts["mask_dice"] == 1 + len(wanted[2]["masks"])
    with torch.no_grad():
        out = model(**inputs, loss_reduction="sum")
    assert math.isfinite(float(out.mask_bce)) and math.isfinite(float(out.mask_dice))
    assert {name: part.count for name, part in out.loss_parts.items()} == counts
    moved = batch.to("cpu")
    assert moved.fields["visual_prompts"] == visual_prompts
    assert all(torch.equal(a, b) for a, b in zip(moved.fields["seg_masks"][1:], seg_masks[1:], strict=True))

    plain = _dataset(model, files, shapes, fields=None)  # LLaVA-1.5-style batches: unchanged
    batch = plain.collate([plain[region], plain[refseg]])
    assert batch.fields == {}
    assert set(batch.model_inputs()) == {"input_ids", "attention_mask", "images", "labels"}


def test_truncation_keeps_the_masks_of_the_seg_tokens_that_survive(model, shapes):
    gcg = _records(shapes, "gcg")
    index = max(range(len(gcg)), key=lambda i: len(gcg[i]["masks"]))
    full = _dataset(model, [_task(shapes, "gcg")], shapes)
    ids = full[index].encoded.input_ids
    positions = [i for i, t in enumerate(ids) if t == model.seg_token_id]
    cut = _dataset(
        model, [_task(shapes, "gcg")], shapes, max_length=positions[1]
    )  # keeps only the first [SEG]
    item = cut[index]
    assert item.encoded.input_ids.count(model.seg_token_id) == 1
    assert torch.equal(item.fields["seg_masks"], full[index].fields["seg_masks"][:1])
    assert cut.report.dropped["seg_masks"] >= len(gcg[index]["masks"]) - 1


# -- (d) malformed fields ---------------------------------------------------------------------------


def _bad_file(tmp_path: Path, shapes: Path, task: str, change) -> Path:
    good, bad = _records(shapes, task)[:2]
    change(bad)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    return path


@pytest.mark.parametrize(
    ("task", "change", "message"),
    [
        ("refseg", lambda r: r["masks"][0].update(counts="!!not-rle"), r"masks\[0\]: 'counts' is not a COCO"),
        (
            "refseg",
            lambda r: r["masks"][0].update(size=[3, 3]),
            r"masks\[0\]: 'counts' does not cover the 3x3",
        ),
        ("refseg", lambda r: r["masks"].append(r["masks"][0]), r"field 'masks': 2 mask\(s\) but 1 '\[SEG\]'"),
        (
            "refseg",
            lambda r: r["conversations"][0].update(value="<image>\nSegment [SEG]."),
            r"conversations\[0\].value: '\[SEG\]' in a turn from the user",
        ),
        (
            "region_caption",
            lambda r: r.update(visual_prompts=[]),
            r"field 'visual_prompts': 0 prompt\(s\) but 1",
        ),
        (
            "region_caption",
            lambda r: r["visual_prompts"][0].update(type="circle"),
            r"visual_prompts\[0\]: 'type' must be one of box, point, mask",
        ),
        (
            "region_caption",
            lambda r: r["visual_prompts"][0].update(image_index=1),
            r"visual_prompts\[0\]: 'image_index' must be an image of the record",
        ),
    ],
)
def test_malformed_pixel_fields_name_file_and_line(model, shapes, tmp_path, task, change, message):
    path = _bad_file(tmp_path, shapes, task, change)
    with pytest.raises(DataError, match=f"bad.jsonl:2: {message}"):
        _dataset(model, [path], shapes)
    report = validate_dataset(path, shapes, check_images=False, progress=False)
    assert [p.source for p in report.problems] == [f"{path}:2"]


def test_masks_of_another_size_than_the_image_name_file_and_line(model, shapes, tmp_path):
    small = {"size": [4, 4], "counts": [5, 6, 5]}  # a valid RLE, not the image's size

    def change(record: dict) -> None:
        record["masks"] = [small]

    data = _dataset(model, [_bad_file(tmp_path, shapes, "refseg", change)], shapes)
    data[0]
    with pytest.raises(DataError, match=r"bad.jsonl:2: masks\[0\] is 4x4 but the image is"):
        data[1]


# -- (b), (c), (e) the trainer ----------------------------------------------------------------------


def _stage2(stage1_dir: Path, shapes: Path, out: Path, train_file: Path, *extra: str) -> Trainer:
    overrides = [
        f"init_from={stage1_dir}",
        f"data.train_files=[{train_file}]",
        f"data.image_root={shapes}",
        f"output_dir={out}",
        *extra,
    ]
    return Trainer(load_train_config(TINY / "omg-stage2.yaml", overrides))


def test_stage2_recipe_trains_the_seg_head_with_mask_losses(stage1_dir, shapes, tmp_path):
    trainer = _stage2(
        stage1_dir,
        shapes,
        tmp_path,
        _task(shapes, "refseg"),
        "max_steps=2",
        "per_device_batch_size=2",
        "global_batch_size=2",
    )
    assert trainer.model.vision_tower.object_regularizer == 0.0  # the recipe's model_overrides
    before = {
        k: v.clone() for k, v in trainer.model.state_dict().items() if not k.startswith("language_model.")
    }
    result = trainer.train()
    after = trainer.model.state_dict()
    for step in (1, 2):
        metrics = result.metrics[step]
        assert math.isfinite(metrics["mask_bce"]) and math.isfinite(metrics["mask_dice"])
        assert "object_regularizer" not in metrics
    logged = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 2 and all({"mask_bce", "mask_dice"} <= set(r) for r in steps)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("vision_tower.seg_head.") for k in changed)
    assert any(k.startswith("projector.") for k in changed)
    assert not any(".perception." in k for k in changed)  # the segmenter stays frozen
    saved = json.loads((tmp_path / "model" / "unillava_config.json").read_text())
    assert saved["model"]["vision"]["extra"]["object_regularizer"] == 0.0


def test_one_batch_of_two_equals_two_accumulated_micro_batches(stage1_dir, shapes, tmp_path):
    """Text CE per token, mask losses per mask and the regulariser per image: none depends on the split
    (the regulariser is on here, `model_overrides={}`, and the rows hold 1 and several masks)."""
    gcg = _records(shapes, "gcg")
    records = [_records(shapes, "refseg")[0], max(gcg, key=lambda r: len(r["masks"]))]
    train_file = tmp_path / "two.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = {}
    for name, micro in (("one", 2), ("accum", 1)):
        out = tmp_path / name
        trainer = _stage2(
            stage1_dir,
            shapes,
            out,
            train_file,
            "max_steps=1",
            "lora.dropout=0.0",
            "model_overrides={}",
            f"per_device_batch_size={micro}",
            "global_batch_size=2",
        )
        assert trainer.grad_accum == 2 // micro
        result = trainer.train()
        step = next(json.loads(line) for line in (out / LOG_NAME).read_text().splitlines() if "loss" in line)
        runs[name] = {"loss": result.losses[1], **result.metrics[1], "grad_norm": step["grad_norm"]}
        reset_accelerate_state()
    one, accum = runs["one"], runs["accum"]
    assert set(one) == set(accum) >= {"loss", "mask_bce", "mask_dice", "object_regularizer", "grad_norm"}
    assert one["object_regularizer"] > 0  # stage 1's term is live without the override
    for key in one:
        assert accum[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_model_overrides_errors_name_the_field(stage1_dir, shapes, tmp_path, capsys):
    for recipe in (TINY / "omg-stage2.yaml", TINY.parent / "omg-llava-7b" / "stage2.yaml"):
        overrides = load_config(TrainConfig, recipe).model_overrides
        assert check_override_keys(ModelConfig, overrides, "model_overrides") == {
            "vision.extra.object_regularizer": 0.0
        }, recipe
    base = [
        f"init_from={stage1_dir}",
        f"data.train_files=[{_task(shapes, 'refseg')}]",
        f"data.image_root={shapes}",
        f"output_dir={tmp_path}",
    ]
    for override, expected in (
        (
            "model_overrides={vision.extraa.object_regularizer: 0}",
            "model_overrides: unknown key 'vision.extraa",
        ),
        (
            "model_overrides={vision.extra.object_regulariser: 0}",
            "model_overrides: vision.extra: unknown key",
        ),
        ("model_overrides={vision.image_size: big}", "model_overrides.vision.image_size"),
    ):
        assert train_cmd.main([str(TINY / "omg-stage2.yaml"), *base, override]) == 2
        assert expected in capsys.readouterr().err, override
        reset_accelerate_state()
