"""Continuous batching at block granularity: which rows share the next forward.

A decode is a stream of rows (one prompt's sample each, :class:`RowRequest`)
fed to a *session* -- the decoder's state of its live rows -- up to
``max_rows`` at once. Before every forward the loop (:func:`run`) drops the rows
whose request was cancelled, then fills the free rows from the feed: a row that
finished in the last forward leaves its batch row (and its KV cache row) to the
next waiting row, so the batch stays full until the feed runs dry. The joining
row's prefill rides along in the forward that denoises the other rows (the
session decides how; the block-causal decoder writes the prompt's clean blocks in
front of its current block).

The loop knows nothing about attention: any decoder whose session offers
:class:`Session`'s four members reuses it (the block-causal decoder of
:mod:`dirl.engine.block_session`, the full-attention decoder of :mod:`dirl.engine.full_attention`).

``policy="chunked"`` is the schedule before continuous batching, kept as the
baseline of ``python -m benchmarks.engine``: rows join only when the batch is empty, whole
prompts at a time (``max_rows // n`` prompts), and the batch drains to its
slowest row.

``policy="shared"`` (time sharing) admits every waiting row that fits the KV budget and lets
the session run ``max_rows`` of them per forward, those with the fewest forwards first. FIFO
admission drains: once nothing waits, a long row admitted late runs nearly alone, and response
lengths are not known in advance. Under time sharing every row starts early and advances at
the same pace, so the batch stays full until fewer than ``max_rows`` rows remain, and those are
the longest (the least-attained-service rule of processor scheduling). The price is memory: a
paused row keeps its state -- a full-attention row its token ids, a block-causal row also its
KV cache row -- so ``max_tokens``, not ``max_rows``, bounds the cache.

A row's rollout depends only on its prompt, seed and the weights: each row owns
its random generator and its forward counter, so neither the rows beside it nor
the moment it joined change its tokens (tested at several ``max_rows``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dirl.rollout import Rollout

POLICIES = ("continuous", "shared", "chunked")
SHARED_POOL = 1 << 20  # rows a time-shared session may hold: in practice every waiting row


def least_served(forwards: torch.Tensor, count: int) -> torch.Tensor:
    """The ``shared`` policy's rule: the ``count`` rows with the fewest forwards (lowest row among
    equals), in row order. forwards: (R,) -> (count,) row indices."""
    return forwards.argsort(stable=True)[:count].sort().values


@dataclass
class RowRequest:
    """One row to decode: a prompt, its row seed, and where its rollout goes."""

    prompt: list[int]
    seed: int               # the row's own generator seed (``runtime.row_seed``)
    prompt_index: int       # reported in the rollout
    sample_index: int
    owner: Any = None       # the feed's handle (output slot, serving job)
    slots: int = 0          # KV slots the row may reach (prompt + max_new_tokens + 2 blocks)
    max_new_tokens: int = 0  # this row's own cap and stop tokens (a loop's requests may differ in them)
    stop_ids: frozenset = frozenset()


class Session(Protocol):
    """A decoder's live rows (see the module docstring)."""

    num_live: int           # rows still decoding (finished rows have left or are about to be reused)
    max_slots: int          # KV slots per row of the (rectangular) cache

    def drop(self, cancelled: Callable[[RowRequest], bool]) -> list[RowRequest]:
        """Remove the live rows whose request is cancelled; return them."""

    def join(self, rows: list[RowRequest]) -> None:
        """Add rows (into the batch rows of those that finished, then appended)."""

    def step(self) -> list[tuple[RowRequest, Rollout]]:
        """One forward for every live row; return the rows that finished, with their rollouts."""


class Feed(Protocol):
    """Where rows come from and their rollouts go."""

    def take(self, count: int) -> list[RowRequest]:
        """Up to ``count`` waiting rows, in order (never blocks)."""

    def put_back(self, rows: list[RowRequest]) -> None:
        """Rows taken but not admitted (the KV budget): they are the next ones taken."""

    def cancelled(self, row: RowRequest) -> bool: ...

    def done(self, row: RowRequest, rollout: Rollout | None) -> None:
        """A row's rollout (None: cancelled, no partial rollouts)."""

    def exhausted(self) -> bool:
        """No row is waiting now (a serving feed may get more later; the loop then ends)."""


class ListFeed:
    """The rows of one :meth:`Engine.generate` call; rollouts land in ``results`` at ``owner``."""

    def __init__(self, rows: list[RowRequest], is_cancelled: Callable[[int], bool] | None = None):
        self.queue = deque(rows)
        self.results: list[Rollout | None] = [None] * len(rows)
        self.is_cancelled = is_cancelled

    def cancelled(self, row: RowRequest) -> bool:
        return self.is_cancelled is not None and self.is_cancelled(row.prompt_index)

    def take(self, count: int) -> list[RowRequest]:
        out = []
        while self.queue and len(out) < count:
            row = self.queue.popleft()
            if not self.cancelled(row):  # a cancelled prompt's rows never start (not even a prefill)
                out.append(row)
        return out

    def put_back(self, rows: list[RowRequest]) -> None:
        self.queue.extendleft(reversed(rows))

    def done(self, row: RowRequest, rollout: Rollout | None) -> None:
        self.results[row.owner] = rollout

    def exhausted(self) -> bool:
        return not self.queue


def run(session: Session, feed: Feed, max_rows: int, max_tokens: int = 0, policy: str = "continuous",
        group: int = 1) -> None:
    """Decode until the feed is exhausted and every live row has finished.

    max_tokens: the KV budget -- live rows x slots per row (the cache is rectangular)
    stays within it (0: no budget; at least one row always runs). group: rows per
    prompt, the unit the ``chunked`` policy admits."""
    if policy not in POLICIES:
        raise ValueError(f"unknown batching policy {policy!r}; choose from {POLICIES}")
    while True:
        for row in session.drop(feed.cancelled):
            feed.done(row, None)
        free = max_rows - session.num_live
        if policy == "shared":  # every waiting row (the budget permitting); the session picks who runs
            free = SHARED_POOL - session.num_live
        elif policy == "chunked":
            free = 0 if session.num_live else max(1, max_rows // group) * group
        if free > 0:
            session.join(_admit(feed, feed.take(free), session, max_tokens))
        if not session.num_live:
            if feed.exhausted():
                return
            continue
        for row, rollout in session.step():
            feed.done(row, rollout)


def _admit(feed: Feed, rows: list[RowRequest], session: Session, max_tokens: int) -> list[RowRequest]:
    """The leading rows that fit the KV budget; the rest go back to the feed."""
    if not max_tokens:
        return rows
    live, slots = session.num_live, session.max_slots
    for i, row in enumerate(rows):
        slots = max(slots, row.slots)
        if live and (live + 1) * slots > max_tokens:
            feed.put_back(rows[i:])
            return rows[:i]
        live += 1
    return rows
