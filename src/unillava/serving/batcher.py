"""Dynamic batching: one worker thread runs queued requests through the model as left-padded batches.

Requests arrive already encoded (token ids and pixel tensors), so the worker only collates and generates.
A batch holds requests whose sampling settings match (all greedy requests batch together; sampled ones
need the same temperature and top_p; seeded and pixel-level requests run alone). Everything that may
differ per row is handled per row by `_RowTracker`, a stopping criterion that sees each step's tokens
before `generate` continues: end of turn, `max_tokens`, stop strings, a disconnected client. It also
streams each row's new text as it comes, so a streaming request inside a batch streams like one alone.

Back-pressure: at most `max_queue` requests wait; `submit` raises `QueueFullError` past that (HTTP 429).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from unillava.conversation import Encoded
from unillava.generation import (
    GenerationSettings,
    autocast,
    cut_at_stop,
    held_back,
    sampling_kwargs,
    seed_sampling,
    stop_index,
)
from unillava.inference import InferenceModel

log = logging.getLogger("unillava.serving")

GRACE_SECONDS = 0.005  # how long a new batch always waits for company


class QueueFullError(Exception):
    """The wait queue is at its limit; the client should retry later."""


class BatcherStoppedError(Exception):
    """The worker is not running (the server is shutting down)."""


@dataclass
class Event:
    """What the worker tells a request: a text `delta`, `done` (with totals) or an `error`."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    masks: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None


@dataclass
class PixelTask:
    """A request for a pixel-level model: it runs through `InferenceModel.answer_pixels`, unbatched, on
    the job's own encoded prompt (the images as sent place its prompts and masks)."""

    images: list[Image.Image]
    visual_prompts: list[dict[str, Any]]
    return_masks: bool
    mask_png: bool


