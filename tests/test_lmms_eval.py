"""The lmms-eval plugin against the real lmms-eval (scripts/install_lmms_eval.sh installs it): its registry,
its argument parsing, its request objects, its task scorers and one CLI run on a local task. No hub access:
tasks and data are local files written here, the models are tiny and random.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from unillava.evaluation.lmms_eval_plugin import merge_model_args, parse_batch_size

ROOT = Path(__file__).resolve().parents[1]
HAVE_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
needs_lmms_eval = pytest.mark.skipif(
    not HAVE_LMMS_EVAL, reason="lmms-eval is not installed (bash scripts/install_lmms_eval.sh installs it)"
)
# The CLI's own defaults, as lmms-eval's simple_evaluate passes them beside --model_args.
CLI_DEFAULTS = {"batch_size": 1, "max_batch_size": None, "device": None}
COLOURS = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200)}


def write_task(folder: Path, name: str, body: str) -> Path:
    """A local lmms-eval task: three coloured images, a JSONL of questions and a task YAML reading them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        image = folder / f"{colour}.png"
        Image.new("RGB", (32, 32), rgb).save(image)
        rows.append(
            {"id": i, "image": str(image), "question": "What colour is the picture?", "answer": colour}
        )
    data = folder / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    header = (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\ndoc_to_visual: image\ndoc_to_text: "{{question}}"\n'
    )
    (folder / f"{name}.yaml").write_text(header + body)
    return data


