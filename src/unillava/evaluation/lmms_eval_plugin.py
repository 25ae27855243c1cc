"""An lmms-eval model plugin, so `lmms-eval --model unillava --model_args pretrained=PATH --tasks mme` runs any
lmms-eval task with a unillava model (ours, llava-hf or original LLaVA layouts).

lmms-eval finds it through the entry-point group "lmms_eval.models" (its ModelRegistryV2, lmms-eval >= 0.5):
`pyproject.toml` points that group at `manifest`, which returns a ModelManifest naming the class
`unillava.evaluation.lmms_eval_plugin.Unillava`. lmms-eval is imported only when lmms-eval itself asks for
the class, so unillava never depends on it (scripts/install_lmms_eval.sh installs it beside a CPU torch).

model_args: pretrained (required), dtype (float32 | bfloat16 | float16), device (cpu, cuda, cuda:0 ...),
batch_size, max_new_tokens (default when a task sets none), ll_score (nll | logprob, see `LL_SCORES`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from unillava.conversation import IMAGE_MARKER, user_message
from unillava.data.images import load_image
from unillava.errors import UnillavaError
from unillava.inference import load

MODEL_ID = "unillava"
CLASS_PATH = "unillava.evaluation.lmms_eval_plugin.Unillava"

# What `loglikelihood` puts first in each (score, is_greedy) pair. lmms-eval's consumers disagree on the sign:
# multiple_choice `acc`/`acc_norm` take the argmin (its own LLaVA models return a loss), `acc_mutual_info` and
# `perplexity` expect log-probabilities (the base class's documented contract). Only the former run through
# lmms-eval's evaluator today (0.6.1; 0.7.x crashes on all loglikelihood results, docs/evaluation.md), so
# "nll" (-log P) is the default: acc/acc_norm then equal lm-eval's. "logprob" keeps the documented contract.
LL_SCORES = ("nll", "logprob")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

log = logging.getLogger(__name__)


def manifest() -> Any:
    """The entry point's payload: lmms-eval's ModelManifest for `--model unillava`."""
    # lmms-eval is optional: imported only when lmms-eval itself calls this entry point.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def __getattr__(name: str) -> Any:
    # The class subclasses lmms-eval's base class, so it can only exist once lmms-eval is importable.
    if name == "Unillava":
        cls = _build_class()
        globals()["Unillava"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def merge_model_args(model_args: dict[str, Any], cli_args: dict[str, Any] | None) -> dict[str, Any]:
    """One set of constructor arguments from `--model_args` and the CLI's own flags (batch_size, device, ...).

    lmms-eval always passes `--batch_size` (default 1) beside model_args, so a key given in both would clash;
    model_args wins, being the more specific and the only one a user can be seen to have typed.
    """
    merged = dict(model_args)
    for key, value in (cli_args or {}).items():
        if value is None:
            continue
        if key in merged and str(merged[key]) != str(value):
            log.info(
                "unillava: %s=%s from model_args overrides the command line's %s", key, merged[key], value
            )
        merged.setdefault(key, value)
    return merged


def parse_batch_size(value: int | str | None) -> int:
    """A batch size from model_args or `--batch_size`: a positive int; "auto" (lmms-eval's memory probe,
    which the plugin does not do) and empty values fall back to 1."""
    if value is None or value == "":
        return 1
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        log.warning("unillava: batch_size=%s is not supported, using 1; give a number instead", value)
        return 1
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {value!r}")
    return size


def _images(visuals: Any) -> list[Any]:
    """PIL images from what a task's doc_to_visual returns (an image, a path, a list, or None)."""
    if visuals is None:
        return []
    items = visuals if isinstance(visuals, list | tuple) else [visuals]
    out = []
    for visual in items:
        if isinstance(visual, list | tuple):
            out.extend(_images(visual))
        elif isinstance(visual, Image.Image):
            out.append(visual.convert("RGB") if visual.mode != "RGB" else visual)
        elif isinstance(visual, str | Path) and Path(visual).suffix.lower() in IMAGE_SUFFIXES:
            out.append(load_image(visual))
        else:
            raise UnillavaError(
                f"unillava's lmms-eval plugin takes images only, got {type(visual).__name__} {str(visual)[:80]!r}"
            )
    return out


