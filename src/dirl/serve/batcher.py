"""One worker thread owns the engine; concurrent requests join its running decode loop.

Requests enter a FIFO queue with a :class:`concurrent.futures.Future`. The
worker starts an engine loop (:meth:`Engine.decode`, continuous batching) on the
first queued job, after a short collection window, and keeps feeding it: every
time rows finish, the loop pulls the queue, and the jobs with the loop's
sampling rule (the engine takes one rule per loop; seeds, ``n``, the
token cap and stop ids are per row) join at the next forward
instead of waiting for the loop to end. Because every row has its own seeded
generator, a request decodes the same tokens whatever it is batched with and
whenever it joins. A job resolves as soon as its last row finishes.

Weight updates travel through the same queue and act as barriers: the loop stops
taking jobs at the first update it meets, drains, and the copy happens between
two loops on this very thread -- so a request runs wholly on one weight version,
and the version it ran on is returned with it. A job with other sampling
parameters waits behind the loop the same way (FIFO order is kept).

A job whose client went away is cancelled (:meth:`GenerateJob.cancel`, any thread):
if it is still queued it never runs; if its rows are decoding, the engine drops them
before the next denoising step, and the jobs sharing the loop finish unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from dirl.engine.engine import Engine
from dirl.engine.scheduler import RowRequest
from dirl.rollout import Rollout, SamplingParams
from dirl.serve import ServeConfig
from dirl.serve.weights import WeightUpdateError, apply_update, restore

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
    results: list = dataclasses.field(default_factory=list)  # the rollouts, filled as its rows finish
    remaining: int = 0                                         # rows not finished yet
    # Run on the worker thread on the job's rollouts as it finishes, inside its loop, before any
    # weight update (so on the same weights): e.g. re-scoring them for log-probs. -> BatchResult.extra
    after: Callable[[list[Rollout]], Any] | None = None

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
    extra: Any = None  # what the job's ``after`` returned


def params_key(params: SamplingParams) -> tuple:
    """Jobs with equal keys can share one engine loop: the sampling rule. The seed, ``n``,
    ``max_new_tokens`` and the stop ids are per row in the engine."""
    fields = dataclasses.asdict(dataclasses.replace(params, seed=0, n=1, max_new_tokens=1, stop_ids=[]))
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items()))


class Batcher:
    """Owns an :class:`Engine` on ``model`` and serialises every use of it on one thread."""

    def __init__(self, model, live: dict[str, torch.Tensor], cfg: ServeConfig):
        self.engine = Engine(model, use_cache=cfg.use_cache, max_batch_rows=cfg.max_batch, **cfg.engine_options())
        self.live = live
        self.max_batch_rows = cfg.max_batch
        self.batch_wait_s = cfg.batch_wait_ms / 1000
        self.weight_version = 0
        self.running_jobs = 0  # jobs in the engine call under way (read by /health)
        self.stats = {"engine_calls": 0, "jobs": 0, "updates": 0, "cancelled_jobs": 0}
        self.probe_params: SamplingParams | None = None  # set by the server: checks every update
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.max_queue)
        self._held: deque = deque()  # items taken from the queue, not processed yet (FIFO)
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

    def submit_generate(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams,
                        after: Callable[[list[Rollout]], Any] | None = None) -> GenerateJob:
        """Queue a generation; ``job.future`` resolves to a :class:`BatchResult` (or raises
        :class:`RequestCancelled` after ``job.cancel()``). ``after(rollouts)``: see :class:`GenerateJob`."""
        job = GenerateJob(prompts, seeds, params, Future(), after=after)
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
        """Take items in FIFO order: an update applies between engine loops; a generation starts a
        loop that keeps taking the queued jobs with its sampling parameters while it runs."""
        while True:
            if not self._held:
                self._held.append(self._queue.get())
                self._collect()
            item = self._held.popleft()
            if item is _STOP:
                return
            if isinstance(item, UpdateJob):
                self._apply(item)
            elif item.future.set_running_or_notify_cancel() and not self._drop_if_cancelled(item):
                self._run_loop(item)

    def _collect(self) -> None:
        """Whatever arrives within the collection window joins the held items (a loop's first batch)."""
        deadline = time.monotonic() + self.batch_wait_s
        while self._held[-1] is not _STOP:
            try:
                self._held.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return

    def _run_loop(self, first: GenerateJob) -> None:
        """One engine loop: ``first`` and every later job with its sampling parameters, until the
        queue holds none (or an update, a job with other parameters, or the stop comes first)."""
        feed = _JobFeed(self, first)
        try:
            self.engine.decode(feed, first.params)
        except Exception as err:  # a failed loop fails its requests, never the worker
            for job in feed.open_jobs():
                job.future.set_exception(err)
        finally:
            self.running_jobs = 0
        self.stats["engine_calls"] += 1

    def _finish(self, job: GenerateJob) -> None:
        if self._drop_if_cancelled(job):  # its rollouts may be None (rows dropped mid-way)
            return
        self.stats["jobs"] += 1
        try:
            extra = job.after(job.results) if job.after is not None else None
        except Exception as err:  # fails this request only
            job.future.set_exception(err)
            return
        job.future.set_result(BatchResult(job.results, self.weight_version, extra))

    def _probe(self) -> str:
        """One greedy block from a one-token prompt on the live weights: '' when its log-probs and
        entropies are finite, else what went wrong."""
        if self.probe_params is None:
            return ""
        try:
            (rollout,) = self.engine.generate([[0]], self.probe_params, [0])
        except Exception as err:  # noqa: BLE001 -- any failure of the new weights is a failed probe
            return f"a probe forward on the new weights failed ({type(err).__name__}: {err})"
        values = [*rollout.logps, *rollout.entropies]
        if not all(math.isfinite(v) for v in values):
            return "a probe forward on the new weights gave non-finite log-probabilities"
        return ""

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
            previous = apply_update(self.live, job.tensors)
            problem = self._probe()
            if problem:  # the new weights decode to NaN/inf: put the old ones back
                restore(self.live, previous)
                raise WeightUpdateError(f"rolled back: {problem}")
            if any(t.is_cuda for t in job.tensors.values()):
                torch.cuda.synchronize()  # the version is reported only once the copy has landed
        except Exception as err:
            job.future.set_exception(err)
            return
        self.weight_version += 1
        self.stats["updates"] += 1
        job.future.set_result(self.weight_version)


class _JobFeed:
    """The rows of a running engine loop (a :class:`~dirl.engine.scheduler.Feed`).

    Every time the loop has free rows it pulls the queue: jobs with the loop's sampling
    parameters join (their rows wait in ``rows``) until the first item that cannot --
    an update (the barrier: the loop drains, then the update applies), a job with other
    parameters, the stop -- which stays at the head of the batcher's held items."""

    def __init__(self, batcher: Batcher, first: GenerateJob):
        self.batcher, self.key = batcher, params_key(first.params)
        self.rows: deque[RowRequest] = deque()
        self.jobs: dict[int, GenerateJob] = {}
        self._add(first)

    def _add(self, job: GenerateJob) -> None:
        job.results, job.remaining = [None] * job.rows, job.rows
        self.jobs[id(job)] = job
        self.batcher.running_jobs = len(self.jobs)
        for row in self.batcher.engine.rows(job.prompts, job.seeds, job.params):
            row.owner = (job, row.owner)
            self.rows.append(row)

    def _pull(self) -> None:
        held, batcher = self.batcher._held, self.batcher
        while True:
            try:
                held.append(batcher._queue.get_nowait())
            except queue.Empty:
                break
        while held and isinstance(held[0], GenerateJob) and params_key(held[0].params) == self.key:
            job = held.popleft()
            if job.future.set_running_or_notify_cancel() and not batcher._drop_if_cancelled(job):
                self._add(job)

    def open_jobs(self) -> list[GenerateJob]:
        return list(self.jobs.values())

    def take(self, count: int) -> list[RowRequest]:
        self._pull()
        out = []
        while self.rows and len(out) < count:
            row = self.rows.popleft()
            if self.cancelled(row):
                self.done(row, None)  # never started
            else:
                out.append(row)
        return out

    def put_back(self, rows: list[RowRequest]) -> None:
        self.rows.extendleft(reversed(rows))

    def cancelled(self, row: RowRequest) -> bool:
        return row.owner[0].cancelled.is_set()

    def done(self, row: RowRequest, rollout: Rollout | None) -> None:
        job, index = row.owner
        job.results[index] = rollout
        job.remaining -= 1
        if not job.remaining:
            del self.jobs[id(job)]
            self.batcher.running_jobs = len(self.jobs)
            self.batcher._finish(job)

    def exhausted(self) -> bool:
        self._pull()
        return not self.rows
