"""GPT-judged benchmarks (MM-Vet, LLaVA-Bench-in-the-wild) and a small OpenAI-compatible judge client.

These benchmarks have no offline scorer: the runner writes the judge requests (OpenAI batch JSONL, with
the official judge prompts) and, given `--judge-endpoint URL --judge-model NAME`, sends them to any
OpenAI-compatible server and scores the replies the way the official scripts do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unillava.errors import DataError, UnillavaError
from unillava.evaluation.benchmarks.base import (
    Benchmark,
    Column,
    Item,
    LoadResult,
    Prediction,
    Problems,
    get_id,
    get_str,
    image_dir,
    keyed_records,
    mean,
    read_json,
    read_json_object,
    read_jsonl,
    where,
    write_json,
)
from unillava.evaluation.benchmarks.common import dedupe

# MM-Vet's grader prompt (mm-vet_evaluator.py): the few-shot table the judge completes with a score.
MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""

# LLaVA-Bench's judge system message and the "llava_bench_*" rule of LLaVA's llava/eval/table/rule.json
# (a rule.json in the data directory takes precedence).
LLAVA_BENCH_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_BENCH_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \nPlease rate the helpfulness, "
    "relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale "
    "of 1 to 10, where a higher score indicates better overall performance.\nPlease first output a single line "
    "containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are "
    "separated by a space.\nIn the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias and ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)


class JudgeClient:
    """Chat completions against any OpenAI-compatible server: the `openai` client if installed, else httpx.

    The API key comes from OPENAI_API_KEY when set (local servers usually accept any key).
    """

    def __init__(self, endpoint: str, model: str, *, backend: str = "auto", timeout: float = 120.0):
        if backend not in ("auto", "openai", "httpx"):
            raise UnillavaError(f"judge backend must be auto, openai or httpx, not {backend!r}")
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.api_key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self._openai: Any = None
        if backend in ("auto", "openai"):
            try:
                # openai is optional: the judge falls back to plain HTTP (httpx) without it.
                from openai import OpenAI

                self._openai = OpenAI(
                    base_url=self.endpoint, api_key=self.api_key, timeout=timeout, max_retries=2
                )
            except ImportError:
                if backend == "openai":
                    raise UnillavaError("the openai package is not installed") from None
        self.backend = "openai" if self._openai is not None else "httpx"

    def complete(self, body: Mapping[str, Any]) -> str:
        """The first choice's message text for a chat-completions request body (its model is replaced)."""
        request = {**body, "model": self.model}
        try:
            if self._openai is not None:
                reply = self._openai.chat.completions.create(**request)
                return reply.choices[0].message.content or ""
            import httpx  # only the fallback path without the openai client sends requests with it

            response = httpx.post(
                f"{self.endpoint}/chat/completions",
                json=request,
                headers={"Authorization": f"Bearer {self.api_key}"},
                timeout=self.timeout,
            )
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"] or ""
        except Exception as err:  # any transport or protocol failure becomes one readable line
            raise UnillavaError(f"judge at {self.endpoint} failed: {type(err).__name__}: {err}") from None


# --------------------------------------------------------------------------------------------------
# MM-Vet
# --------------------------------------------------------------------------------------------------


def mmvet_score(reply: str) -> float | None:
    """The grade MM-Vet's evaluator reads: the reply's first space-separated token as a float in [0, 1]."""
    token = reply.strip().split(" ")[0].strip() if reply.strip() else ""
    try:
        value = float(token)
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


