"""`validate-data` / `validate_dataset`: every bad line and bad image reported with FILE:LINE in one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import unillava.cli as cli
from unillava.data.validate import Problem, validate_dataset


@pytest.fixture(autouse=True)
def _only_this_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the parser from this command alone, so a sibling command's import cannot break these tests."""
    assert cli.validate_cmd in cli.COMMAND_MODULES
    monkeypatch.setattr(cli, "COMMAND_MODULES", [cli.validate_cmd])


def _turns(question: str = "<image>\nWhat is it?", answer: str = "A cat.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(root / "good.jpg")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(root / "alpha.png")
    Image.new("RGB", (400, 300), (1, 2, 3)).save(root / "big.png")
    full = (root / "good.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(full[: len(full) // 2])
    (root / "fake.png").write_text("<html>not found</html>")
    (root / "empty.jpg").write_bytes(b"")
    return root


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_every_problem_reported_with_line_numbers(tmp_path: Path, images: Path, capsys) -> None:
    data = _write(
        tmp_path / "train.jsonl",
        [
            {"id": "1", "image": "good.jpg", "conversations": _turns()},  # 1 ok
            '{"id": "2", "image": "good.jpg", "conversations": [',  # 2 malformed JSON
            {"id": "3", "image": "missing.jpg", "conversations": _turns()},  # 3 missing image
            {"id": "4", "image": "cut.jpg", "conversations": _turns()},  # 4 truncated
            "",  # 5 blank, skipped
            {"id": "6", "conversations": _turns("Hi", "Hello")},  # 6 ok, text-only
            {"id": "7", "image": "alpha.png", "conversations": _turns("<image>\nQ", "  ")},  # 7 empty answer
            {
                "id": "8",
                "image": ["fake.png", "empty.jpg"],
                "conversations": _turns("<image><image>\nQ"),
            },  # 8 x2
            {"id": "9", "image": "good.jpg", "conversations": [{"from": "human"}]},  # 9 no value
            {"id": "10", "image": "big.png", "conversations": _turns()},  # 10 bomb at --max-pixels
            {"id": "11", "image": "alpha.png", "conversations": _turns()},  # 11 ok
        ],
    )
    rc = cli.main(
        ["validate-data", str(data), "--image-root", str(images), "--max-pixels", "100000", "--no-progress"]
    )
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    problems = out[:-1]
    expected = [
        (2, "malformed JSON"),
        (3, "missing.jpg: image file not found"),
        (4, "cut.jpg: truncated or corrupt image"),
        (7, "conversations[1].value: empty assistant turn"),
        (8, "fake.png: not an image"),
        (8, "empty.jpg: empty image file"),
        (9, "conversations[0]: missing field 'value'"),
        (10, "big.png: image is 400x300 = 120000 pixels, over the limit of 100000"),
    ]
    assert len(problems) == len(expected), out
    for line, (lineno, text) in zip(problems, expected, strict=True):
        assert line.startswith(f"{data}:{lineno}: "), line
        assert text in line, line
    assert out[-1] == (
        "1 file, 10 samples (1 text-only), 7 image reference(s) (7 files checked): 8 problem(s) in 7 sample(s)"
    )


def test_clean_data_exits_zero(tmp_path: Path, images: Path, capsys) -> None:
    first = _write(tmp_path / "a.jsonl", [{"id": "1", "image": "good.jpg", "conversations": _turns()}])
    second = tmp_path / "b.json"
    second.write_text(json.dumps([{"id": "2", "image": ["alpha.png"], "conversations": _turns()}]))
    rc = cli.main(["validate-data", str(first), str(second), "--image-root", str(images), "--no-progress"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out == ["2 files, 2 samples (0 text-only), 2 image reference(s) (2 files checked): no problems"]


def test_no_images_skips_image_checks(tmp_path: Path, capsys) -> None:
    data = _write(tmp_path / "a.jsonl", [{"id": "1", "image": "nowhere.jpg", "conversations": _turns()}])
    assert cli.main(["validate-data", str(data), "--no-images", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("(not opened): no problems")


def test_missing_file_is_a_usage_error(tmp_path: Path, capsys) -> None:
    rc = cli.main(["validate-data", str(tmp_path / "nope.jsonl")])
    assert rc == 2
    assert "nope.jsonl: dataset file not found" in capsys.readouterr().err


def test_broken_json_list_is_one_problem(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.json"
    data.write_text('[{"id": 1,\n "conversations": [}]')
    assert cli.main(["validate-data", str(data), "--no-progress"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{data}:2: malformed JSON")


def test_report_counts_warnings_and_json_list_items(tmp_path: Path, images: Path) -> None:
    data = tmp_path / "d.json"
    data.write_text(
        json.dumps(
            [
                {"id": "x", "image": "good.jpg", "conversations": _turns()},
                {"id": "x", "conversations": _turns("Hi", "Yo")},
                {"id": "y", "image": "missing.jpg", "conversations": _turns()},
            ]
        )
    )
    report = validate_dataset(data, images, progress=False, workers=1)
    assert (report.samples, report.text_only, report.images, report.bad_samples) == (3, 1, 2, 1)
    assert report.problems == [Problem(f"{data}:item 2", f"{images / 'missing.jpg'}: image file not found")]
    assert report.warnings == [Problem(f"{data}:item 1", f"duplicate id 'x' (first at {data}:item 0)")]
    assert not report.ok


def test_empty_file_is_a_problem(tmp_path: Path) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    report = validate_dataset(data, progress=False)
    assert report.problems == [Problem(str(data), "no records")]
