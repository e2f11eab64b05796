"""The rollout engine: token ids in, :class:`Rollout` out, by continuous batching at block granularity.

:meth:`Engine.generate` turns every prompt into ``n`` rows and streams them
through the scheduler (:mod:`dirl.engine.scheduler`): up to ``max_batch_rows``
rows decode at once, and when one finishes (its block holds a stop token, or it
reached ``max_new_tokens``) the next waiting row takes its place at the next
forward, its prefill riding along in that forward. The block-causal step itself
(the ragged forward, sampling, commits, the KV cache) is
:mod:`dirl.engine.block_session`; a full-attention model (LLaDA, Dream) runs the same
loop over :class:`~dirl.engine.full_attention.FullSession` (its approximate cache keeps
whole chunks). :meth:`Engine.decode` runs the same loop on a feed that may grow while it
runs (``dirl serve``'s batcher).

``max_batch_tokens`` bounds the KV cache: live rows x slots per row (prompt +
``max_new_tokens`` + two blocks) stays within it. ``batching="chunked"`` is the
schedule before continuous batching (whole chunks of ``max_batch_rows // n``
prompts, each decoded to its slowest row), the benchmark's baseline; ``batching="shared"``
time-shares the forwards among every waiting row that fits ``max_batch_tokens``
(:mod:`dirl.engine.scheduler`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dirl.engine import full_attention, scheduler
from dirl.engine.block_session import BlockSession
from dirl.engine.scheduler import Feed, ListFeed, RowRequest
from dirl.model.forward import Readout
from dirl.model.layout import get_layout
from dirl.rollout import Rollout, SamplingParams, check_for_model
from dirl.runtime import prompt_seeds, row_seed

__all__ = ["Engine"]


COMPILE_RECOMPILE_LIMIT = 16  # graphs a compiled step may build (4 expected: rows and masked positions 1 or more)


def compiled_forward(model) -> Callable:
    """The model's cached forward under ``torch.compile``: ``(ids, pos, step, logits_index) -> output``.

    Every size that changes between steps -- rows, tokens (4 or 8 with a commit riding
    along), cache slots, masked positions -- is marked dynamic before the call, and the
    step always carries its mask (:meth:`KVCache.step` ``always_mask``), so one graph serves
    them all; torch specialises sizes 0 and 1, so one row and one masked position get their
    own graphs. The recompile limit is raised to :data:`COMPILE_RECOMPILE_LIMIT`; past it
    torch falls back to eager, which is slower but still exact.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    forward = torch.compile(model.forward, dynamic=None)
    mark = torch._dynamo.maybe_mark_dynamic

    def run(ids, pos, step, logits_index):
        for tensor in (ids, pos):
            mark(tensor, 0), mark(tensor, 1)
        mark(logits_index, 0)
        step.mark_dynamic()
        return forward(ids, pos, None, cache=step, readout=Readout(logits_index), attn_impl="sdpa")

    return run


