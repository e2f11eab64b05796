"""The exact decoder of full-attention diffusion LMs (LLaDA, Dream): token ids in, Rollout out.

There is no exact KV cache under bidirectional attention (every K/V depends on the whole current
state), so every step recomputes the whole sequence, as the reference samplers do. Rows of
different prompt lengths share a forward left-padded, with a key-padding mask that stays
bidirectional (:func:`dirl.model.layout.bidirectional.decode_inputs`): a row decodes the same
alone or in any batch, up to float rounding (padding changes the kernels' summation order, which
can flip a near-tie between confidences). The response (``max_new_tokens`` positions, all decoded: the trace states
span the whole sequence) is cut into semi-AR blocks of ``block_length``; each step samples every
masked position of the row's current block from the policy distribution (temperature, top-k,
top-p; the log-prob and entropy recorded are under exactly it) and commits some by the rule:

* ``low_confidence`` / ``random`` -- LLaDA's ``generate`` (Nie et al. 2025): ``steps_per_block``
  steps per block, a linear count (n // S, the first n % S steps one more), the positions with
  the highest untempered probability of their sampled token (or uniform draws for ``random``).
* ``maskgit_plus`` / ``topk_margin`` / ``entropy`` -- Dream's ``diffusion_generate`` (Ye et al.
  2025): schedule t = linspace(1, eps, S + 1), k = int(n (1 - s/t)) (all at the last step), the
  top-k by the tempered, truncated probability of the sampled token / its top-1 - top-2 margin /
  its negative entropy; ``alg_temp`` > 0 draws the k positions from softmax(confidence / alg_temp).
* ``origin`` -- Dream's: each masked position is revealed with probability 1 - s/t.
* ``dynamic`` -- dirl's threshold rule: every position whose sampled token has policy probability
  >= ``threshold``, and at least the most confident one.

With ``block_length`` = ``max_new_tokens`` Dream's rules run without blocks, as the reference.
Departures (each keeps a row independent of its batch): n is the row's own masked count (Dream's
reference averages it over the batch); random draws come from each row's generator; ``[MASK]``
is never sampled (the policy excludes it), while confidences use the reference's distribution
over the whole vocabulary; with top-k and top-p both set, top-k truncates first (Dream: top-p).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from dirl.engine.full_attention_cache import WindowCache, window_slots
from dirl.engine.scheduler import RowRequest
from dirl.engine.unmask import sample_from_logprobs
from dirl.model.layout import readout_rows
from dirl.model.layout.bidirectional import decode_inputs
from dirl.model.policy import policy_logprobs
from dirl.model.forward import Readout
from dirl.rollout import FULL_ATTENTION_RULES, Rollout, SamplingParams, check_for_model
from dirl.runtime import prompt_seeds, row_seed

LINEAR_RULES = ("low_confidence", "random")
DREAM_RULES = ("maskgit_plus", "topk_margin", "entropy")
RULES = FULL_ATTENTION_RULES  # LINEAR_RULES + DREAM_RULES + origin, and dirl's dynamic


class _Rows:
    """Decoding state of the active rows: tensors (R, G) over the response, or (R,)."""

    def __init__(self, model, prompts, seeds, params, block_length):
        arch = model.arch
        device = next(model.parameters()).device
        size = params.max_new_tokens
        self.rows, self.prompts = list(range(len(prompts))), prompts
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.ids, self.pos, self.meta = decode_inputs([p + [arch.mask_token_id] * size for p in prompts],
                                                      arch.pad_token_id, device)
        self.tokens = self.ids[:, -size:].clone()  # (R, G)
        self.masked = torch.ones_like(self.tokens, dtype=torch.bool)
        self.step_ids = torch.zeros_like(self.tokens)
        self.logps = torch.zeros(self.tokens.shape, device=device)
        self.entropies = torch.zeros(self.tokens.shape, device=device)
        self.forwards = torch.zeros(len(prompts), dtype=torch.long, device=device)
        self.block = torch.zeros(len(prompts), dtype=torch.long, device=device)
        self.step_in_block = torch.zeros_like(self.block)
        self.block_length = block_length
        self.counts = _linear_counts(self.in_block() & self.masked, params.steps_per_block)  # (R, S)
        self.cache = None if params.cache == "none" else WindowCache(arch.num_layers)
        self.fresh = True  # the next step starts a block for some row (an approximate cache records)

    def in_block(self) -> torch.Tensor:
        """(R, G) bool: the positions of each row's current block."""
        cols = torch.arange(self.tokens.shape[1], device=self.tokens.device)[None]
        return cols // self.block_length == self.block[:, None]

    def keep(self, keep: torch.Tensor) -> None:
        idx = keep.nonzero().squeeze(-1)
        for name in ("ids", "pos", "tokens", "masked", "step_ids", "logps", "entropies", "forwards", "block",
                     "step_in_block", "counts"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        if self.meta is not None:
            self.meta = type(self.meta)(*(f.index_select(0, idx) for f in self.meta.fields()))
        if self.cache is not None:
            self.cache.select(idx)
        pick = idx.tolist()
        self.rows, self.prompts, self.gens = ([v[i] for i in pick] for v in (self.rows, self.prompts, self.gens))


def _linear_counts(block_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's per-step commit counts: (R, G) masked flags of the block -> (R, steps)."""
    n = block_masked.sum(-1, keepdim=True)  # (R, 1)
    extra = torch.arange(steps, device=n.device)[None] < n % steps
    return n // steps + extra.long()


def _dream_fraction(step: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """(R,) step within the block -> 1 - s/t of Dream's schedule (1 at the last step), float32."""
    times = torch.linspace(1, eps, steps + 1)
    step = step.cpu().clamp_max(steps - 1)
    frac = 1 - times[step + 1] / times[step]
    return torch.where(step == steps - 1, torch.ones_like(frac), frac).to(step.device)


def _confidence(rule: str, logits, sampled, token_logp, params, uniforms) -> torch.Tensor:
    """(N,) the rule's confidence of each candidate (higher commits first)."""
    if rule == "dynamic":
        return token_logp.exp()
    if rule == "low_confidence":  # LLaDA: the untempered probability of the chosen token
        return torch.softmax(logits, -1).gather(-1, sampled[:, None]).squeeze(-1)
    if rule in ("random", "origin"):
        return uniforms
    probs = _reference_probs(logits, params)
    if rule == "maskgit_plus":
        return probs.gather(-1, sampled[:, None]).squeeze(-1)
    if rule == "topk_margin":
        top = probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    return (probs * torch.log(probs + 1e-10)).sum(-1)  # entropy: the negative entropy


def _reference_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """Dream's confidence distribution: softmax of the tempered, truncated logits, [MASK] included,
    computed as the reference computes it (a softmax, not exp of log-probs: near-ties order alike)."""
    support = policy_logprobs(logits, params.temperature, params.top_k, params.top_p) > float("-inf")
    scaled = logits.float() / params.temperature if params.temperature > 0 else logits.float()
    return torch.softmax(scaled.masked_fill(~support, float("-inf")), -1)


def _commit_counts(rule: str, rows: _Rows, cand: torch.Tensor, params) -> torch.Tensor:
    """(R,) how many candidates each row commits this step."""
    if rule in LINEAR_RULES:
        step = rows.step_in_block.clamp_max(rows.counts.shape[1] - 1)
        return rows.counts.gather(1, step[:, None]).squeeze(1)
    n = cand.sum(-1).float()  # (R,) float32, as the reference's mean count
    frac = _dream_fraction(rows.step_in_block, params.steps_per_block, params.eps)
    return (n * frac).long()  # int() of a non-negative float: truncation


def _select(rule: str, conf: torch.Tensor, cand: torch.Tensor, rows: _Rows, params) -> torch.Tensor:
    """(R, G) confidences (-inf off the candidates) -> (R, G) bool commits."""
    if rule == "dynamic":
        best = torch.zeros_like(cand).scatter(-1, conf.argmax(-1, keepdim=True), True) & cand.any(-1, keepdim=True)
        return ((conf >= params.threshold) & cand) | best
    if rule == "origin":
        frac = _dream_fraction(rows.step_in_block, params.steps_per_block, params.eps)
        return cand & (conf < frac[:, None])
    counts = _commit_counts(rule, rows, cand, params)
    if rule in DREAM_RULES and params.alg_temp > 0:
        commit = torch.zeros_like(cand)
        for r, k in enumerate(counts.tolist()):
            if k > 0:
                weights = torch.softmax(conf[r].double() / params.alg_temp, -1).cpu()
                commit[r, torch.multinomial(weights, k, generator=rows.gens[r])] = True
        return commit & cand
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = most confident
    return (rank < counts[:, None]) & cand


def _candidate_logits(model, rows: _Rows, cand: torch.Tensor, mode: str) -> torch.Tensor:
    """(N, V) logits of the candidates (row-major): a full forward, or a window over the cache."""
    shift, size = model.arch.logit_shift, rows.tokens.shape[1]
    ids = torch.cat([rows.ids[:, :-size], rows.tokens], dim=1)  # (R, W)
    width = ids.shape[1]
    r_idx, g_idx = cand.nonzero(as_tuple=True)
    col = (width - size) + g_idx  # (N,) the candidates' columns
    if rows.cache is None or rows.fresh:
        cache = None if rows.cache is None else rows.cache.record()
        read = readout_rows(r_idx * width + col, shift)
        return model(ids, rows.pos, rows.meta, cache=cache, readout=Readout(read)).logits
    slots = window_slots(mode, (width - size) + rows.block * rows.block_length, rows.block_length, width, shift)
    valid = torch.ones_like(ids, dtype=torch.bool) if rows.meta is None else rows.meta.doc >= 0
    read = readout_rows(r_idx * slots.shape[1] + col - slots[r_idx, 0], shift)
    return model(ids.gather(1, slots), rows.pos.gather(1, slots), None, cache=rows.cache.window(slots, valid),
                 readout=Readout(read)).logits


def _step(model, rows: _Rows, params: SamplingParams, rule: str) -> None:
    """One forward over every active row and one commit per row."""
    arch = model.arch
    size = rows.tokens.shape[1]
    cand = rows.masked & rows.in_block()  # (R, G)
    logits = _candidate_logits(model, rows, cand, params.cache)
    device = rows.tokens.device
    logp = policy_logprobs(logits, params.temperature, params.top_k, params.top_p, arch.mask_token_id)  # (N, V)
    draws = torch.stack([torch.rand(2, size, generator=g) for g in rows.gens]).to(device)  # (R, 2, G)
    greedy = params.temperature == 0
    sampled = sample_from_logprobs(logp, draws[:, 0][cand], greedy)  # (N,)
    token_logp = logp.gather(-1, sampled[:, None]).squeeze(-1)
    entropy = torch.special.entr(logp.exp()).sum(-1)
    conf = torch.full(cand.shape, float("-inf"), dtype=torch.float64, device=device)
    conf[cand] = _confidence(rule, logits, sampled, token_logp, params, draws[:, 1][cand]).double()
    commit = _select(rule, conf, cand, rows, params)
    for name, values in (("tokens", sampled), ("logps", token_logp), ("entropies", entropy)):
        proposal = getattr(rows, name).masked_scatter(cand, values.to(getattr(rows, name).dtype))
        setattr(rows, name, torch.where(commit, proposal, getattr(rows, name)))
    rows.step_ids = torch.where(commit, rows.forwards[:, None], rows.step_ids)
    rows.masked &= ~commit
    rows.forwards += 1
    rows.step_in_block += 1
    rows.fresh = False
    _advance_blocks(rows, params)


def _advance_blocks(rows: _Rows, params) -> None:
    """Rows whose block is complete move to their next block (and its linear schedule)."""
    done = ~(rows.masked & rows.in_block()).any(-1) & rows.masked.any(-1)
    if not done.any():
        return
    rows.fresh = True
    rows.block = rows.block + done.long()
    rows.step_in_block = torch.where(done, torch.zeros_like(rows.step_in_block), rows.step_in_block)
    fresh = _linear_counts(rows.masked & rows.in_block(), params.steps_per_block)
    rows.counts = torch.where(done[:, None], fresh, rows.counts)


def _rollout(rows: _Rows, r: int, request: RowRequest) -> Rollout:
    tokens = rows.tokens[r].tolist()
    stop = next((i for i, t in enumerate(tokens) if t in request.stop_ids), None)
    num, reason = (stop + 1, "stop") if stop is not None else (len(tokens), "length")
    return Rollout(list(rows.prompts[r]), tokens, rows.step_ids[r].tolist(), rows.logps[r].tolist(), num, reason,
                   int(rows.forwards[r]), request.prompt_index, request.sample_index, rows.entropies[r].tolist())


def _decode_rows(model, requests: list[RowRequest], params: SamplingParams,
                 cancelled: Callable[[RowRequest], bool] | None = None) -> list[Rollout | None]:
    """Decode rows of one length (``params.max_new_tokens``) together; a row whose request is
    cancelled (asked before every step) leaves the batch and gets None."""
    block_length = min(params.block_length or model.arch.block_size, params.max_new_tokens)
    rows = _Rows(model, [list(q.prompt) for q in requests], [q.seed for q in requests], params, block_length)
    results: list[Rollout | None] = [None] * len(requests)
    while rows.rows:
        if cancelled is not None:
            alive = torch.tensor([not cancelled(requests[row]) for row in rows.rows])
            if not alive.all():
                rows.keep(alive.to(rows.tokens.device))
                continue
        _step(model, rows, params, params.unmasking)
        finished = ~rows.masked.any(-1)
        for r in finished.nonzero().squeeze(-1).tolist():
            results[rows.rows[r]] = _rollout(rows, r, requests[rows.rows[r]])
        if finished.any():
            rows.keep(~finished)
    return results


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None,
             is_cancelled: Callable[[int], bool] | None = None, max_batch_rows: int = 256) -> list[Rollout]:
    """Decode ``params.n`` samples per prompt (grouped by prompt); ``seeds[i]`` seeds prompt i.
    ``is_cancelled(i)``: asked before every step; a cancelled prompt's rollouts are None."""
    check_for_model(params, model.arch)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    seeds = prompt_seeds(params.seed, len(prompts)) if seeds is None else list(seeds)
    stop = frozenset(params.stop_ids)
    requests = [RowRequest(list(p), row_seed(s, j), i, j, max_new_tokens=params.max_new_tokens, stop_ids=stop)
                for i, (p, s) in enumerate(zip(prompts, seeds)) for j in range(params.n)]
    cancelled = None if is_cancelled is None else (lambda q: is_cancelled(q.prompt_index))
    per_chunk = max(1, max_batch_rows // params.n) * params.n
    out: list[Rollout | None] = []
    for start in range(0, len(requests), per_chunk):
        out += _decode_rows(model, requests[start: start + per_chunk], params, cancelled)
    return out  # type: ignore[return-value]


@torch.no_grad()
def decode(model, feed, params: SamplingParams, max_batch_rows: int = 256) -> None:
    """Decode a :class:`~dirl.engine.scheduler.Feed`'s rows (``dirl serve``'s batcher) until it has
    none waiting: up to ``max_batch_rows`` at a time, rows of one ``max_new_tokens`` together (the
    response length is part of the sequence a full-attention row decodes). Rows join between
    batches, not at the next forward: this decoder does not use the block scheduler yet."""
    check_for_model(params, model.arch)
    while not feed.exhausted():
        taken = feed.take(max_batch_rows)
        for length in sorted({q.max_new_tokens or params.max_new_tokens for q in taken}):
            group = [q for q in taken if (q.max_new_tokens or params.max_new_tokens) == length]
            results = _decode_rows(model, group, dataclasses.replace(params, max_new_tokens=length), feed.cancelled)
            for request, rollout in zip(group, results):
                feed.done(request, rollout)
