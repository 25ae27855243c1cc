"""The CLI as a user meets it: generate, chat, bad input as one-line errors with non-zero exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from unillava.cli import main


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), "red").save(path)
    return path


def test_generate_json(tiny_model_dir, image_file, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--image",
            str(image_file),
            "--image",
            str(image_file),
            "--prompt",
            "What is in <image> these?",
            "--max-new-tokens",
            "5",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["text"], str)


def test_generate_matches_python_api(tiny_model_dir, image_file, capsys):
    import unillava

    main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--image",
            str(image_file),
            "--prompt",
            "colour?",
            "--max-new-tokens",
            "6",
        ]
    )
    cli_text = capsys.readouterr().out.strip()
    assert cli_text == unillava.load(tiny_model_dir).generate("colour?", str(image_file), max_new_tokens=6)


def test_chat_multi_turn_with_image_command(tiny_model_dir, image_file, capsys, monkeypatch):
    script = f"/image {image_file}\nwhat is this?\n/image {image_file.parent / 'nope.png'}\nand now?\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "attached" in captured.out
    assert "nope.png" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "{model}", "--image", "{missing}", "--prompt", "hi"], "missing.png"),
        (["generate", "--model", "{empty}", "--prompt", "hi"], "not a model directory"),
        (["generate", "--model", "{model}", "--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "--model", "{model}", "--image", "{text}", "--prompt", "hi"], "notimage.png"),
    ],
)
def test_bad_input_is_one_line_error(tiny_model_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notimage.png").write_text("hello")
    values = {
        "model": tiny_model_dir,
        "missing": tmp_path / "missing.png",
        "empty": tmp_path / "empty",
        "text": tmp_path / "notimage.png",
    }
    code = main([a.format(**values) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_console_script_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "unillava.cli", "generate", "--model", str(tmp_path), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error:" in result.stderr


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_visual_prompts_on_a_model_without_them_exit_2(tiny_model_dir, image_file, tmp_path, capsys, command):
    args = [command, "--model", str(tiny_model_dir), "--image", str(image_file), "--box", "1,1,20,20"]
    assert main(args + (["--prompt", "hi"] if command == "generate" else [])) == 2
    err = capsys.readouterr().err
    assert "this model takes no visual prompts" in err and err.count("\n") == 1


def test_mask_prompt_of_the_wrong_size_names_the_file_and_both_sizes(
    tiny_model_dir, image_file, tmp_path, capsys
):
    Image.new("L", (10, 10), 255).save(tmp_path / "m.png")
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--image",
                str(image_file),
                "--prompt",
                "hi",
                "--mask",
                str(tmp_path / "m.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "m.png" in err and "10x10" in err and "40x30" in err
