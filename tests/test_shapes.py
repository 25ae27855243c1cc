"""The procedural shapes benchmark: determinism, exact ground truth, and well-formed task files."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import unillava.cli as cli
from unillava.data.masks import decode_mask, encode_local_mask
from unillava.data.shapes import SceneSpec, generate_dataset, render_scene
from unillava.data.shapes.tasks import JSONL_TASKS, expression_text, resolve_expression
from unillava.errors import DataError
from unillava.prompts import GCG_PROMPT, PROMPT_LETTER, PROMPT_SHORT

SHORT_PROMPT = "\n" + PROMPT_SHORT  # on its own line after the question, as in LLaVA-1.5's data
MC_PROMPT = "\n" + PROMPT_LETTER

SMALL = {"min_size": 96, "max_size": 224, "aspect_range": (0.6, 1.8)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_dataset(out, 16, 7, n_val=3, n_test=2, difficulty="hard", workers=2, **SMALL)
    return out


@pytest.fixture(scope="module")
def scenes(dataset: Path) -> dict[str, dict[int, dict]]:
    return {
        split: {s["image_id"]: s for s in _jsonl(dataset / "scenes" / f"{split}.jsonl")}
        for split in ("train", "val", "test")
    }


def _records(dataset: Path, task: str) -> list[tuple[str, dict]]:
    out = []
    for split in ("train", "val", "test"):
        out += [(split, r) for r in _jsonl(dataset / "tasks" / split / f"{task}.jsonl")]
    return out


def _scene_of(scenes: dict, split: str, record: dict) -> dict:
    index = int(re.fullmatch(rf"{split}_(\d+)_.+", record["id"]).group(1))
    scene = scenes[split][index]
    assert scene["file_name"] == record["image"]
    return scene


def test_same_seed_is_byte_identical_across_worker_counts(tmp_path: Path) -> None:
    kwargs = {"n_val": 1, "n_test": 1, **SMALL}
    generate_dataset(tmp_path / "a", 5, 11, workers=1, **kwargs)
    generate_dataset(tmp_path / "b", 5, 11, workers=2, **kwargs)
    generate_dataset(tmp_path / "c", 5, 12, workers=2, **kwargs)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    assert a["scenes/train.jsonl"] != c["scenes/train.jsonl"]
    assert a["images/train/train_000001.png"] != c["images/train/train_000001.png"]


def test_splits_do_not_share_scenes(scenes: dict) -> None:
    signatures = Counter(
        json.dumps([s["width"], s["height"], s["objects"][0]["segmentation"]])
        for split in scenes.values()
        for s in split.values()
    )
    assert max(signatures.values()) == 1


def test_render_scene_is_deterministic_and_respects_size_limits() -> None:
    spec = SceneSpec(min_size=100, max_size=300, aspect_range=(0.5, 2.0), difficulty="medium")
    img1, scene1 = render_scene([1, 2], spec)
    img2, scene2 = render_scene([1, 2], spec)
    assert scene1 == scene2 and img1.tobytes() == img2.tobytes()
    for seed in range(8):
        img, scene = render_scene([seed, 0], spec)
        w, h = img.size
        assert (w, h) == (scene["width"], scene["height"])
        assert 100 <= w <= 300 and 100 <= h <= 300 and 0.5 - 0.01 <= w / h <= 2.0 + 0.01
        assert 1 <= len(scene["objects"]) <= 10


def test_local_rle_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        height, width = (int(v) for v in rng.integers(5, 40, 2))
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        local = rng.random((h, w)) < 0.5
        full = np.zeros((height, width), dtype=np.uint8, order="F")
        full[y0 : y0 + h, x0 : x0 + w] = local
        ref = mask_utils.encode(full)
        ours = encode_local_mask(local, x0, y0, height, width)
        assert ours["counts"] == ref["counts"].decode() and ours["size"] == [height, width]
        assert (decode_mask(ours) == full.astype(bool)).all()


def test_layout_and_manifest_counts(dataset: Path, scenes: dict) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["arguments"]["seed"] == 7 and "workers" not in manifest["arguments"]
    for split, info in manifest["splits"].items():
        assert info["scenes"] == len(scenes[split]) == len(list((dataset / "images" / split).glob("*.png")))
        for index, scene in scenes[split].items():
            assert scene["file_name"] == f"images/{split}/{split}_{index:06d}.png"
            with Image.open(dataset / scene["file_name"]) as im:
                assert im.size == (scene["width"], scene["height"]) and im.mode == "RGB"
        for task in JSONL_TASKS:
            assert info["tasks"][task] == len(_jsonl(dataset / "tasks" / split / f"{task}.jsonl")), (
                split,
                task,
            )
        coco = json.loads((dataset / "annotations" / f"instances_{split}.json").read_text())
        assert info["tasks"]["instances"] == len(coco["annotations"]) == info["objects"]
        assert len(coco["images"]) == info["scenes"]
        assert {c["name"] for c in coco["categories"]} == set(manifest["shapes"])
    assert manifest["splits"]["train"]["tasks"]["fine_text"] > 0


def test_masks_bboxes_and_areas_are_consistent(dataset: Path, scenes: dict) -> None:
    for split, by_id in scenes.items():
        coco = json.loads((dataset / "annotations" / f"instances_{split}.json").read_text())
        anns = Counter(a["image_id"] for a in coco["annotations"])
        for image_id, scene in by_id.items():
            assert anns[image_id] == len(scene["objects"])
            union = np.zeros((scene["height"], scene["width"]), dtype=np.int32)
            for obj in scene["objects"]:
                m = decode_mask(obj["segmentation"])
                assert m.shape == (scene["height"], scene["width"])
                assert m.any() and obj["area"] == int(m.sum())
                ys, xs = np.nonzero(m)
                assert obj["bbox"] == [
                    int(xs.min()),
                    int(ys.min()),
                    int(xs.max() - xs.min() + 1),
                    int(ys.max() - ys.min() + 1),
                ]
                cx, cy = obj["center"]
                assert m[cy, cx], "center must be a visible pixel of the object"
                assert obj["area"] <= obj["full_area"]
                union += m
            assert union.max() <= 1, "visible masks of one scene must not overlap"
    for a in coco["annotations"]:
        assert a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str)


def test_occlusion_happens_in_hard_scenes(scenes: dict) -> None:
    objects = [o for split in scenes.values() for s in split.values() for o in s["objects"]]
    assert any(o["area"] < o["full_area"] for o in objects)


def test_every_record_is_a_valid_conversation(dataset: Path) -> None:
    ids = set()
    for task in JSONL_TASKS:
        for _split, r in _records(dataset, task):
            assert r["task"] == task and r["id"] not in ids
            ids.add(r["id"])
            assert (dataset / r["image"]).is_file()
            conv = r["conversations"]
            assert len(conv) >= 2 and len(conv) % 2 == 0
            for i, turn in enumerate(conv):
                assert turn["from"] == ("human" if i % 2 == 0 else "gpt")
                assert turn["value"].strip()
            assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
            assert all("<image>" not in t["value"] for t in conv[1:])


def test_answer_formats(dataset: Path) -> None:
    for _split, r in _records(dataset, "vqa"):
        human, gpt = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if r["style"] == "short":
            assert human.endswith(SHORT_PROMPT) and gpt == r["answers"][0]
        else:
            assert SHORT_PROMPT not in human and gpt.endswith(".") and gpt != r["answers"][0]
        if r["qtype"] == "count":
            assert r["answers"][0].isdigit()
    for _split, r in _records(dataset, "mc"):
        human = r["conversations"][0]["value"]
        assert human.endswith(MC_PROMPT) and len(r["options"]) == 4 == len(set(r["options"]))
        for letter, option in zip("ABCD", r["options"], strict=True):
            assert f"\n{letter}. {option}\n" in human
        assert r["conversations"][1]["value"] == r["answer"] in "ABCD"
    for task in ("fine_text", "fine_count"):
        for _split, r in _records(dataset, task):
            assert r["conversations"][1]["value"] == r["answers"][0]


def test_referring_expressions_resolve_to_exactly_their_object(dataset: Path, scenes: dict) -> None:
    records = _records(dataset, "refseg")
    assert records
    kinds = Counter()
    for split, r in records:
        scene = _scene_of(scenes, split, r)
        kinds[r["spec"]["type"]] += 1
        assert expression_text(r["spec"]) == r["expression"]
        assert resolve_expression(scene, r["spec"]) == r["object_ids"]
        assert len(r["object_ids"]) == 1 == len(r["masks"])
        obj = scene["objects"][r["object_ids"][0]]
        assert r["masks"][0] == obj["segmentation"]
        assert (decode_mask(r["masks"][0]) == decode_mask(obj["segmentation"])).all()
        assert r["conversations"][0]["value"] == f"<image>\nPlease segment {r['expression']} in this image."
        assert r["conversations"][1]["value"] == f"<p> {r['expression']} </p> [SEG]."
    assert kinds["attr"] > 0
    for split, r in _records(dataset, "reasonseg"):
        scene = _scene_of(scenes, split, r)
        assert resolve_expression(scene, r["spec"]) == r["object_ids"]
        assert resolve_expression(scene, r["target_spec"]) == r["object_ids"]
        assert expression_text(r["target_spec"]) == r["description"]
        assert r["conversations"][1]["value"] == f"<p> {r['description']} </p> [SEG]."
        assert r["masks"] == [scene["objects"][r["object_ids"][0]]["segmentation"]]


def test_resolver_on_a_hand_made_scene() -> None:
    def obj(i: int, shape: str, color: str, x: int, text: str | None = None) -> dict:
        return {"id": i, "shape": shape, "color": color, "size": "small", "text": text, "center": [x, 50],
                "bbox": [x - 5, 45, 10, 10], "full_area": 80 + i}  # fmt: skip

    scene = {"width": 400, "height": 100, "objects": [
        obj(0, "circle", "red", 50, "B"), obj(1, "circle", "blue", 150, "A"),
        obj(2, "star", "blue", 250), obj(3, "circle", "red", 350),
    ]}  # fmt: skip
    assert resolve_expression(scene, {"type": "attr", "attrs": {"color": "red", "shape": "circle"}}) == [0, 3]
    assert resolve_expression(scene, {"type": "attr", "attrs": {"color": "blue", "shape": "circle"}}) == [1]
    rel = {
        "type": "relation",
        "target": {"shape": "circle"},
        "relation": "right_of",
        "anchor": {"shape": "star"},
    }
    assert resolve_expression(scene, rel) == [3]
    assert expression_text(rel) == "the circle right of the star"
    ordinal = {"type": "ordinal", "target": {"shape": "circle"}, "order": "left", "index": 2}
    assert resolve_expression(scene, ordinal) == [1]
    assert expression_text(ordinal) == "the second circle from the left"
    assert resolve_expression(scene, {"type": "reason", "query": "first_letter"}) == [1]
    assert resolve_expression(scene, {"type": "reason", "query": "most_corners"}) == [2]
    assert resolve_expression(scene, {"type": "reason", "query": "leftmost"}) == [0]


def test_seg_tokens_match_masks(dataset: Path) -> None:
    for task in ("gcg", "refseg", "reasonseg"):
        for _split, r in _records(dataset, task):
            gpt = r["conversations"][1]["value"]
            assert gpt.count("[SEG]") == len(r["masks"]) == len(r["object_ids"])
            assert gpt.count("<p>") == gpt.count("</p>") == len(r["masks"])
    for _split, r in _records(dataset, "gcg"):
        gpt = r["conversations"][1]["value"]
        assert r["conversations"][0]["value"] == "<image>\n" + GCG_PROMPT
        assert re.findall(r"<p> (.*?) </p> \[SEG\]", gpt) == r["phrases"]
        assert re.sub(r"<p> (.*?) </p> \[SEG\]", r"\1", gpt) == r["answers"][0]


def test_region_markers_match_visual_prompts(dataset: Path, scenes: dict) -> None:
    for task in ("region_caption", "region_vqa"):
        records = _records(dataset, task)
        assert records
        for split, r in records:
            human = r["conversations"][0]["value"]
            markers = re.findall(r"<region>|<mark>", human)
            assert len(markers) == len(r["visual_prompts"]) >= 1
            scene = _scene_of(scenes, split, r)
            for marker, vp, oid in zip(markers, r["visual_prompts"], r["object_ids"], strict=True):
                assert (marker == "<mark>") == (vp["type"] == "point")
                obj = scene["objects"][oid]
                if vp["type"] == "box":
                    x, y, w, h = obj["bbox"]
                    assert vp["box"] == [x, y, x + w, y + h]
                elif vp["type"] == "point":
                    assert decode_mask(obj["segmentation"])[vp["point"][1], vp["point"][0]]
                else:
                    assert vp["mask"] == obj["segmentation"]
            if task == "region_caption":
                assert r["conversations"][1]["value"] == r["answers"][0]
                assert r["attributes"]["shape"] in r["answers"][0]


def test_pope_is_balanced(dataset: Path, scenes: dict) -> None:
    tally = Counter()
    for split, r in _records(dataset, "pope"):
        assert r["conversations"][1]["value"] == r["answer"]
        tally[(split, r["category"], r["answer"])] += 1
        scene = _scene_of(scenes, split, r)
        color, shape = re.fullmatch(
            r"<image>\nIs there an? (\w+) (\w+) in the image\?\n.*", r["conversations"][0]["value"], re.S
        ).groups()
        present = any(o["color"] == color and o["shape"] == shape for o in scene["objects"])
        assert present == (r["answer"] == "yes")
    assert tally
    for (split, category, _answer), _count in tally.items():
        assert tally[(split, category, "yes")] == tally[(split, category, "no")]
    assert {c for _s, c, _a in tally} == {"random", "popular", "adversarial"}


@pytest.fixture()
def data_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only this module's command, so these tests do not depend on other commands importing."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", [cli.data_cmd])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-size", "512", "--max-size", "256"], "min-size"),
        (["--aspect-range", "wide"], "aspect-range"),
        (["--aspect-range", "2,1"], "aspect range"),
        (["--min-size", "512", "--max-size", "512", "--aspect-range", "1.5,2"], "no aspect ratio"),
        (["--difficulty", "extreme"], "difficulty"),
        (["--tasks", "vqa,nonsense"], "nonsense"),
        (["--n-val", "-1"], "n-val"),
        (["--workers", "0"], "workers"),
        (["--fine-every", "-1"], "fine-every"),
        (["--max-texts", "-2"], "max-texts"),
    ],
)
def test_cli_rejects_bad_flags(
    data_cli: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    rc = cli.main(["data", "shapes", "--out", str(tmp_path / "ds"), "--n", "2", "--quiet", *flags])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_generates_and_refuses_to_clobber(
    data_cli: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["data", "shapes", "--out", str(tmp_path), "--n", "2", "--seed", "3", "--quiet", "--min-size", "64",
            "--max-size", "128", "--workers", "1", "--tasks", "caption,refseg"]  # fmt: skip
    assert cli.main(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"]["val"]["scenes"] == 1 and set(manifest["splits"]["train"]["tasks"]) == {
        "caption",
        "refseg",
    }
    assert not (tmp_path / "tasks" / "train" / "vqa.jsonl").exists()
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 0


def test_single_text_fine_scenes(data_cli: None, tmp_path: Path) -> None:
    """--fine-every 1 --max-texts 1: every scene is fine and carries exactly one (tiny) character, so
    fine_text asks about the only text in the image."""
    args = ["data", "shapes", "--out", str(tmp_path), "--n", "12", "--n-val", "1", "--n-test", "1", "--quiet",
            "--min-size", "384", "--max-size", "384", "--workers", "1", "--tasks", "fine_text",
            "--fine-every", "1", "--max-texts", "1"]  # fmt: skip
    assert cli.main(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["arguments"]["fine_every"] == 1 and manifest["arguments"]["max_texts"] == 1
    scenes = [json.loads(line) for line in (tmp_path / "scenes" / "train.jsonl").open()]
    assert all(scene["profile"] == "fine" for scene in scenes)
    assert all(sum(o["text"] is not None for o in scene["objects"]) <= 1 for scene in scenes)
    records = _jsonl(tmp_path / "tasks" / "train" / "fine_text.jsonl")
    assert len(records) >= 10  # nearly every scene has its one character
    for record in records:
        scene = scenes[int(record["id"].split("_")[1]) - 1]
        assert [o["text"] for o in scene["objects"] if o["text"]] == [record["conversations"][1]["value"]]


def test_fine_every_picks_the_fine_scenes(scenes: dict) -> None:
    from unillava.data.shapes import is_fine_scene

    assert [i for i in range(1, 13) if is_fine_scene(i)] == [2, 7, 12]
    assert all(is_fine_scene(i, 1) for i in range(1, 5)) and not any(is_fine_scene(i, 0) for i in range(1, 5))
    for split in scenes:
        for index, scene in scenes[split].items():
            assert (scene["profile"] == "fine") == is_fine_scene(index)


def test_api_validation_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="seed"):
        generate_dataset(tmp_path, 2, -1)
    with pytest.raises(DataError, match="--n"):
        generate_dataset(tmp_path, 0, 1)


def test_instances_file_loads_in_pycocotools_and_scores_perfectly(dataset: Path) -> None:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path = dataset / "annotations" / "instances_train.json"
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in json.loads(path.read_text())["annotations"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