class MMVet(Benchmark):
    name = "mm-vet"
    title = "MM-Vet"
    dirs = ("mm-vet", "mmvet", "MM-Vet")
    columns = (Column("total", "MM-Vet"),)
    judged = True
    max_new_tokens = 1024
    default_split = "test"
    judge_default = "gpt-4-0613"
    download = "`mm-vet.json` and `images/` from MM-Vet's release (github.com/yuweihao/MM-Vet, mm-vet.zip)."
    metric_note = (
        "mean GPT-4 correctness score (0-1, x100) over all questions; per capability in the breakdown"
    )

    def recognises(self, root: Path) -> bool:
        return (root / "mm-vet.json").is_file()

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        problems = Problems()
        path = root / "mm-vet.json"
        data = read_json_object(path, "mapping ids (v1_0, ...) to questions")
        images = image_dir(root, ("images",))
        items = []
        for at, qid, q in keyed_records(path, data, problems):
            question = get_str(q, "question", at, problems)
            answer = get_str(q, "answer", at, problems)
            image = get_str(q, "imagename", at, problems)
            caps = q.get("capability", [])
            if question is None or answer is None or image is None:
                continue
            items.append(
                Item(
                    qid,
                    question,
                    [images / image],
                    {
                        "answer": answer,
                        "capability": [str(c) for c in caps] if isinstance(caps, list) else [],
                    },
                    {"at": at},
                )
            )
        return LoadResult(items, split or "test", problems.messages)

    def judge_requests(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], model: str
    ) -> list[dict]:
        out = []
        for item in items:
            pred = predictions.get(item.id)
            gt = item.answer["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
            row = " | ".join([item.prompt, gt, pred.text if pred else "", ""])
            out.append(
                {
                    "custom_id": item.id,
                    "body": {
                        "model": model,
                        "messages": [{"role": "user", "content": f"{MMVET_PROMPT}\n{row}"}],
                        "temperature": 0.0,
                        "max_tokens": 3,
                    },
                }
            )
        return out

    def parse_reply(self, reply: str) -> Any:
        return mmvet_score(reply)

    def score_judged(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], replies: Mapping[str, str]
    ) -> dict[str, Any]:
        scores, unparsable = [], 0
        per_cap: dict[str, list[float]] = {}
        for item in items:
            value = mmvet_score(replies.get(item.id, ""))
            if value is None:
                unparsable += 1
                value = 0.0
            scores.append(value)
            for cap in item.answer["capability"]:
                per_cap.setdefault(cap, []).append(value)
        warnings = (
            [f"{unparsable} judge repl(ies) had no score in [0, 1]; scored 0.0 as MM-Vet's evaluator does"]
            if unparsable
            else []
        )
        return {
            "metrics": {"total": mean(scores)},
            "breakdown": {
                "capability": {k: {"score": mean(v), "n": len(v)} for k, v in sorted(per_cap.items())}
            },
            "warnings": warnings,
        }

    def write_submission(
        self,
        items: Sequence[Item],
        predictions: Mapping[str, Prediction],
        out_dir: Path,
        split: str,
        root: Path,
    ) -> list[Path]:
        """{id: answer}, what MM-Vet's online evaluator and mm-vet_evaluator.py read."""
        rows = {item.id: (p.text if (p := predictions.get(item.id)) else "") for item in items}
        return [write_json(out_dir / "mm-vet_results.json", rows)]


# --------------------------------------------------------------------------------------------------
# LLaVA-Bench-in-the-wild
# --------------------------------------------------------------------------------------------------

_SCORE_PAIR = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+(-?\d+(?:\.\d+)?)\s*$")


def llava_bench_scores(reply: str) -> tuple[float, float] | None:
    """The two scores on the reply's first line ("8 7", "8, 7"), as eval_gpt_review_bench.py parses them."""
    first = reply.split("\n")[0].replace(",", " ")
    match = _SCORE_PAIR.match(first)
    return (float(match.group(1)), float(match.group(2))) if match else None


