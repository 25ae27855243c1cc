"""The LLaVA conversation format: record validation, lazy JSONL / JSON-list files, response-format prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unillava.conversation import ImageSlot
from unillava.data.llava_format import (
    RESPONSE_FORMATS,
    ConversationFile,
    RecordError,
    apply_response_format,
    merge_turns,
    parse_record,
)
from unillava.errors import ConfigError, DataError


def _turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def _record(**overrides) -> dict:
    record = {
        "id": "r1",
        "image": "coco/1.jpg",
        "conversations": [_turn("human", "<image>\nWhat is this?"), _turn("gpt", "A cat.")],
    }
    record.update(overrides)
    return record


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --- parse_record -----------------------------------------------------------------------------------------


def test_parse_single_image_record() -> None:
    sample = parse_record(_record(dataset="coco", answer="cat"), source="train.jsonl:7")
    assert sample.id == "r1" and sample.images == ["coco/1.jpg"] and sample.source == "train.jsonl:7"
    assert [m.role for m in sample.messages] == ["user", "assistant"]
    assert sample.messages[0].content == [ImageSlot(), "\nWhat is this?"]
    assert sample.messages[1].content == ["A cat."]
    assert sample.extra == {"dataset": "coco", "answer": "cat"}


def test_missing_marker_with_one_image_is_prepended_like_llava() -> None:
    sample = parse_record(
        _record(conversations=[_turn("human", "Describe."), _turn("gpt", "A dog.")]), source="t:1"
    )
    assert sample.messages[0].content == [ImageSlot(), "\nDescribe."]


def test_multi_image_text_only_system_and_int_id() -> None:
    multi = _record(
        image=["a.jpg", "b.jpg"],
        conversations=[
            _turn("system", "Be brief."),
            _turn("human", "<image>\n<image>\nSame?"),
            _turn("gpt", "No."),
            _turn("human", "Why?"),
            _turn("gpt", "Colours."),
        ],
    )
    sample = parse_record(multi, source="t:1")
    assert [m.role for m in sample.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sample.messages[1].num_images == 2 and sample.images == ["a.jpg", "b.jpg"]

    text = parse_record(
        {"id": 5, "conversations": [_turn("human", "Hi"), _turn("gpt", "Hello")]}, source="t:2"
    )
    assert text.id == "5" and text.images == [] and text.messages[0].num_images == 0
    no_id = parse_record(
        {"image": None, "conversations": [_turn("user", "Hi"), _turn("assistant", "Yo")]}, source="t:3"
    )
    assert no_id.id == "t:3" and no_id.images == []


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ([1, 2], "record must be a JSON object, got array"),
        ({"id": "x"}, "missing field 'conversations'"),
        (_record(conversations="hi"), "field 'conversations' must be an array"),
        (_record(conversations=[]), "field 'conversations' is empty"),
        (_record(conversations=["hi", _turn("gpt", "x")]), "conversations[0] must be an object"),
        (
            _record(conversations=[{"value": "<image>"}, _turn("gpt", "x")]),
            "conversations[0]: missing field 'from'",
        ),
        (
            _record(conversations=[{"from": "human"}, _turn("gpt", "x")]),
            "conversations[0]: missing field 'value'",
        ),
        (
            _record(conversations=[_turn("human", "<image>"), {"from": 1, "value": "x"}]),
            "conversations[1].from must be a string",
        ),
        (
            _record(conversations=[_turn("human", "<image>"), {"from": "gpt", "value": None}]),
            "conversations[1].value must be a string, got null",
        ),
        (
            _record(conversations=[_turn("human", "<image>"), _turn("bot", "x")]),
            "conversations[1].from: unknown role 'bot'",
        ),
        (
            _record(conversations=[_turn("gpt", "<image>"), _turn("human", "x")]),
            "conversations[0].from: turns must alternate",
        ),
        (
            _record(conversations=[_turn("human", "<image>"), _turn("human", "x"), _turn("gpt", "y")]),
            "conversations[1].from: turns must alternate user/assistant; expected assistant",
        ),
        (
            _record(conversations=[_turn("human", "<image>"), _turn("gpt", "x"), _turn("system", "x")]),
            "conversations[2].from: a system turn is only allowed first",
        ),
        (
            _record(conversations=[_turn("human", "<image>"), _turn("gpt", "  \n")]),
            "conversations[1].value: empty assistant turn",
        ),
        (_record(conversations=[_turn("human", "<image>")]), "conversations: no assistant turn"),
        (
            _record(conversations=[_turn("human", "<image>"), _turn("gpt", "a"), _turn("human", "more?")]),
            "conversations[2]: last user turn has no assistant reply",
        ),
        (_record(image=None), "field 'image': 0 image(s) but 1 '<image>' marker(s)"),
        (_record(image=["a.jpg", "b.jpg"]), "field 'image': 2 image(s) but 1 '<image>' marker(s)"),
        (_record(image=7), "field 'image' must be a path or an array of paths, got integer"),
        (_record(image=["a.jpg", 3]), "image[1] must be a string path, got integer"),
        (_record(image=""), "field 'image' is an empty path"),
        (_record(id=[1]), "field 'id' must be a string or integer, got array"),
        (
            _record(conversations=[_turn("human", "<image>\nQ"), _turn("gpt", "see <image>")]),
            "conversations[1].value: '<image>' marker in a turn from the assistant; only user turns hold images",
        ),
        (
            _record(conversations=[_turn("human", " "), _turn("gpt", "a")], image=None),
            "conversations[0].value: empty user turn",
        ),
    ],
)
def test_parse_errors_name_source_and_field(record, expected: str) -> None:
    with pytest.raises(DataError) as info:
        parse_record(record, source="train.jsonl:5")
    assert str(info.value) == f"train.jsonl:5: {info.value.detail}"
    assert isinstance(info.value, RecordError) and info.value.source == "train.jsonl:5"
    assert expected in str(info.value)


# --- ConversationFile -------------------------------------------------------------------------------------


def test_jsonl_is_lazy_and_a_bad_line_only_fails_when_read(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "train.jsonl", [_record(id="a"), _record(id="b"), '{"id": "c", "conv', _record(id="d")]
    )
    data = ConversationFile(path)
    assert len(data) == 4
    assert [data[i].id for i in (0, 1, 3)] == ["a", "b", "d"]
    assert data[-1].source == f"{path}:4"
    with pytest.raises(DataError, match=r"train\.jsonl:3: malformed JSON"):
        data[2]
    with pytest.raises(IndexError):
        data[4]


def test_jsonl_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    bad = _record(id="c", image=None)
    path.write_text(
        "\n"
        + json.dumps(_record(id="a"))
        + "\n\n   \n"
        + json.dumps(_record(id="b"))
        + "\r\n\n"
        + json.dumps(bad)
    )
    data = ConversationFile(path)
    assert len(data) == 3
    assert [data[i].source for i in (0, 1)] == [f"{path}:2", f"{path}:5"]
    with pytest.raises(DataError, match=r"t\.jsonl:7: field 'image': 0 image"):
        data[2]
    assert [s for s, _ in data.iter_raw()] == [f"{path}:2", f"{path}:5", f"{path}:7"]


def test_jsonl_with_bom_and_unicode_line_separator(tmp_path: Path) -> None:
    record = _record(conversations=[_turn("human", "<image>\nline\u2028sep \u00e9"), _turn("gpt", "ok")])
    path = tmp_path / "u.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(record, ensure_ascii=False).encode() + b"\n")
    data = ConversationFile(path)
    assert len(data) == 1 and data[0].messages[0].text == "\nline\u2028sep \u00e9"


def test_json_list_sources_are_items(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(
        json.dumps(
            [
                _record(id="a"),
                {"id": "b"},
                _record(id="c", image=None, conversations=[_turn("human", "hi"), _turn("gpt", "yo")]),
            ]
        )
    )
    data = ConversationFile(path)
    assert data.format == "json" and len(data) == 3
    assert data[0].source == f"{path}:item 0" and data[2].id == "c"
    with pytest.raises(DataError, match=r"data\.json:item 1: missing field 'conversations'"):
        data[1]
    assert [s.id for s in data[::2]] == ["a", "c"]


def test_json_list_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"id": 1},\n  {"id": \n')
    with pytest.raises(DataError, match=r"broken\.json:4: malformed JSON"):
        ConversationFile(broken)
    (tmp_path / "obj.json").write_text("[]")
    assert len(ConversationFile(tmp_path / "obj.json")) == 0
    with pytest.raises(DataError, match="not found"):
        ConversationFile(tmp_path / "missing.jsonl")


def test_jsonl_named_json_is_sniffed(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "actually_lines.json", [_record(id="a"), _record(id="b")])
    data = ConversationFile(path)
    assert data.format == "jsonl" and [s.id for s in data] == ["a", "b"]


def test_lengths_and_has_images_in_one_cached_pass(tmp_path: Path) -> None:
    text_only = {"id": "t", "conversations": [_turn("human", "abc"), _turn("gpt", "de")]}
    path = _write_jsonl(tmp_path / "m.jsonl", [_record(), text_only, "not json", _record(image=["x.jpg"])])
    data = ConversationFile(path)
    assert data.lengths() == [len("<image>\nWhat is this?") + len("A cat."), 5, 0, 27]
    assert data.has_images() == [True, False, False, True]
    assert data.lengths() is data.lengths()


def test_image_path_joins_root(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [_record(image=["coco/1.jpg"]), _record(image=["/abs/2.jpg"])])
    assert ConversationFile(path).image_path(ConversationFile(path)[0], 0) == tmp_path / "coco/1.jpg"
    data = ConversationFile(path, image_root=tmp_path / "images")
    assert data.image_path(data[0], 0) == tmp_path / "images" / "coco" / "1.jpg"
    assert data.image_path(data[1], 0) == Path("/abs/2.jpg")


# --- response formats -----------------------------------------------------------------------------------


def test_apply_response_format_appends_once_to_every_user_turn() -> None:
    record = _record(
        conversations=[
            _turn("human", "<image>\nColour?"),
            _turn("gpt", "Red"),
            _turn("human", "Shape?"),
            _turn("gpt", "Round"),
        ]
    )
    sample = parse_record(record, source="t:1")
    short = apply_response_format(sample, "short")
    prompt = RESPONSE_FORMATS["short"]
    assert short.messages[0].content == [ImageSlot(), f"\nColour?\n{prompt}"]
    assert short.messages[2].text == f"Shape?\n{prompt}"
    assert short.messages[1].text == "Red"
    assert apply_response_format(short, "short").messages == short.messages
    assert sample.messages[0].text == "\nColour?"  # input untouched
    assert apply_response_format(sample, None) is sample


def test_apply_response_format_after_trailing_image_and_unknown_kind() -> None:
    record = _record(conversations=[_turn("human", "Which?\n<image>"), _turn("gpt", "B")])
    option = apply_response_format(parse_record(record, source="t:1"), "option")
    assert option.messages[0].content == ["Which?\n", ImageSlot(), "\n" + RESPONSE_FORMATS["option"]]
    with pytest.raises(ConfigError, match="unknown 'long'"):
        apply_response_format(parse_record(record, source="t:1"), "long")


def _qa(i: int, image: str | None, question: str, answer: str) -> dict:
    record = {
        "id": i,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }
    if image is not None:
        record["image"] = image
    return record


def test_merge_turns_groups_one_images_questions_and_keeps_the_rest() -> None:
    records = [
        _qa(0, "a.png", "q0", "a0"),
        _qa(1, "b.png", "q1", "a1"),
        _qa(2, "a.png", "q2", "a2"),
        _qa(3, "a.png", "q3", "a3"),
        _qa(4, None, "text only", "t"),
    ]
    merged = merge_turns(records, max_turns=2, seed=-1)
    by_id = {r["id"]: r for r in merged}
    assert set(by_id) == {"0+2", "3", "1", 4}
    turns = by_id["0+2"]["conversations"]
    assert [t["value"] for t in turns] == ["<image>\nq0", "a0", "q2", "a2"]
    assert by_id["0+2"]["image"] == "a.png" and by_id[4] is records[4]
    answers = sorted(t["value"] for r in merged for t in r["conversations"] if t["from"] == "gpt")
    assert answers == ["a0", "a1", "a2", "a3", "t"]  # nothing lost or duplicated
    shuffled = merge_turns(records, max_turns=3, seed=1)
    assert len(shuffled) == 3
    assert sorted(t["value"] for r in shuffled for t in r["conversations"] if t["from"] == "gpt") == answers
    assert all(r["conversations"][0]["value"].startswith("<image>") for r in shuffled if "image" in r)
    assert all("<image>" not in t["value"] for r in shuffled for t in r["conversations"][1:])
    with pytest.raises(ConfigError, match="max_turns"):
        merge_turns(records, max_turns=0)
