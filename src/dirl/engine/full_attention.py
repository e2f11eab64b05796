"""The exact decoder of full-attention diffusion LMs (LLaDA, Dream): token ids in, Rollout out.

There is no exact KV cache under bidirectional attention (every K/V depends on the whole current
state), so every step recomputes the whole sequence, as the reference samplers do. Rows of
different prompt and response lengths share a forward left-padded, with a key-padding mask that
stays bidirectional (:func:`dirl.model.layout.bidirectional.padded_frame`). The scheduler's loop
(:mod:`dirl.engine.scheduler`) drives :class:`FullSession`: a row leaves once its whole response is
committed and a waiting row joins the frame before the next forward (the frame re-pads). A row
decodes the same alone or in any batch, up to float rounding (padding changes the kernels'
summation order, which can flip a near-tie between confidences): its random draws come from its own
generator over its own response, never over the frame. The opt-in approximate cache keeps whole
chunks instead (:func:`generate_in_chunks`). The response (``max_new_tokens`` positions, all decoded: the trace states
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

import copy
import dataclasses
from collections.abc import Callable

import torch

from dirl.engine.full_attention_cache import WindowCache, window_slots
from dirl.engine.scheduler import RowRequest, least_served
from dirl.engine.unmask import sample_from_logprobs
from dirl.model.layout import readout_rows
from dirl.model.layout.bidirectional import left_padded, padded_frame
from dirl.model.policy import policy_logprobs
from dirl.model.forward import Readout
from dirl.rollout import FULL_ATTENTION_RULES, Rollout, SamplingParams

LINEAR_RULES = ("low_confidence", "random")
DREAM_RULES = ("maskgit_plus", "topk_margin", "entropy")
RULES = FULL_ATTENTION_RULES  # LINEAR_RULES + DREAM_RULES + origin, and dirl's dynamic


class _Rows:
    """Decoding state of the live rows in one left-padded frame: tensors (R, W) over the whole
    sequence (padding, prompt, response; every row ends at column W), or per row (R,) / (R, S).

    Row r's response is its last ``size[r]`` columns, cut into blocks of ``block_length[r]``;
    ``rows`` holds each row's handle (its index in the constructor's order by default). Rows of
    different lengths and response lengths share the frame; :meth:`extend` and :meth:`keep`
    re-pad it as rows join and leave, which shifts a row's columns but not its state."""

    WIDE = ("tokens", "masked", "step_ids", "logps", "entropies")  # (R, W)
    PER_ROW = ("pads", "size", "block_length", "forwards", "block", "step_in_block", "counts")
    FILL = {"tokens": None, "masked": False, "step_ids": 0, "logps": 0.0, "entropies": 0.0}

    def __init__(self, model, prompts, seeds, params, sizes=None, handles=None):
        arch = model.arch
        device = next(model.parameters()).device
        sizes = [params.max_new_tokens] * len(prompts) if sizes is None else list(sizes)
        self.pad_id = arch.pad_token_id
        self.rows = list(range(len(prompts))) if handles is None else list(handles)
        self.prompts = [list(p) for p in prompts]
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.tokens, _, _ = left_padded([p + [arch.mask_token_id] * g for p, g in zip(self.prompts, sizes)],
                                        arch.pad_token_id, device)  # (R, W)
        width = self.tokens.shape[1]
        make = {"dtype": torch.long, "device": device}
        self.size = torch.tensor(sizes, **make)  # (R,)
        self.pads = width - self.size - torch.tensor([len(p) for p in self.prompts], **make)
        self.block_length = torch.tensor([min(params.block_length or arch.block_size, g) for g in sizes], **make)
        self.masked = self.response_cols() >= 0  # (R, W)
        self.step_ids = torch.zeros_like(self.tokens)
        self.logps = torch.zeros(self.tokens.shape, device=device)
        self.entropies = torch.zeros(self.tokens.shape, device=device)
        self.forwards = torch.zeros(len(prompts), **make)
        self.block = torch.zeros(len(prompts), **make)
        self.step_in_block = torch.zeros_like(self.block)
        self.counts = _linear_counts(self.in_block() & self.masked, params.steps_per_block)  # (R, S)
        self.cache = None if params.cache == "none" else WindowCache(arch.num_layers)
        self.fresh = True  # the next step starts a block for some row (an approximate cache records)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def frame(self):
        """Positions (R, W) and meta (None when no row is padded) of the current frame."""
        return padded_frame(self.pads, self.width)

    def response_cols(self) -> torch.Tensor:
        """(R, W) each column's index in its row's response (negative: prompt or padding)."""
        cols = torch.arange(self.width, device=self.tokens.device)[None]
        return cols - (self.width - self.size)[:, None]

    def in_block(self) -> torch.Tensor:
        """(R, W) bool: the positions of each row's current block."""
        rel = self.response_cols()
        return (rel >= 0) & (rel.div(self.block_length[:, None], rounding_mode="floor") == self.block[:, None])

    def block_start(self) -> torch.Tensor:
        """(R,) the column of each row's current block's first position."""
        return self.width - self.size + self.block * self.block_length

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the rows flagged in ``keep`` (R,); without a cache, drop the columns now padding in all."""
        idx = keep.nonzero().squeeze(-1)
        for name in self.WIDE + self.PER_ROW:
            setattr(self, name, getattr(self, name).index_select(0, idx))
        if self.cache is not None:
            self.cache.select(idx)
        pick = idx.tolist()
        self.rows, self.prompts, self.gens = ([v[i] for i in pick] for v in (self.rows, self.prompts, self.gens))
        cut = int(self.pads.min()) if len(pick) and self.cache is None else 0
        if cut:
            for name in self.WIDE:
                setattr(self, name, getattr(self, name)[:, cut:])
            self.pads = self.pads - cut

    def split(self, chosen: torch.Tensor) -> tuple["_Rows", "_Rows"]:
        """(the rows flagged in ``chosen`` (R,), the others), each in its own narrowest frame (no cache)."""
        picked, rest = copy.copy(self), copy.copy(self)
        picked.keep(chosen)
        rest.keep(~chosen)
        return picked, rest

    def extend(self, other: "_Rows") -> None:
        """Append ``other``'s rows (no cache), both left-padded to the wider frame."""
        width = max(self.width, other.width)
        for rows in (self, other):
            grow = width - rows.width
            for name in self.WIDE:
                value = getattr(rows, name)
                fill = rows.pad_id if name == "tokens" else self.FILL[name]
                setattr(rows, name, torch.cat([torch.full((len(value), grow), fill, dtype=value.dtype,
                                                          device=value.device), value], 1))
            rows.pads = rows.pads + grow
        for name in self.WIDE + self.PER_ROW:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.rows, self.prompts, self.gens = self.rows + other.rows, self.prompts + other.prompts, \
            self.gens + other.gens


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
        for r, (k, size) in enumerate(zip(counts.tolist(), rows.size.tolist())):
            if k > 0:  # over the row's own response: the draw does not depend on the frame
                weights = torch.softmax(conf[r, -size:].double() / params.alg_temp, -1).cpu()
                commit[r, rows.width - size + torch.multinomial(weights, k, generator=rows.gens[r])] = True
        return commit & cand
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = most confident
    return (rank < counts[:, None]) & cand