class LLaVABench(Benchmark):
    name = "llava-bench"
    title = "LLaVA-Bench-in-the-wild"
    dirs = ("llava-bench-in-the-wild", "llava-bench", "llava_bench")
    columns = (Column("relative_score", "LLaVA-W", scale=1.0),)
    judged = True
    max_new_tokens = 1024
    default_split = "test"
    judge_default = "gpt-4-0314"
    download = "HF liuhaotian/llava-bench-in-the-wild: `questions.jsonl`, `answers_gpt4.jsonl`, `context.jsonl` and `images/`."
    metric_note = (
        "relative score: mean judge score of the model / mean judge score of the GPT-4 reference answer x100"
    )

    def recognises(self, root: Path) -> bool:
        return (root / "questions.jsonl").is_file() and (root / "answers_gpt4.jsonl").is_file()

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        problems = Problems()
        images = image_dir(root, ("images",))
        q_path, a_path, c_path = root / "questions.jsonl", root / "answers_gpt4.jsonl", root / "context.jsonl"
        references: dict[str, str] = {}
        for line, obj in read_jsonl(a_path, problems):
            at = where(a_path, line)
            qid = get_id(obj, ("question_id",), at, problems)
            text = get_str(obj, "text", at, problems, allow_empty=True)
            if qid is not None and text is not None:
                references[qid] = text
        contexts: dict[str, str] = {}
        if c_path.is_file():
            for line, obj in read_jsonl(c_path, problems):
                caption = obj.get("caption", "")
                if isinstance(obj.get("image"), str):
                    contexts[obj["image"]] = "\n".join(caption) if isinstance(caption, list) else str(caption)
                else:
                    problems.add(where(c_path, line), "field 'image' must be a string")
        rule = LLAVA_BENCH_RULE
        rule_path = root / "rule.json"
        if rule_path.is_file():
            rules = read_json(rule_path)
            rule = rules.get("llava_bench_conv", {}).get("prompt", rule) if isinstance(rules, dict) else rule
        items = []
        for line, obj in read_jsonl(q_path, problems):
            at = where(q_path, line)
            qid = get_id(obj, ("question_id",), at, problems)
            text = get_str(obj, "text", at, problems)
            image = get_str(obj, "image", at, problems)
            if qid is None or text is None or image is None:
                continue
            if qid not in references:
                problems.add(at, f"question id {qid!r} has no reference answer in {a_path}")
                continue
            items.append(
                Item(
                    qid,
                    text,
                    [images / image],
                    {
                        "reference": references[qid],
                        "context": contexts.get(image, ""),
                        "category": str(obj.get("category", "conv")),
                        "rule": rule,
                    },
                    {"at": at},
                )
            )
        if not items and references and not problems.messages:
            raise DataError(f"{q_path}: no questions")
        return LoadResult(dedupe(items, problems), split or "test", problems.messages)

    def judge_requests(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], model: str
    ) -> list[dict]:
        out = []
        for item in items:
            pred = predictions.get(item.id)
            a = item.answer
            content = (
                f"[Context]\n{a['context']}\n\n[Question]\n{item.prompt}\n\n"
                f"[Assistant 1]\n{a['reference']}\n\n[End of Assistant 1]\n\n"
                f"[Assistant 2]\n{pred.text if pred else ''}\n\n[End of Assistant 2]\n\n"
                f"[System]\n{a['rule']}\n\n"
            )
            out.append(
                {
                    "custom_id": item.id,
                    "body": {
                        "model": model,
                        "messages": [
                            {"role": "system", "content": LLAVA_BENCH_SYSTEM},
                            {"role": "user", "content": content},
                        ],
                        "temperature": 0.2,
                        "max_tokens": 1024,
                    },
                }
            )
        return out

    def parse_reply(self, reply: str) -> Any:
        return llava_bench_scores(reply)

    def score_judged(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], replies: Mapping[str, str]
    ) -> dict[str, Any]:
        pairs: dict[str, list[tuple[float, float]]] = {}
        unparsable = 0
        for item in items:
            pair = llava_bench_scores(replies.get(item.id, ""))
            if pair is None:
                unparsable += 1
                continue
            for key in ("all", item.answer["category"]):
                pairs.setdefault(key, []).append(pair)

        def relative(values: list[tuple[float, float]]) -> dict[str, float]:
            ref, ours = mean([v[0] for v in values]), mean([v[1] for v in values])
            return {
                "relative_score": 100.0 * ours / ref if ref else 0.0,
                "model": ours,
                "reference": ref,
                "n": len(values),
            }

        overall = relative(pairs.get("all", []))
        warnings = (
            [
                f"{unparsable} judge repl(ies) had no 'score1 score2' first line; left out of the means "
                "(LLaVA's script counts them as -1, -1)"
            ]
            if unparsable
            else []
        )
        return {
            "metrics": {k: overall[k] for k in ("relative_score", "model", "reference")},
            "breakdown": {"category": {k: relative(v) for k, v in sorted(pairs.items()) if k != "all"}},
            "warnings": warnings,
        }