@dataclass(eq=False)
class Job:
    """One admitted request. `sink` receives events from the worker thread and must be thread-safe."""

    encoded: Encoded
    pixels: list[torch.Tensor]
    max_new_tokens: int
    sink: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    pixel: PixelTask | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded.input_ids)

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys may share a batch: per-row differences are handled by the tracker."""
        if self.pixel is not None or self.seed is not None:
            return ("alone", id(self))
        if self.temperature == 0:
            return ("greedy",)
        return ("sample", self.temperature, self.top_p)


@dataclass(eq=False)
class _Row:
    job: Job
    ids: list[int] = field(default_factory=list)
    count: int = 0
    text: str = ""
    start: int = 0
    sent: int = 0
    started: bool = False
    done: bool = False


class _RowTracker(StoppingCriteria):
    """Per-row decoding state, run by `generate` after every step: decides which rows are finished."""

    def __init__(self, jobs: Sequence[Job], tokenizer: Any, stop_token_ids: Sequence[int], on_done: Callable):
        self.rows = [_Row(job) for job in jobs]
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.on_done = on_done

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            if not row.done:
                self._advance(row, int(token))
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def _advance(self, row: _Row, token: int) -> None:
        job = row.job
        if job.cancelled.is_set():
            self.finish(row, "cancelled", flush=False)
            return
        row.count += 1
        if token in self.stop_token_ids and not job.ignore_eos:
            self.finish(row, "stop", flush=True)
            return
        row.ids.append(token)
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        row.text = text
        cut = stop_index(text, job.stop)
        if cut >= 0:
            row.text = text[:cut]
            self.finish(row, "stop", flush=True)
        elif row.count >= job.max_new_tokens:
            self.finish(row, "length", flush=True)
        elif not text.endswith("\ufffd"):
            self._emit(row, len(text) - held_back(text, job.stop))

    def _emit(self, row: _Row, upto: int) -> None:
        """Send row.text[sent:upto]; leading whitespace of the answer is dropped, as in `InferenceModel`."""
        if not row.started:
            stripped = row.text[:upto].lstrip()
            if not stripped:
                return
            row.start = row.sent = upto - len(stripped)
            row.started = True
        if upto > row.sent:
            delta = row.text[row.sent : upto]
            row.sent = upto
            if row.job.stream:
                row.job.sink(Event("delta", delta))

    def finish(self, row: _Row, reason: str, *, flush: bool) -> None:
        if row.done:
            return
        if flush:
            self._emit(row, len(row.text))
        row.done = True
        answer = row.text[row.start : row.sent] if row.started else ""
        self.on_done(row.job, Event("done", answer.rstrip(), reason, row.count))


@dataclass
class BatcherStats:
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    submitted: int = 0
    completed: int = 0
    rejected: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Batcher:
    """The worker thread and its bounded queue; `submit` and `cancel` may be called from any thread."""

    def __init__(
        self,
        model: InferenceModel,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait: float = 0.25,
        threads: int | None = None,
        encode_mask: Callable[..., dict[str, Any]] | None = None,
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.threads = threads
        self.encode_mask = encode_mask
        self.stats = BatcherStats()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._admitting = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="unillava-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work, end running rows at their next step and fail whatever still waits."""
        with self._cond:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            for job in self._running:
                job.cancelled.set()
            self._cond.notify_all()
        for job in waiting:
            self._finish(job, Event("error", error=BatcherStoppedError("the server is shutting down")))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- admission ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Mark a request as being read and encoded, so a forming batch may wait for it (see `_next_batch`)."""
        with self._cond:
            self._admitting += 1
        try:
            yield
        finally:
            with self._cond:
                self._admitting -= 1
                self._cond.notify_all()

    def check_room(self) -> None:
        """Raise now if a job could not be queued, so a request is refused before its images are decoded."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:
        if self._stopping or self._thread is None:
            raise BatcherStoppedError("the server is not running")
        if len(self._queue) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")

    def submit(self, job: Job) -> None:
        with self._cond:
            self._check_room()
            self._queue.append(job)
            self.stats.submitted += 1
            self.stats.prompt_tokens += job.prompt_tokens
            self._cond.notify_all()

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Give up on a job (client gone, or `reason="timeout"`): it leaves the queue or stops at the next step."""
        with self._cond:
            if job.finished.is_set() or job.cancelled.is_set():
                return
            job.cancelled.set()
            if reason == "timeout":
                self.stats.timed_out += 1
            else:
                self.stats.cancelled += 1
            if job in self._queue:
                self._queue.remove(job)
                job.finished.set()

    def snapshot(self) -> dict[str, Any]:
        """Queue depth and counters, for /health."""
        with self._cond:
            s = self.stats
            return {
                "waiting": len(self._queue),
                "running": len(self._running),
                "max_queue": self.max_queue,
                "max_batch": self.max_batch,
                "batch_sizes": {str(k): v for k, v in sorted(s.batch_sizes.items())},
                "batches": sum(s.batch_sizes.values()),
                "requests": {
                    "submitted": s.submitted,
                    "completed": s.completed,
                    "rejected": s.rejected,
                    "cancelled": s.cancelled,
                    "timed_out": s.timed_out,
                    "failed": s.failed,
                },
                "tokens": {"prompt": s.prompt_tokens, "completion": s.completion_tokens},
            }

    # -- the worker --------------------------------------------------------------------------------

    def _finish(self, job: Job, event: Event) -> None:
        with self._cond:
            already = job.finished.is_set()
            job.finished.set()
            if not already and event.kind == "done" and event.finish_reason != "cancelled":
                self.stats.completed += 1
            if event.kind == "error" and not already:
                self.stats.failed += 1
            if event.kind == "done":
                self.stats.completion_tokens += event.completion_tokens
        job.sink(event)

    def _next_batch(self) -> list[Job] | None:
        """Block for the first job, then gather compatible ones.

        Clients that were answered together come back together, but their requests finish arriving and
        encoding a little apart; starting at once would run the first alone and make the rest wait for it.
        So the batch waits a short grace period, and beyond it only while requests are still being
        admitted, never longer than `batch_wait` in all.
        """
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            batch = [first]
            key = first.batch_key()
            start = time.monotonic()
            grace, deadline = start + min(self.batch_wait, GRACE_SECONDS), start + self.batch_wait
            while len(batch) < self.max_batch and key[0] != "alone":
                for job in [j for j in self._queue if j.batch_key() == key][: self.max_batch - len(batch)]:
                    self._queue.remove(job)
                    batch.append(job)
                now = time.monotonic()
                hold = grace if self._admitting == 0 else deadline
                if len(batch) >= self.max_batch or now >= hold or self._stopping:
                    break
                self._cond.wait(hold - now)
            self._running = batch
            self.stats.batch_sizes[len(batch)] += 1
            return batch

    def _work(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                if batch[0].pixel is not None:
                    self._run_pixel(batch[0])
                else:
                    self._run_batch(batch)
            except Exception as err:  # a failed batch fails its requests, never the worker
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    if not job.finished.is_set():
                        self._finish(job, Event("error", error=err))
            finally:
                with self._cond:
                    self._running = []

    def _run_batch(self, jobs: list[Job]) -> None:
        processor = self.model.processor
        model = self.model.model
        batch = processor.collate([j.encoded for j in jobs], [j.pixels for j in jobs], padding_side="left")
        batch = batch.to(model.device)
        tracker = _RowTracker(jobs, processor.tokenizer, processor.stop_token_ids, self._finish)
        first = jobs[0]
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(j.max_new_tokens for j in jobs),
            "eos_token_id": None,  # every row's end of turn is decided by the tracker
            "pad_token_id": processor.tokenizer.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([tracker]),
            **sampling_kwargs(first.temperature, first.top_p),
        }
        seed_sampling(first.seed)
        with torch.inference_mode(), autocast(model):
            self.model.generate_ids(batch.input_ids, batch.attention_mask, batch.images, **kwargs)
        for row in tracker.rows:
            tracker.finish(row, "cancelled" if row.job.cancelled.is_set() else "length", flush=True)

    def _run_pixel(self, job: Job) -> None:
        """A pixel-level request through the model's hook, on the prompt encoded at admission (never
        encoded again); its text arrives in one piece."""
        task = job.pixel
        assert task is not None
        settings = GenerationSettings(
            max_new_tokens=job.max_new_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            stop=list(job.stop),
            seed=job.seed,
        )
        text, masks = self.model.answer_pixels(
            job.encoded,
            job.pixels,
            task.images,
            task.visual_prompts,
            settings=settings,
            return_masks=task.return_masks,
        )
        text = cut_at_stop(text, job.stop).strip()
        encoded = []
        if task.return_masks and self.encode_mask is not None:
            for mask in masks:
                encoded.append(
                    self.encode_mask(
                        mask["mask"],
                        phrase=str(mask.get("phrase", "")),
                        image_index=int(mask.get("image_index", 0)),
                        score=mask.get("score"),
                        png=task.mask_png,
                    )
                )
        if job.stream and text:
            job.sink(Event("delta", text))
        tokens = len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
        self._finish(job, Event("done", text, "stop", tokens, masks=encoded))