def _candidate_logits(model, rows: _Rows, cand: torch.Tensor, mode: str) -> torch.Tensor:
    """(N, V) logits of the candidates (row-major): a full forward, or a window over the cache."""
    shift, ids, width = model.arch.logit_shift, rows.tokens, rows.width
    pos, meta = rows.frame()
    r_idx, col = cand.nonzero(as_tuple=True)  # (N,) the candidates' rows and columns
    if rows.cache is None or rows.fresh:
        cache = None if rows.cache is None else rows.cache.record()
        read = readout_rows(r_idx * width + col, shift)
        return model(ids, pos, meta, cache=cache, readout=Readout(read)).logits
    # an approximate cache decodes rows of one response length (one block length) together
    slots = window_slots(mode, rows.block_start(), int(rows.block_length.max()), width, shift)
    valid = torch.ones_like(ids, dtype=torch.bool) if meta is None else meta.doc >= 0
    read = readout_rows(r_idx * slots.shape[1] + col - slots[r_idx, 0], shift)
    return model(ids.gather(1, slots), pos.gather(1, slots), None, cache=rows.cache.window(slots, valid),
                 readout=Readout(read)).logits


def _draws(rows: _Rows) -> torch.Tensor:
    """(R, 2, W) each row's two uniforms per response position (zeros elsewhere), drawn from its
    generator over its own response length: the stream does not depend on the frame."""
    draws = torch.zeros(len(rows.gens), 2, rows.width)
    for r, (gen, size) in enumerate(zip(rows.gens, rows.size.tolist())):
        draws[r, :, rows.width - size:] = torch.rand(2, size, generator=gen)
    return draws.to(rows.tokens.device)


def _step(model, rows: _Rows, params: SamplingParams, rule: str) -> None:
    """One forward over every active row and one commit per row."""
    arch = model.arch
    cand = rows.masked & rows.in_block()  # (R, W)
    logits = _candidate_logits(model, rows, cand, params.cache)
    device = rows.tokens.device
    logp = policy_logprobs(logits, params.temperature, params.top_k, params.top_p, arch.mask_token_id)  # (N, V)
    draws = _draws(rows)  # (R, 2, W)
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
    """Row r's rollout: its response columns (the last ``size[r]``)."""
    cut = rows.width - int(rows.size[r])
    tokens = rows.tokens[r, cut:].tolist()
    stop = next((i for i, t in enumerate(tokens) if t in request.stop_ids), None)
    num, reason = (stop + 1, "stop") if stop is not None else (len(tokens), "length")
    return Rollout(list(rows.prompts[r]), tokens, rows.step_ids[r, cut:].tolist(), rows.logps[r, cut:].tolist(), num,
                   reason, int(rows.forwards[r]), request.prompt_index, request.sample_index,
                   rows.entropies[r, cut:].tolist())


