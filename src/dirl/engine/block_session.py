"""The block-causal decoder's live rows: one ragged forward per step, rows joining and leaving.

Blocks are absolute (``position // B``). A prompt's full blocks are its clean
prefix; its tail shares the first generated block and is never masked. Each step
runs the current block of every live row against the KV cache
(:mod:`dirl.engine.kv_cache`, written in place): sample every masked position --
the LM head runs on those positions only --, confidence = probability of the
sampled token, commit by the unmasking rule.

The step is ragged. Every row has a *backlog*: clean tokens below its current
block whose K/V are not cached yet -- one block after the row filled its block
(its commit), the prompt's full blocks when the row has just joined (its
prefill). The backlog rides in front of the current block in the same forward
(padding writes to a scratch slot and is masked), so neither a commit nor a
joining row's prefill costs a forward of its own. Every row pays the widest
backlog in padding, so a forward writes at most ``Engine.prefill_chunk`` clean
tokens per row (two blocks by default) when the batch is full, and
proportionally more when fewer rows are live: the forward never holds more tokens
than a full batch's. A longer prompt is written over several forwards, and its row
starts denoising in the forward that writes its last clean token; until then its
block is not read, its generator draws nothing and its forward counter stays.

``use_cache=False`` is the no-cache reference decoder: every step recomputes the
whole sequence. Both draw the same random numbers per row, so they must produce
identical tokens and step ids (the correctness oracle), whichever rows share a
forward.
"""

from __future__ import annotations

import copy

import torch

from dirl.engine.kv_cache import KVCache
from dirl.engine.scheduler import RowRequest, least_served
from dirl.engine.unmask import sample_from_logprobs, select_commits, steps_into_block
from dirl.model.forward import Readout
from dirl.model.layout import readout_rows
from dirl.model.policy import policy_logprobs
from dirl.rollout import Rollout, SamplingParams


class _Rows:
    """Decoding state of rows: tensors (R, B) or (R,), and per-row lists."""

    TENSORS = ("prompt_len", "block_idx", "masked", "tokens", "step_ids", "logps", "entropies", "num_forwards")
    LISTS = ("reqs", "seqs", "gens", "cached", "rollouts")

    def __init__(self, reqs: list[RowRequest], block_size: int, mask_id: int, device):
        self.reqs = list(reqs)
        self.seqs = [list(r.prompt) for r in reqs]              # prompt + finished blocks
        self.gens = [torch.Generator().manual_seed(r.seed) for r in reqs]
        self.cached = [0] * len(reqs)                           # clean slots written (cached mode)
        self.rollouts = [Rollout(list(r.prompt), [], [], [], 0, "length", 0, r.prompt_index, r.sample_index)
                         for r in reqs]
        self.offsets = torch.arange(block_size, device=device)  # (B,)
        self.prompt_len = torch.tensor([len(r.prompt) for r in reqs], dtype=torch.long, device=device)
        self.block_idx = self.prompt_len // block_size
        self.masked = self.positions() >= self.prompt_len[:, None]
        tails = [r.prompt[(len(r.prompt) // block_size) * block_size:] for r in reqs]
        self.tokens = torch.tensor([t + [mask_id] * (block_size - len(t)) for t in tails], dtype=torch.long,
                                   device=device).view(len(reqs), block_size)
        self.step_ids = torch.zeros_like(self.tokens)
        self.logps = torch.zeros(self.tokens.shape, device=device)
        self.entropies = torch.zeros(self.tokens.shape, device=device)  # of the distribution logps are under
        self.num_forwards = torch.zeros(len(reqs), dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.reqs)

    def positions(self) -> torch.Tensor:
        """(R, B) positions of the current blocks."""
        return self.block_idx[:, None] * len(self.offsets) + self.offsets

    def keep(self, idx: list[int]) -> None:
        index = torch.tensor(idx, dtype=torch.long, device=self.offsets.device)
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name).index_select(0, index))
        for name in self.LISTS:
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in idx])

    def take(self, idx: list[int]) -> _Rows:
        """A copy of rows ``idx`` (a time-shared forward's rows; :meth:`put` writes them back)."""
        out = copy.copy(self)  # keep() rebinds the fields, so self's stay as they are
        out.keep(idx)
        return out

    def put(self, slots: list[int], new: _Rows) -> None:
        """Overwrite rows ``slots`` with ``new``'s rows (a joining row takes a finished row's place)."""
        index = torch.tensor(slots, dtype=torch.long, device=self.offsets.device)
        for name in self.TENSORS:
            getattr(self, name)[index] = getattr(new, name)
        for name in self.LISTS:
            values = getattr(self, name)
            for slot, value in zip(slots, getattr(new, name)):
                values[slot] = value

    def extend(self, new: _Rows) -> None:
        for name in self.TENSORS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(new, name)]))
        for name in self.LISTS:
            getattr(self, name).extend(getattr(new, name))

    def split(self, count: int) -> tuple[_Rows, _Rows]:
        """(the first ``count`` rows, the rest) -- copies, for :meth:`put` and :meth:`extend`."""
        head, tail = object.__new__(_Rows), object.__new__(_Rows)
        head.offsets = tail.offsets = self.offsets
        for name in self.TENSORS:
            value = getattr(self, name)
            setattr(head, name, value[:count]), setattr(tail, name, value[count:])
        for name in self.LISTS:
            value = getattr(self, name)
            setattr(head, name, value[:count]), setattr(tail, name, value[count:])
        return head, tail


