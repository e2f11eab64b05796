"""The rollout engine: batched blockwise decoding, token ids in, :class:`Rollout` out.

Blocks are absolute (``position // B``). A prompt's full blocks are prefilled
into the KV cache (block-causal); its tail shares the first generated block and
is never masked. Each denoising step runs the current block of every active row
against the cache (:mod:`dirl.engine.kv_cache`, written in place): sample every
masked position -- the LM head runs on those positions only --, confidence =
probability of the sampled token, commit by the unmasking rule.

The step is ragged: when some rows have just filled their block, their clean
block rides along in front of their next, all-masked block and its clean K/V
overwrites the block's slots (the fused commit), while the other rows keep
denoising their current block, padded to the same width (padding writes to a
scratch slot and is masked). So rows out of step never cost an extra forward,
and a batch takes as many forwards as its slowest row. Sequences stop after the
block that holds a stop token, or when ``max_new_tokens`` are generated;
finished rows leave the batch and the cache.

``use_cache=False`` is the no-cache reference decoder: every step recomputes the
whole sequence. Both share this loop and draw the same random numbers, so they
must produce identical tokens and step ids (the correctness oracle).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dirl.engine.kv_cache import KVCache
from dirl.engine.unmask import sample_from_logprobs, select_commits
from dirl.model.forward import Readout
from dirl.model.layout import get_layout, readout_rows
from dirl.model.policy import policy_logprobs
from dirl.rollout import Rollout, SamplingParams
from dirl.runtime import prompt_seeds, row_seed

__all__ = ["Engine"]


class _Batch:
    """Decoding state of the active rows (tensors are (R, B) or (R,))."""

    def __init__(self, prompts, seeds, block_size, mask_id, device):
        self.rows = list(range(len(prompts)))              # index into the output list
        self.prompts = prompts
        self.seqs = [list(p) for p in prompts]             # prompt + finished blocks (reference mode)
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.prompt_len = torch.tensor([len(p) for p in prompts], device=device)
        self.block_idx = self.prompt_len // block_size
        self.offsets = torch.arange(block_size, device=device)  # (B,)
        self.masked = self.positions() >= self.prompt_len[:, None]
        tail = [p[(len(p) // block_size) * block_size:] for p in prompts]
        self.tokens = torch.tensor([t + [mask_id] * (block_size - len(t)) for t in tail], device=device)
        self.step_ids = torch.zeros_like(self.tokens)
        self.logps = torch.zeros(self.tokens.shape, device=device)
        self.entropies = torch.zeros(self.tokens.shape, device=device)  # of the distribution logps are under
        self.pending = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # clean block not cached yet
        self.any_pending = False
        self.prev_tokens = torch.zeros_like(self.tokens)
        self.num_forwards = torch.zeros(len(prompts), dtype=torch.long, device=device)

    def positions(self) -> torch.Tensor:
        """(R, B) positions of the current blocks."""
        return self.block_idx[:, None] * len(self.offsets) + self.offsets

    def keep(self, keep: torch.Tensor) -> None:
        idx = keep.nonzero().squeeze(-1)
        for name in ("prompt_len", "block_idx", "masked", "tokens", "step_ids", "logps", "entropies", "pending",
                     "prev_tokens", "num_forwards"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        pick = idx.tolist()
        for name in ("rows", "prompts", "seqs", "gens"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in pick])


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
                 compile: bool = False):
        self.model = model
        # ``compile``: the cached denoising step runs the model under torch.compile (the prefill and
        # the reference decoder stay eager). On a small model a step is mostly per-op overhead,
        # which the compiled graph removes; see :func:`compiled_forward` for the shapes it covers.
        self._step_forward = compiled_forward(model) if compile and use_cache else None
        # Decoding shapes change every block (the cache grows), and FlexAttention compiles per
        # shape; the current block has only B queries, so SDPA's dense mask is tiny. Training
        # forwards keep the model's own attn_impl. The cached path is always SDPA (its mask is a
        # prefix per query over the cache slots).
        self.attn_impl = attn_impl
        self.use_cache = use_cache
        self.max_batch_rows = max_batch_rows
        arch = model.arch
        self.mask_id, self.logit_shift, self.layout = arch.mask_token_id, arch.logit_shift, get_layout(arch)

    @property
    def block_size(self) -> int:
        """Read at every call: a run may change the model's block size (``block_size_schedule``)."""
        return self.model.arch.block_size

    def _run(self, *args, **kwargs):
        return self.model(*args, attn_impl=self.attn_impl, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int] | None = None, is_cancelled: Callable[[int], bool] | None = None) -> list[Rollout]:
        """Decode ``params.n`` samples per prompt; rollouts come grouped by prompt.

        ``seeds[i]`` seeds prompt i's samples (default ``params.seed + i``); a
        request decodes the same whatever else shares its batch. ``is_cancelled(i)``
        is asked before every denoising step: once it is true, prompt i's rows leave
        the batch (no further forward for them) and their rollouts are ``None``.
        """
        params.validate(self.block_size)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        seeds = prompt_seeds(params.seed, len(prompts)) if seeds is None else list(seeds)
        per_chunk = max(1, self.max_batch_rows // params.n)
        out: list[Rollout] = []
        for start in range(0, len(prompts), per_chunk):
            chunk = range(start, min(start + per_chunk, len(prompts)))
            if is_cancelled is not None and all(is_cancelled(i) for i in chunk):
                out += [None] * (len(chunk) * params.n)  # not even a prefill
                continue
            out += self._generate_chunk([prompts[i] for i in chunk], [seeds[i] for i in chunk], params, start,
                                        is_cancelled)
        return out

    def _generate_chunk(self, prompts, seeds, params, first_index, is_cancelled=None) -> list[Rollout]:
        n = params.n
        expanded = [p for p in prompts for _ in range(n)]
        row_seeds = [row_seed(s, j) for s in seeds for j in range(n)]
        batch = _Batch(expanded, row_seeds, self.block_size, self.mask_id, self.device)
        cache = self._prefill(prompts, params) if self.use_cache else None
        if cache is not None:
            cache.repeat_interleave(n)
        results: list[Rollout | None] = [None] * len(expanded)
        while batch.rows:
            if is_cancelled is not None:
                alive = [not is_cancelled(first_index + row // n) for row in batch.rows]
                if not all(alive):
                    for row, ok in zip(batch.rows, alive):
                        results[row] = results[row] if ok else None  # no partial rollouts
                    self._keep_rows(batch, cache, torch.tensor(alive, device=self.device))
                    continue
            logits = self._forward(batch, cache)  # (N, V): the masked positions of the current blocks
            self._denoise_step(batch, logits, params)
            finished = self._finish_blocks(batch, params, results, first_index, n)
            if finished.any():
                self._keep_rows(batch, cache, ~finished)
        return results  # type: ignore[return-value]

    @staticmethod
    def _keep_rows(batch: _Batch, cache: KVCache | None, keep: torch.Tensor) -> None:
        if cache is not None:
            cache.select(keep.nonzero().squeeze(-1))
        batch.keep(keep)

    # -- forwards ---------------------------------------------------------------------------------------

    def _prefill(self, prompts, params) -> KVCache:
        """Write every prompt's full blocks into a fresh cache (block-causal, clean)."""
        size = self.block_size
        lengths = torch.tensor([(len(p) // size) * size for p in prompts], device=self.device)
        max_slots = max(len(p) for p in prompts) + params.max_new_tokens + 2 * size
        cache = KVCache.for_model(self.model, len(prompts), max_slots)
        cache.for_compile = self._step_forward is not None
        width = int(lengths.max())
        if width == 0:
            return cache
        ids = torch.tensor([p[:width] + [self.mask_id] * (width - len(p[:width])) for p in prompts],
                           device=self.device)
        pos = torch.arange(width, device=self.device).expand(len(prompts), width)
        step = cache.step(pos, pos < lengths[:, None], self._limit(pos))
        self._run(ids, pos, None, cache=step, readout=Readout(torch.empty(0, dtype=torch.long, device=self.device)))
        return cache

    def _limit(self, pos: torch.Tensor) -> torch.Tensor:
        """Slots a query at ``pos`` sees: up to the end of its block (clean prefix + own block).

        Padding queries get at least one block, so no SDPA row is empty (NaN); they are never read."""
        size = self.block_size
        return ((pos.div(size, rounding_mode="floor") + 1) * size).clamp_min(size)

    def _forward(self, batch: _Batch, cache: KVCache | None) -> torch.Tensor:
        return self._forward_cached(batch, cache) if cache is not None else self._forward_reference(batch)

    def _masked_index(self, batch: _Batch, width: int) -> torch.Tensor:
        """Logits rows (into R * width) of the masked positions of the current blocks, the last B."""
        rows, cols = batch.masked.nonzero(as_tuple=True)
        return readout_rows(rows * width + (width - self.block_size) + cols, self.logit_shift)

    def _forward_cached(self, batch: _Batch, cache: KVCache) -> torch.Tensor:
        """One ragged forward: [clean just-finished block (pending rows; padding elsewhere), current block]."""
        ids, pos, valid = batch.tokens, batch.positions(), None
        if batch.any_pending:
            size = self.block_size
            ids = torch.cat([batch.prev_tokens, ids], dim=1)  # (R, 2B)
            pos = torch.cat([pos - size, pos], dim=1)
            valid = torch.cat([batch.pending[:, None].expand(-1, size), torch.ones_like(batch.masked)], dim=1)
        step = cache.step(pos, valid, self._limit(pos), always_mask=self._step_forward is not None)
        logits_index = self._masked_index(batch, ids.shape[1])
        if self._step_forward is None:
            out = self._run(ids, pos, None, cache=step, readout=Readout(logits_index))
        else:
            out = self._step_forward(ids, pos, step, logits_index)
        batch.pending.zero_()
        batch.any_pending = False
        return out.logits

    def _forward_reference(self, batch: _Batch) -> torch.Tensor:
        """Recompute everything: clean prefix of finished blocks + the current block."""
        size = self.block_size
        block_pos = batch.positions()
        prefix = [seq[: int(b) * size] for seq, b in zip(batch.seqs, batch.block_idx)]
        width = max(len(p) for p in prefix)
        ids = torch.tensor([p + [self.mask_id] * (width - len(p)) for p in prefix], device=self.device,
                           dtype=torch.long).view(len(prefix), width)
        pos = torch.arange(width, device=self.device).expand(len(prefix), width)
        valid = pos < torch.tensor([len(p) for p in prefix], device=self.device)[:, None]
        meta = self.layout.decode_meta(pos, valid, block_pos, size)
        out = self._run(torch.cat([ids, batch.tokens], 1), torch.cat([pos, block_pos], 1), meta,
                        readout=Readout(self._masked_index(batch, width + size)))
        return out.logits

    # -- sampling and bookkeeping ---------------------------------------------------------------------

    def _denoise_step(self, batch: _Batch, logits: torch.Tensor, params: SamplingParams) -> None:
        """Sample every masked position (logits: (N, V) in row-major order of ``batch.masked``), commit."""
        num_rows, size = batch.masked.shape
        logp = policy_logprobs(logits, params.temperature, params.top_k, params.top_p, self.mask_id)  # (N, V)
        greedy = params.temperature == 0
        # B uniforms per row and step whatever is masked: the draws depend on the row only.
        uniforms = None if greedy else torch.stack([torch.rand(size, generator=g) for g in batch.gens]
                                                   ).to(self.device)[batch.masked]  # (N,)
        sampled = sample_from_logprobs(logp, uniforms, greedy)  # (N,)
        token_logp = logp.gather(-1, sampled[:, None]).squeeze(-1)  # (N,)
        entropy = torch.special.entr(logp.exp()).sum(-1)  # (N,); entr(0) = 0 off the top-k / top-p support
        proposal = batch.tokens.masked_scatter(batch.masked, sampled)  # (R, B)
        proposal_logp = batch.logps.masked_scatter(batch.masked, token_logp)
        proposal_entropy = batch.entropies.masked_scatter(batch.masked, entropy)
        confidence = torch.zeros_like(batch.logps).masked_scatter(batch.masked, token_logp.exp())
        commit = select_commits(confidence, batch.masked, params.unmasking, params.threshold,
                                params.steps_per_block, size)
        batch.tokens = torch.where(commit, proposal, batch.tokens)
        batch.logps = torch.where(commit, proposal_logp, batch.logps)
        batch.entropies = torch.where(commit, proposal_entropy, batch.entropies)
        batch.step_ids = torch.where(commit, batch.num_forwards[:, None], batch.step_ids)
        batch.masked &= ~commit
        batch.num_forwards += 1
    def _finish_blocks(self, batch: _Batch, params, results, first_index, n) -> torch.Tensor:
        """Move full blocks to the outputs; return which rows finished (R,) bool."""
        size = self.block_size
        done = ~batch.masked.any(-1)
        if not done.any():
            return torch.zeros_like(done)
        finished = torch.zeros_like(done)
        stop_ids = set(params.stop_ids)
        for r in done.nonzero().squeeze(-1).tolist():
            row = batch.rows[r]
            block_start = int(batch.block_idx[r]) * size
            first_gen = max(0, int(batch.prompt_len[r]) - block_start)
            tokens = batch.tokens[r].tolist()
            rollout = results[row]
            if rollout is None:
                rollout = results[row] = Rollout(list(batch.prompts[r]), [], [], [], 0, "length", 0,
                                                 first_index + row // n, row % n)
            before = len(rollout.token_ids)
            rollout.token_ids += tokens[first_gen:]
            rollout.steps += batch.step_ids[r, first_gen:].tolist()
            rollout.logps += batch.logps[r, first_gen:].tolist()
            rollout.entropies += batch.entropies[r, first_gen:].tolist()
            rollout.num_forwards = int(batch.num_forwards[r])
            batch.seqs[r] += tokens[first_gen:]
            stop_at = next((i for i, t in enumerate(tokens[first_gen:]) if t in stop_ids), None)
            if stop_at is not None and before + stop_at < params.max_new_tokens:
                rollout.num_tokens, rollout.finish_reason = before + stop_at + 1, "stop"
                finished[r] = True
            elif len(rollout.token_ids) >= params.max_new_tokens:
                rollout.num_tokens, rollout.finish_reason = params.max_new_tokens, "length"
                finished[r] = True
            else:
                rollout.num_tokens = len(rollout.token_ids)
        advance = done & ~finished
        if advance.any():
            batch.prev_tokens = torch.where(advance[:, None], batch.tokens, batch.prev_tokens)
            batch.pending |= advance
            batch.any_pending = True
            batch.block_idx = batch.block_idx + advance.long()
            batch.tokens = torch.where(advance[:, None], torch.full_like(batch.tokens, self.mask_id), batch.tokens)
            batch.masked = batch.masked | advance[:, None]
        return finished