class Engine:
    """Batched blockwise decoder over a model's own parameters (no copies)."""

    def __init__(self, model, use_cache: bool = True, max_batch_rows: int = 256, attn_impl: str = "sdpa",
                 compile: bool = False, max_batch_tokens: int = 0, batching: str = "continuous",
                 prefill_chunk: int = 0):
        if batching not in scheduler.POLICIES:
            raise ValueError(f"unknown batching {batching!r}; choose from {scheduler.POLICIES}")
        self.model = model
        # ``compile``: the cached denoising step runs the model under torch.compile (the
        # reference decoder stays eager). On a small model a step is mostly per-op overhead,
        # which the compiled graph removes; see :func:`compiled_forward` for the shapes it covers.
        self.step_forward = compiled_forward(model) if compile and use_cache else None
        # Decoding shapes change every block (the cache grows), and FlexAttention compiles per
        # shape; the current block has only B queries, so SDPA's dense mask is tiny. Training
        # forwards keep the model's own attn_impl. The cached path is always SDPA (its mask is a
        # prefix per query over the cache slots).
        self.attn_impl = attn_impl
        self.use_cache = use_cache
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.batching = batching
        # Clean tokens (a joining row's prompt) a row writes per forward at a full batch, beside its
        # block: every row is padded to the widest, so wide forwards cost every row (0: two blocks).
        self.prefill_chunk = prefill_chunk
        arch = model.arch
        self.mask_id, self.logit_shift, self.layout = arch.mask_token_id, arch.logit_shift, get_layout(arch)

    @property
    def compiled(self) -> bool:
        return self.step_forward is not None

    @property
    def block_size(self) -> int:
        """Read at every call: a run may change the model's block size (``block_size_schedule``)."""
        return self.model.arch.block_size

    def run_model(self, *args, **kwargs):
        return self.model(*args, attn_impl=self.attn_impl, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def rows(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams,
             first_index: int = 0) -> list[RowRequest]:
        """Prompt i's ``params.n`` rows (seeded ``row_seed(seeds[i], j)``), grouped by prompt;
        ``owner`` is the row's index in that order."""
        slack, stop = params.max_new_tokens + 2 * self.block_size, frozenset(params.stop_ids)
        return [RowRequest(p, row_seed(s, j), first_index + i, j, owner=i * params.n + j, slots=len(p) + slack,
                           max_new_tokens=params.max_new_tokens, stop_ids=stop)
                for i, (p, s) in enumerate(zip(prompts, seeds)) for j in range(params.n)]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int] | None = None, is_cancelled: Callable[[int], bool] | None = None) -> list[Rollout]:
        """Decode ``params.n`` samples per prompt; rollouts come grouped by prompt.

        ``seeds[i]`` seeds prompt i's samples (default ``params.seed + i``); a
        request decodes the same whatever else shares its batch. ``is_cancelled(i)``
        is asked before every denoising step: once it is true, prompt i's rows leave
        the batch (no further forward for them) and their rollouts are ``None``.
        """
        check_for_model(params, self.model.arch)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        seeds = prompt_seeds(params.seed, len(prompts)) if seeds is None else list(seeds)
        rows = self.rows(prompts, seeds, params)
        if self._in_chunks(params):
            return full_attention.generate_in_chunks(self.model, rows, params, is_cancelled, self.max_batch_rows)
        feed = ListFeed(rows, is_cancelled)
        self.decode(feed, params)
        return feed.results  # type: ignore[return-value]

    @torch.no_grad()
    def decode(self, feed: Feed, params: SamplingParams) -> None:
        """Decode the feed's rows until it is exhausted: ``params``' sampling rule for all of them,
        each row's own ``max_new_tokens`` and stop ids (:meth:`rows`)."""
        check_for_model(params, self.model.arch)
        if self._in_chunks(params):
            return full_attention.decode_in_chunks(self.model, feed, params, self.max_batch_rows)
        scheduler.run(self.session(params), feed, self.max_batch_rows, self.max_batch_tokens, self.batching,
                      params.n)

    def _in_chunks(self, params: SamplingParams) -> bool:
        """Full attention with the approximate cache: it does not batch continuously (its recording
        forwards are shared by the batch), so it keeps whole chunks (:func:`full_attention.generate_in_chunks`)."""
        return self.model.arch.attention == "bidirectional" and params.cache != "none"

    def session(self, params: SamplingParams) -> scheduler.Session:
        """The decoder state the scheduler drives: the block-causal step, or the full-attention
        decoder's (:class:`~dirl.engine.full_attention.FullSession`); both reuse the loop, the
        feeds and the serving batcher unchanged."""
        active_rows = self.max_batch_rows if self.batching == "shared" else 0  # 0: every live row runs
        if self.model.arch.attention == "bidirectional":
            return full_attention.FullSession(self.model, params, active_rows)
        return BlockSession(self, params, active_rows)