class BlockSession:
    """The live rows of one decode (a :class:`~dirl.engine.scheduler.Session`) on ``engine``'s model.

    ``active_rows`` > 0 time-shares (the scheduler's ``shared`` policy): the session may hold more
    rows than that, each with its cache row, and each forward runs the ``active_rows`` rows with
    the fewest denoising forwards (lowest batch row among equals); their cache rows are written in
    place and gathered for reading. A paused row's state and cache row wait untouched, and its
    generator draws only when it denoises, so pausing changes nothing."""

    def __init__(self, engine, params: SamplingParams, active_rows: int = 0):
        self.engine, self.params, self.active_rows = engine, params, active_rows
        self.cache_rows: torch.Tensor | None = None  # the cache rows of a time-shared forward's rows
        self.size, self.mask_id, self.device = engine.block_size, engine.mask_id, engine.device
        self.rows = _Rows([], self.size, self.mask_id, self.device)
        self.dead: list[int] = []      # batch rows whose sequence finished or was cancelled (to reuse)
        self.cache: KVCache | None = None
        self.max_slots = 0

    @property
    def num_live(self) -> int:
        return len(self.rows) - len(self.dead)

    def drop(self, cancelled) -> list[RowRequest]:
        dead = set(self.dead)
        out = [r for r in range(len(self.rows)) if r not in dead and cancelled(self.rows.reqs[r])]
        self.dead += out
        return [self.rows.reqs[r] for r in out]

    def join(self, reqs: list[RowRequest]) -> None:
        """New rows take the finished rows' places (no copy of the cache), then are appended."""
        if not reqs:
            return
        self.max_slots = max([self.max_slots] + [r.slots for r in reqs])
        new = _Rows(reqs, self.size, self.mask_id, self.device)
        reuse, self.dead = self.dead[: len(reqs)], self.dead[len(reqs):]
        head, tail = new.split(len(reuse))
        if reuse:
            self.rows.put(reuse, head)
        if len(tail):
            self.rows.extend(tail)
        if self.engine.use_cache:
            if self.cache is None:
                self.cache = KVCache.for_model(self.engine.model, 0, self.max_slots)
                self.cache.for_compile = self.engine.compiled
            self.cache.max_slots = max(self.cache.max_slots, self.max_slots)
            self.cache.add_rows(len(tail))

    def step(self) -> list[tuple[RowRequest, Rollout]]:
        """One forward for every live row (time-shared: for the ``active_rows`` least served);
        the finished rows' batch rows become free."""
        shared = self.active_rows and self.num_live > self.active_rows
        # Rows nobody took are compacted away (batch and cache). A time-shared pool admits no one
        # after its start, so it compacts only once half its rows are dead: O(pool) copies in all.
        if self.dead and (not shared or 2 * len(self.dead) >= len(self.rows)):
            dead = set(self.dead)
            keep = [r for r in range(len(self.rows)) if r not in dead]
            self.rows.keep(keep)
            if self.cache is not None:
                self.cache.select(torch.tensor(keep, dtype=torch.long, device=self.device))
            self.dead = []
        if not shared:
            return self._step()
        served = self.rows.num_forwards.clone()
        served[self.dead] = torch.iinfo(served.dtype).max  # finished rows never run again
        pick = least_served(served, self.active_rows)
        everyone, chosen, dead_before = self.rows, pick.tolist(), self.dead
        self.rows, self.cache_rows, self.dead = everyone.take(chosen), pick, []
        try:
            out = self._step()
            everyone.put(chosen, self.rows)
        finally:
            self.rows, self.cache_rows = everyone, None
        self.dead = dead_before + [chosen[r] for r in self.dead]  # the finished rows, as batch rows of everyone
        return out

    def _step(self) -> list[tuple[RowRequest, Rollout]]:
        """One forward for every row of ``self.rows``; the finished ones' batch rows become free."""
        if self.cache is not None:
            ready, logits = self._forward_cached()
        else:
            ready, logits = None, self._forward_reference()
        self._denoise_step(logits, ready)
        return self._finish_blocks()

    # -- forwards ---------------------------------------------------------------------------------------

    def _limit(self, pos: torch.Tensor) -> torch.Tensor:
        """Slots a query at ``pos`` sees: up to the end of its block (clean prefix + own block).

        Padding queries get at least one block, so no SDPA row is empty (NaN); they are never read."""
        return ((pos.div(self.size, rounding_mode="floor") + 1) * self.size).clamp_min(self.size)

    def _masked_index(self, masked: torch.Tensor, width: int) -> torch.Tensor:
        """Logits rows (into R * width) of ``masked`` positions of the current blocks, the last B."""
        rows, cols = masked.nonzero(as_tuple=True)
        return readout_rows(rows * width + (width - self.size) + cols, self.engine.logit_shift)

    def _backlog(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bool]]:
        """The clean tokens this forward writes: ids, pos, valid (R, W), and which rows then denoise."""
        rows, size, engine = self.rows, self.size, self.engine
        # At a full batch a row writes up to prefill_chunk clean tokens; with fewer rows live, as many
        # more as keeps the forward at a full batch's token count (rounded down to blocks).
        chunk = (engine.prefill_chunk or 2 * size) * engine.max_batch_rows // len(rows)
        chunk = max(size, chunk // size * size)
        starts = (rows.block_idx * self.size).tolist()
        backlog = [start - cached for start, cached in zip(starts, rows.cached)]
        width = min(max(backlog), chunk)
        ids, pos, counts = [], [], []
        for r, (todo, done) in enumerate(zip(backlog, rows.cached)):
            count = min(todo, width)
            ids.append(rows.seqs[r][done: done + count] + [self.mask_id] * (width - count))
            pos.append(list(range(done, done + count)) + [0] * (width - count))
            counts.append(count)
            rows.cached[r] = done + count
        make = {"dtype": torch.long, "device": self.device}
        ids_t = torch.tensor(ids, **make).view(len(rows), width)
        pos_t = torch.tensor(pos, **make).view(len(rows), width)
        valid = torch.arange(width, device=self.device) < torch.tensor(counts, **make)[:, None]
        return ids_t, pos_t, valid, [todo <= width for todo in backlog]

    def _forward_cached(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One ragged forward: [backlog (padded to the widest), current block] -> (ready (R,) or None, logits)."""
        rows, engine = self.rows, self.engine
        clean_ids, clean_pos, clean_valid, ready_list = self._backlog()
        all_ready = all(ready_list)
        ready = None if all_ready else torch.tensor(ready_list, device=self.device)
        ids, pos, valid = rows.tokens, rows.positions(), None
        if clean_ids.shape[1]:
            block_valid = torch.ones_like(rows.masked) if all_ready else ready[:, None].expand(-1, self.size)
            ids, pos = torch.cat([clean_ids, ids], 1), torch.cat([clean_pos, pos], 1)
            valid = torch.cat([clean_valid, block_valid], 1)
        step = self.cache.step(pos, valid, self._limit(pos), always_mask=engine.compiled, rows=self.cache_rows)
        masked = rows.masked if all_ready else rows.masked & ready[:, None]
        logits_index = self._masked_index(masked, ids.shape[1])
        if engine.step_forward is None:
            out = engine.run_model(ids, pos, None, cache=step, readout=Readout(logits_index))
        else:
            out = engine.step_forward(ids, pos, step, logits_index)
        return ready, out.logits

    def _forward_reference(self) -> torch.Tensor:
        """Recompute everything: clean prefix of finished blocks + the current block."""
        rows, size = self.rows, self.size
        block_pos = rows.positions()
        prefix = [seq[: int(b) * size] for seq, b in zip(rows.seqs, rows.block_idx.tolist())]
        width = max(len(p) for p in prefix)
        ids = torch.tensor([p + [self.mask_id] * (width - len(p)) for p in prefix], device=self.device,
                           dtype=torch.long).view(len(prefix), width)
        pos = torch.arange(width, device=self.device).expand(len(prefix), width)
        valid = pos < torch.tensor([len(p) for p in prefix], device=self.device)[:, None]
        meta = self.engine.layout.decode_meta(pos, valid, block_pos, size)
        out = self.engine.run_model(torch.cat([ids, rows.tokens], 1), torch.cat([pos, block_pos], 1), meta,
                                    readout=Readout(self._masked_index(rows.masked, width + size)))
        return out.logits

    # -- sampling and bookkeeping ---------------------------------------------------------------------

    def _denoise_step(self, logits: torch.Tensor, ready: torch.Tensor | None) -> None:
        """Sample every masked position of the ready rows (logits: (N, V), row-major), commit."""
        rows, params, size = self.rows, self.params, self.size
        masked = rows.masked if ready is None else rows.masked & ready[:, None]  # (R, B)
        logp = policy_logprobs(logits, params.temperature, params.top_k, params.top_p, self.mask_id)  # (N, V)
        greedy = params.temperature == 0
        uniforms = None
        if not greedy:  # B uniforms per ready row and step whatever is masked: the draws depend on the row only
            flags = [True] * len(rows) if ready is None else ready.tolist()
            uniforms = torch.stack([torch.rand(size, generator=g) if ok else torch.zeros(size)
                                    for g, ok in zip(rows.gens, flags)]).to(self.device)[masked]  # (N,)
        sampled = sample_from_logprobs(logp, uniforms, greedy)  # (N,)
        token_logp = logp.gather(-1, sampled[:, None]).squeeze(-1)  # (N,)
        entropy = torch.special.entr(logp.exp()).sum(-1)  # (N,); entr(0) = 0 off the top-k / top-p support
        proposal = rows.tokens.masked_scatter(masked, sampled)  # (R, B)
        proposal_logp = rows.logps.masked_scatter(masked, token_logp)
        proposal_entropy = rows.entropies.masked_scatter(masked, entropy)
        confidence = torch.zeros_like(rows.logps).masked_scatter(masked, token_logp.exp())
        commit = select_commits(confidence, masked, params.unmasking, params.threshold, params.steps_per_block, size,
                                steps_into_block(rows.step_ids, rows.masked, rows.num_forwards))
        rows.tokens = torch.where(commit, proposal, rows.tokens)
        rows.logps = torch.where(commit, proposal_logp, rows.logps)
        rows.entropies = torch.where(commit, proposal_entropy, rows.entropies)
        rows.step_ids = torch.where(commit, rows.num_forwards[:, None], rows.step_ids)
        rows.masked &= ~commit
        rows.num_forwards += 1 if ready is None else ready.long()

    def _finish_blocks(self) -> list[tuple[RowRequest, Rollout]]:
        """Move full blocks to the rollouts; return the rows that finished (their batch rows become free)."""
        rows, size = self.rows, self.size
        done = ~rows.masked.any(-1)
        if not done.any():
            return []
        finished, advance = [], torch.zeros_like(done)
        for r in done.nonzero().squeeze(-1).tolist():
            block_start = int(rows.block_idx[r]) * size
            first_gen = max(0, int(rows.prompt_len[r]) - block_start)
            tokens = rows.tokens[r].tolist()[first_gen:]
            rollout, req = rows.rollouts[r], rows.reqs[r]
            max_new = req.max_new_tokens
            before = len(rollout.token_ids)
            rollout.token_ids += tokens
            rollout.steps += rows.step_ids[r, first_gen:].tolist()
            rollout.logps += rows.logps[r, first_gen:].tolist()
            rollout.entropies += rows.entropies[r, first_gen:].tolist()
            rollout.num_forwards = int(rows.num_forwards[r])
            rows.seqs[r] += tokens
            stop_at = next((i for i, t in enumerate(tokens) if t in req.stop_ids), None)
            if stop_at is not None and before + stop_at < max_new:
                rollout.num_tokens, rollout.finish_reason = before + stop_at + 1, "stop"
            elif len(rollout.token_ids) >= max_new:
                rollout.num_tokens, rollout.finish_reason = max_new, "length"
            else:
                rollout.num_tokens = len(rollout.token_ids)
                advance[r] = True
                continue
            finished.append(r)
        if advance.any():
            rows.block_idx = rows.block_idx + advance.long()
            rows.tokens = torch.where(advance[:, None], torch.full_like(rows.tokens, self.mask_id), rows.tokens)
            rows.masked = rows.masked | advance[:, None]
        self.dead += finished
        return [(rows.reqs[r], rows.rollouts[r]) for r in finished]