class FullSession:
    """The live rows of one exact decode (``cache: none``), a :class:`~dirl.engine.scheduler.Session`:
    the scheduler's loop joins waiting rows into the frame before any forward and a row leaves once
    its whole response is committed, so rows of any prompt and response length share forwards.

    ``active_rows`` > 0 time-shares (the scheduler's ``shared`` policy): the session may hold more
    rows than that, and each forward runs the ``active_rows`` with the fewest forwards so far (frame
    order among equals; a row that ran moves to the back, so equals take turns). A paused row's
    state is its frame row; its draws come from its own generator, so pausing changes nothing."""

    def __init__(self, model, params: SamplingParams, active_rows: int = 0):
        self.model, self.params, self.active_rows = model, params, active_rows
        self.rows: _Rows | None = None

    @property
    def num_live(self) -> int:
        return 0 if self.rows is None else len(self.rows.rows)

    @property
    def max_slots(self) -> int:
        """The frame's width: every live row's forward covers that many tokens."""
        return 0 if self.rows is None else self.rows.width

    def drop(self, cancelled: Callable[[RowRequest], bool]) -> list[RowRequest]:
        if not self.num_live:
            return []
        alive = [not cancelled(q) for q in self.rows.rows]
        if all(alive):
            return []
        out = [q for q, ok in zip(self.rows.rows, alive) if not ok]
        self.rows.keep(torch.tensor(alive, device=self.rows.tokens.device))
        return out

    def join(self, reqs: list[RowRequest]) -> None:
        if not reqs:
            return
        sizes = [q.max_new_tokens or self.params.max_new_tokens for q in reqs]
        new = _Rows(self.model, [q.prompt for q in reqs], [q.seed for q in reqs], self.params, sizes, reqs)
        if self.num_live:
            self.rows.extend(new)
        else:
            self.rows = new

    def step(self) -> list[tuple[RowRequest, Rollout]]:
        if not self.active_rows or self.num_live <= self.active_rows:
            return self._step(self.rows)
        chosen = torch.zeros(self.num_live, dtype=torch.bool, device=self.rows.tokens.device)
        chosen[least_served(self.rows.forwards, self.active_rows)] = True
        active, paused = self.rows.split(chosen)
        out = self._step(active)
        paused.extend(active)
        self.rows = paused
        return out

    def _step(self, rows: _Rows) -> list[tuple[RowRequest, Rollout]]:
        """One forward for every row of ``rows``; the finished ones leave it and are returned."""
        _step(self.model, rows, self.params, self.params.unmasking)
        finished = ~rows.masked.any(-1)
        out = [(rows.rows[r], _rollout(rows, r, rows.rows[r])) for r in finished.nonzero().squeeze(-1).tolist()]
        if out:
            rows.keep(~finished)
        return out


def _decode_rows(model, requests: list[RowRequest], params: SamplingParams,
                 cancelled: Callable[[RowRequest], bool] | None = None) -> list[Rollout | None]:
    """Decode rows of one length (``params.max_new_tokens``) together to their end, with the
    approximate cache; a row whose request is cancelled (asked before every step) leaves and gets None."""
    rows = _Rows(model, [list(q.prompt) for q in requests], [q.seed for q in requests], params)
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
def generate_in_chunks(model, requests: list[RowRequest], params: SamplingParams,
                       is_cancelled: Callable[[int], bool] | None = None, max_batch_rows: int = 256) -> list[Rollout]:
    """The approximate cache's schedule (``cache: prefix | dual``): chunks of ``max_batch_rows // n``
    prompts, each decoded to its end. A recording forward is shared by the whole chunk (it runs when
    any row starts a block), so a row joining mid-chunk would change its neighbours' states: this cache
    does not batch continuously. ``is_cancelled(i)``: asked before every step (None rollouts)."""
    cancelled = None if is_cancelled is None else (lambda q: is_cancelled(q.prompt_index))
    per_chunk = max(1, max_batch_rows // params.n) * params.n
    out: list[Rollout | None] = []
    for start in range(0, len(requests), per_chunk):
        out += _decode_rows(model, requests[start: start + per_chunk], params, cancelled)
    return out  # type: ignore[return-value]


@torch.no_grad()
def decode_in_chunks(model, feed, params: SamplingParams, max_batch_rows: int = 256) -> None:
    """A :class:`~dirl.engine.scheduler.Feed`'s rows with the approximate cache (``dirl serve``):
    up to ``max_batch_rows`` taken at a time, rows of one ``max_new_tokens`` decoded together to their
    end; new rows join between batches (see :func:`generate_in_chunks`)."""
    while not feed.exhausted():
        taken = feed.take(max_batch_rows)
        for length in sorted({q.max_new_tokens or params.max_new_tokens for q in taken}):
            group = [q for q in taken if (q.max_new_tokens or params.max_new_tokens) == length]
            results = _decode_rows(model, group, dataclasses.replace(params, max_new_tokens=length), feed.cancelled)
            for request, rollout in zip(group, results):
                feed.done(request, rollout)