def _settings(gen_kwargs: dict[str, Any], default_max: int) -> dict[str, Any]:
    """Our generation settings from a task's gen_kwargs: greedy unless do_sample with temperature > 0."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [str(u) for u in until]
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    sample = bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0
    top_p = gen_kwargs.get("top_p")
    return {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or default_max),
        "temperature": temperature if sample else 0.0,
        "top_p": float(top_p) if sample and top_p else 1.0,
        "stop": until,
    }


def _build_class() -> type:
    # lmms-eval is optional: the class subclasses its base class, so it is built on first access only.
    from lmms_eval import utils as lmms_utils
    from lmms_eval.api.model import lmms  # optional dependency, see above

    class Unillava(lmms):
        """unillava as an lmms-eval "simple" model: images go before the task's text in one user turn."""

        is_simple = True

        def __init__(
            self,
            pretrained: str,
            dtype: str = "float32",
            device: str | None = "cpu",
            batch_size: int | str | None = 1,
            max_new_tokens: int | str = 256,
            ll_score: str = "nll",
            **kwargs: Any,
        ) -> None:
            if ll_score not in LL_SCORES:
                raise ValueError(f"ll_score must be one of {', '.join(LL_SCORES)}, got {ll_score!r}")
            self.pretrained = str(pretrained)
            super().__init__()
            self.lm = load(self.pretrained, dtype=str(dtype), device=str(device or "cpu"))
            self.batch_size_per_gpu = parse_batch_size(batch_size)
            self.default_max_new_tokens = int(max_new_tokens)
            self.ll_score = ll_score
            self._warned_mutual_info = False

        @classmethod
        def create_from_arg_string(
            cls, arg_string: str, additional_config: dict[str, Any] | None = None
        ) -> Unillava:
            """As lmms-eval's, but a key in both model_args and the CLI's flags is no error (model_args wins)."""
            return cls(**merge_model_args(lmms_utils.simple_parse_args_string(arg_string), additional_config))

        @property
        def batch_size(self) -> int:
            """Requests generated together (lmms-eval's name for it)."""
            return self.batch_size_per_gpu

        def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
            if doc_to_visual is None:
                return []
            return _images(doc_to_visual(self.task_dict[task][split][doc_id]))

        def generate_until(self, requests: Sequence[Any]) -> list[str]:
            """Greedy answers (or sampled, if a task asks), batched among requests with the same settings."""
            results: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}
            prepared = []
            for i, request in enumerate(requests):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                settings = _settings(dict(gen_kwargs or {}), self.default_max_new_tokens)
                images = self._visuals(doc_to_visual, doc_id, task, split)
                text = context.replace(IMAGE_MARKER, "").strip()
                prepared.append(([user_message(text, len(images))], images, settings, context, gen_kwargs))
                groups.setdefault(repr(sorted(settings.items())), []).append(i)
            bar = tqdm(total=len(requests), disable=self.rank != 0, desc="unillava generate")
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size_per_gpu):
                    chunk = indices[start : start + self.batch_size_per_gpu]
                    settings = prepared[chunk[0]][2]
                    texts = self.lm.generate_conversations(
                        [prepared[i][0] for i in chunk],
                        [prepared[i][1] for i in chunk],
                        batch_size=len(chunk),
                        progress=bar,
                        **settings,
                    )
                    for i, text in zip(chunk, texts, strict=True):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", (prepared[i][3], prepared[i][4]), text)
            bar.close()
            return [r if r is not None else "" for r in results]

        def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
            """(score, is_greedy) per request: the continuation's -log P (or log P, by `ll_score`) given images +
            context under the chat template, and whether greedy decoding gives exactly the continuation.

            Takes lmms-eval's six-argument requests and its two-argument `(context, continuation)` ones, which
            carry no images (the unconditional half of multiple_choice's acc_mutual_info)."""
            out = []
            for request in tqdm(requests, disable=self.rank != 0, desc="unillava loglikelihood"):
                args = request.args
                if len(args) == 2:
                    context, continuation = args
                    images: list[Any] = []
                    self._warn_mutual_info()
                elif len(args) == 6:
                    context, doc_to_target, doc_to_visual, doc_id, task, split = args
                    continuation = (
                        doc_to_target
                        if isinstance(doc_to_target, str)
                        else doc_to_target(self.task_dict[task][split][doc_id])
                    )
                    images = self._visuals(doc_to_visual, doc_id, task, split)
                else:
                    raise ValueError(
                        f"unillava: a loglikelihood request has 2 or 6 arguments, got {len(args)}"
                    )
                logprob, greedy = self._score(
                    str(context).replace(IMAGE_MARKER, "").strip(), str(continuation), images
                )
                result = (-logprob if self.ll_score == "nll" else logprob, greedy)
                self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
                out.append(result)
            return out

        def _warn_mutual_info(self) -> None:
            if self.ll_score == "nll" and not self._warned_mutual_info:
                self._warned_mutual_info = True
                log.warning(
                    "unillava: acc_mutual_info ranks by log-probability; run with ll_score=logprob "
                    "(acc/acc_norm then rank backwards in lmms-eval, which takes their argmin)"
                )

        @torch.inference_mode()
        def _score(self, context: str, continuation: str, images: list[Any]) -> tuple[float, bool]:
            """log P(continuation | images + context) after the assistant header, and whether it is greedy."""
            model, processor = self.lm.model, self.lm.processor
            pixels = processor.preprocess_images(images)
            prompt = processor.encode(
                [user_message(context, len(images))], pixels, add_generation_prompt=True
            ).input_ids
            target = processor.tokenizer(continuation, add_special_tokens=False).input_ids
            if not target:
                return 0.0, True
            ids = torch.tensor([prompt + target], device=model.device)
            enabled = model.dtype == torch.bfloat16
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=enabled):
                logits = model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    images=[p.to(model.device) for p in pixels],
                ).logits
            scores = torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), dim=-1)
            wanted = torch.tensor(target, device=scores.device)
            logprob = scores.gather(1, wanted[:, None]).sum().item()
            return float(logprob), bool((scores.argmax(dim=-1) == wanted).all().item())

        def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
            raise NotImplementedError("unillava's lmms-eval plugin does not implement multi-round generation")

    Unillava.__module__ = __name__
    Unillava.__qualname__ = "Unillava"
    return Unillava
