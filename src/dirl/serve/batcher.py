"""One worker thread owns the engine; concurrent requests queue and run as batches.

Requests enter a FIFO queue with a :class:`concurrent.futures.Future`. The
worker takes everything queued (after a short collection window), groups the
generation jobs by their sampling parameters (the engine takes one
:class:`SamplingParams` per call; the seed is not part of the key because the
engine takes per-prompt seeds), and runs each group as one engine call. Because
every prompt carries its own seed into the engine, which seeds each row's
generator independently, a request decodes the same tokens whatever it is
batched with.

Weight updates travel through the same queue and act as barriers: jobs queued
before an update run on the old weights, jobs after it on the new ones, and the
copy happens between two engine calls on this very thread -- so a request runs
wholly on one weight version, and the version it ran on is returned with it.

A job whose client went away is cancelled (:meth:`GenerateJob.cancel`, any thread):
if it is still queued it never runs; if its engine call is under way, the engine
drops its rows before the next denoising step (``Engine.generate(is_cancelled=)``),
and the jobs sharing that call finish unchanged.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from dirl.engine.engine import Engine
from dirl.rollout import Rollout, SamplingParams
from dirl.serve import ServeConfig
from dirl.serve.weights import apply_update

_STOP = object()


class QueueFullError(RuntimeError):
    """The request queue is at capacity (the server answers 503)."""


class RequestCancelled(RuntimeError):
    """The job was cancelled (its client went away) before it finished."""


@dataclass
class GenerateJob:
    prompts: list[list[int]]
    seeds: list[int]
    params: SamplingParams
    future: Future
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.params.n

    def cancel(self) -> None:
        """Any thread: drop the job's rows; the engine stops them before its next step."""
        self.cancelled.set()


@dataclass
class UpdateJob:
    tensors: dict[str, torch.Tensor]
    future: Future


@dataclass
class BatchResult:
    """A job's rollouts (grouped by prompt, ``prompt_index`` local to the job) and the weights used."""

    rollouts: list[Rollout]
    weight_version: int


def params_key(params: SamplingParams) -> tuple:
    """Jobs with equal keys can share one engine call (everything but the seed)."""
    fields = dataclasses.asdict(dataclasses.replace(params, seed=0))
    fields["stop_ids"] = tuple(sorted(set(fields["stop_ids"])))
    return tuple(sorted(fields.items()))


class Batcher:
    """Owns an :class:`Engine` on ``model`` and serialises every use of it on one thread."""

    def __init__(self, model, live: dict[str, torch.Tensor], cfg: ServeConfig):
        self.engine = Engine(model, use_cache=cfg.use_cache, max_batch_rows=cfg.max_batch, compile=cfg.compile)
        self.live = live
        self.max_batch_rows = cfg.max_batch
        self.batch_wait_s = cfg.batch_wait_ms / 1000
        self.weight_version = 0
        self.running_jobs = 0  # jobs in the engine call under way (read by /health)
        self.stats = {"engine_calls": 0, "jobs": 0, "updates": 0, "cancelled_jobs": 0}
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.max_queue)
        self._thread = threading.Thread(target=self._run, name="dirl-batcher", daemon=True)

    # -- client side (any thread) ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_size(self) -> int:
        return self._queue.qsize()

    def submit_generate(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams) -> GenerateJob:
        """Queue a generation; ``job.future`` resolves to a :class:`BatchResult` (or raises
        :class:`RequestCancelled` after ``job.cancel()``)."""
        job = GenerateJob(prompts, seeds, params, Future())
        self._put(job)
        return job

    def submit_update(self, tensors: dict[str, torch.Tensor]) -> Future:
        """Queue a validated weight update; the future resolves to the new weight version."""
        return self._put(UpdateJob(tensors, Future()))

    def close(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _put(self, job):
        if not self._thread.is_alive():
            raise RuntimeError("the batcher thread is not running")
        try:
            self._queue.put_nowait(job)
        except queue.Full as err:
            raise QueueFullError(f"request queue is full ({self._queue.maxsize} jobs)") from err
        return job.future

    # -- worker side ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            items, stop = self._collect(first)
            self._process(items)
            if stop:
                return

    def _collect(self, first) -> tuple[list, bool]:
        """``first`` plus whatever arrives within the collection window (and is already queued)."""
        items, deadline = [first], time.monotonic() + self.batch_wait_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return items, False
            if item is _STOP:
                return items, True
            items.append(item)

    def _process(self, items: list) -> None:
        """Run generation jobs in groups; updates are barriers between them (FIFO order kept)."""
        segment: list[GenerateJob] = []
        for item in items:
            if isinstance(item, UpdateJob):
                self._run_generations(segment)
                segment = []
                self._apply(item)
            else:
                segment.append(item)
        self._run_generations(segment)

    def _run_generations(self, jobs: list[GenerateJob]) -> None:
        # Drop jobs whose caller went away before spending compute on them.
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel() and not self._drop_if_cancelled(job)]
        groups: dict[tuple, list[GenerateJob]] = {}
        for job in jobs:
            groups.setdefault(params_key(job.params), []).append(job)
        for group in groups.values():
            chunk, rows = [], 0
            for job in group:
                if chunk and rows + job.rows > self.max_batch_rows:
                    self._run_group(chunk)
                    chunk, rows = [], 0
                chunk.append(job)
                rows += job.rows
            self._run_group(chunk)

    def _run_group(self, jobs: list[GenerateJob]) -> None:
        """One engine call for jobs with equal sampling params; split the rollouts back out."""
        prompts = [p for job in jobs for p in job.prompts]
        seeds = [s for job in jobs for s in job.seeds]
        job_of_prompt = [job for job in jobs for _ in job.prompts]
        self.running_jobs = len(jobs)
        try:
            rollouts = self.engine.generate(prompts, jobs[0].params, seeds,
                                            is_cancelled=lambda i: job_of_prompt[i].cancelled.is_set())
        except Exception as err:  # a failed call fails its requests, never the worker
            for job in jobs:
                job.future.set_exception(err)
            return
        finally:
            self.running_jobs = 0
        self.stats["engine_calls"] += 1
        self.stats["jobs"] += len(jobs)
        offset, first_prompt = 0, 0
        for job in jobs:
            mine = rollouts[offset: offset + job.rows]
            offset += job.rows
            first_prompt += len(job.prompts)
            if self._drop_if_cancelled(job):  # its rollouts may be None (rows dropped mid-way)
                continue
            for rollout in mine:
                rollout.prompt_index -= first_prompt - len(job.prompts)
            job.future.set_result(BatchResult(mine, self.weight_version))

    def _drop_if_cancelled(self, job: GenerateJob) -> bool:
        if not job.cancelled.is_set():
            return False
        self.stats["cancelled_jobs"] += 1
        job.future.set_exception(RequestCancelled("the client went away"))
        return True

    def _apply(self, job: UpdateJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            apply_update(self.live, job.tensors)
            if any(t.is_cuda for t in job.tensors.values()):
                torch.cuda.synchronize()  # the version is reported only once the copy has landed
        except Exception as err:
            job.future.set_exception(err)
            return
        self.weight_version += 1
        self.stats["updates"] += 1
        job.future.set_result(self.weight_version)