def instance(request_type: str, arguments: tuple, doc_id: int = 0, idx: int = 0) -> Any:
    from lmms_eval.api.instance import Instance

    return Instance(request_type, arguments, idx, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


# --------------------------------------------------------------------------------------------------
# Without lmms-eval: argument merging and the entry point's declaration
# --------------------------------------------------------------------------------------------------


def test_model_args_win_over_cli_flags_without_a_clash():
    assert merge_model_args({"pretrained": "m", "batch_size": 2}, CLI_DEFAULTS) == {
        "pretrained": "m",
        "batch_size": 2,
    }
    assert merge_model_args({"pretrained": "m"}, {**CLI_DEFAULTS, "batch_size": "4", "device": "cpu"}) == {
        "pretrained": "m",
        "batch_size": "4",
        "device": "cpu",
    }
    assert merge_model_args({"pretrained": "m"}, None) == {"pretrained": "m"}
    assert [parse_batch_size(v) for v in (None, "", 1, "3", "auto", "auto:4")] == [1, 1, 1, 3, 1, 1]
    with pytest.raises(ValueError, match="at least 1"):
        parse_batch_size(0)
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert entry_points["lmms_eval.models"]["unillava"] == "unillava.evaluation.lmms_eval_plugin:manifest"


# --------------------------------------------------------------------------------------------------
# With the real lmms-eval
# --------------------------------------------------------------------------------------------------


@needs_lmms_eval
def test_registry_finds_unillava_through_the_entry_point():
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    resolved = registry.resolve("unillava")
    assert (resolved.model_type, resolved.class_path) == (
        "simple",
        "unillava.evaluation.lmms_eval_plugin.Unillava",
    )
    cls = get_model("unillava")  # what the CLI calls
    assert cls is registry.get_model_class("unillava") and issubclass(cls, lmms) and cls.is_simple


@needs_lmms_eval
def test_construction_from_the_cli_argument_string(tiny_model_dir):
    from lmms_eval.models import get_model

    cls = get_model("unillava")
    plain = cls.create_from_arg_string(f"pretrained={tiny_model_dir}", CLI_DEFAULTS)
    assert plain.batch_size == 1 and plain.ll_score == "nll" and str(plain.lm.model.device) == "cpu"
    # batch_size in model_args and the CLI's own --batch_size (always passed) no longer clash.
    both = cls.create_from_arg_string(f"pretrained={tiny_model_dir},batch_size=2,device=cpu", CLI_DEFAULTS)
    assert both.batch_size == 2
    from_cli = cls.create_from_arg_string(f"pretrained={tiny_model_dir}", {**CLI_DEFAULTS, "batch_size": "3"})
    assert from_cli.batch_size == 3
    with pytest.raises(ValueError, match="ll_score"):
        cls.create_from_arg_string(f"pretrained={tiny_model_dir},ll_score=prob", CLI_DEFAULTS)


@needs_lmms_eval
def test_generation_and_loglikelihood_on_real_instances(tiny_model_dir):
    from lmms_eval.models import get_model

    cls = get_model("unillava")
    lm = cls.create_from_arg_string(f"pretrained={tiny_model_dir},batch_size=2", CLI_DEFAULTS)
    docs = [{"img": Image.new("RGB", (8, 8), (10, 200, 10))}, {"img": None}]
    lm.task_dict = {"t": {"test": docs}}

    def to_visual(doc: dict[str, Any]) -> list[Any]:
        return [doc["img"]] if doc["img"] is not None else []

    gen = [
        instance(
            "generate_until",
            ("<image>\nWhat colour?", {"until": ["\n"], "max_new_tokens": 2}, to_visual, 0, "t", "test"),
        ),
        instance(
            "generate_until",
            ("Say hi.", {"max_new_tokens": 2, "temperature": 0}, to_visual, 1, "t", "test"),
            1,
        ),
    ]
    texts = lm.generate_until(gen)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

    requests = [
        instance("loglikelihood", ("Is it green?", " yes", to_visual, 0, "t", "test")),
        instance("loglikelihood", ("Is it green?", lambda doc: " no", to_visual, 1, "t", "test"), 1),
        instance("loglikelihood", ("", " yes")),  # two-argument: the unconditional half of acc_mutual_info
    ]
    nll = lm.loglikelihood(requests)
    lm.ll_score = "logprob"
    logprob = lm.loglikelihood(requests)
    assert all(isinstance(s, float) and s > 0 and isinstance(greedy, bool) for s, greedy in nll)
    assert [-s for s, _ in nll] == pytest.approx([s for s, _ in logprob])
    assert [g for _, g in nll] == [g for _, g in logprob]
    assert logprob[0][0] != pytest.approx(logprob[2][0])  # the image and question change the score
    with pytest.raises(ValueError, match="2 or 6 arguments"):
        lm.loglikelihood([instance("loglikelihood", ("a", "b", "c"))])
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round(gen)


@needs_lmms_eval
def test_multiple_choice_scored_by_lmms_eval(tiny_model_dir, tmp_path):
    """lmms-eval's own multiple_choice scorer on the plugin's answers: acc takes the argmin of the first
    element (hence ll_score=nll), acc_mutual_info the argmax of differences (hence ll_score=logprob)."""
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager, get_task_dict

    choices = 'doc_to_choice: ["red", "green", "blue"]\ndoc_to_target: answer\noutput_type: multiple_choice\n'
    write_task(tmp_path, "colours_mc", choices + "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    write_task(tmp_path, "colours_mi", choices + "metric_list:\n  - metric: acc_mutual_info\n")
    tasks = get_task_dict(
        ["colours_mc", "colours_mi"], TaskManager(include_path=str(tmp_path), include_defaults=False)
    )
    lm = get_model("unillava").create_from_arg_string(f"pretrained={tiny_model_dir}", CLI_DEFAULTS)
    mc, mi = tasks["colours_mc"], tasks["colours_mi"]
    lm.task_dict = {"colours_mc": mc.dataset, "colours_mi": mi.dataset}

    mc.build_all_requests(limit=3, rank=0, world_size=1)
    per_doc = collections.defaultdict(list)
    for request, result in zip(mc.instances, lm.loglikelihood(mc.instances), strict=True):
        per_doc[request.doc_id].append((request.idx, result))
    for doc_id, results in per_doc.items():
        nll = [score for _, (score, _) in sorted(results)]
        expected = float(nll.index(min(nll)) == doc_id)  # doc i's answer is choice i
        assert (
            mc.process_results(mc.dataset["test"][doc_id], [r for _, r in sorted(results)])["acc"] == expected
        )

    # lmms-eval's build_all_requests cannot build acc_mutual_info's two-argument requests (it indexes
    # arguments[2]), so they come from the task's construct_requests, as the harness would send them.
    lm.ll_score = "logprob"
    doc = mi.dataset["test"][1]
    ctx = mi.doc_to_text(doc)
    requests = mi.construct_requests(
        doc_id=1, ctx=ctx, metadata={"task": "colours_mi", "doc_id": 1, "repeats": 1, "split": "test"}
    )
    assert [len(r.args) for r in requests] == [6, 6, 6, 2, 2, 2]
    results = lm.loglikelihood(requests)
    gains = [c[0] - u[0] for c, u in zip(results[:3], results[3:], strict=True)]
    # process_results pairs conditional and unconditional answers as interleaved [c0, u0, c1, u1, ...].
    interleaved = [r for pair in zip(results[:3], results[3:], strict=True) for r in pair]
    assert mi.process_results(doc, interleaved)["acc_mutual_info"] == float(gains.index(max(gains)) == 1)


@needs_lmms_eval
@pytest.mark.slow  # a fresh interpreter importing torch, transformers and datasets: ~15 s
def test_cli_run_on_a_local_task_writes_results(chatty_model_dir, tmp_path):
    from lmms_eval.models import get_model

    # The expected answers: the plugin's own greedy answer for the first image, a wrong one for the second.
    lm = get_model("unillava").create_from_arg_string(
        f"pretrained={chatty_model_dir},batch_size=2", CLI_DEFAULTS
    )
    task_dir = tmp_path / "task"
    body = (
        "output_type: generate_until\ndoc_to_target: answer\n"
        'generation_kwargs:\n  max_new_tokens: 4\n  until: ["\\n"]\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    data = write_task(task_dir, "colours_local", body)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    lm.task_dict = {"t": {"test": rows}}
    gen_kwargs = {"max_new_tokens": 4, "until": ["\n"]}
    requests = [
        instance(
            "generate_until",
            (row["question"], dict(gen_kwargs), lambda doc: [doc["image"]], i, "t", "test"),
            i,
        )
        for i, row in enumerate(rows[:2])
    ]
    answers = lm.generate_until(requests)
    rows[0]["answer"], rows[1]["answer"] = answers[0].strip(), "no model says this"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    out = tmp_path / "out"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "unillava",
        "--model_args",
        f"pretrained={chatty_model_dir},batch_size=2",
    ]
    args += [
        "--tasks",
        "colours_local",
        "--include_path",
        str(task_dir),
        "--limit",
        "2",
        "--output_path",
        str(out),
    ]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "|colours_local|none  |     0|exact_match|↑  |  0.5|" in run.stdout, run.stdout[-3000:]
    (results_file,) = out.glob("*/*_results.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["colours_local"]["exact_match,none"] == pytest.approx(0.5)
    assert results["n-samples"]["colours_local"]["effective"] == 2
    assert results["config"]["model_backend"].startswith("unillava.evaluation.lmms_eval_plugin.Unillava")
