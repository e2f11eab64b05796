"""OpenAI ``logprobs`` / ``echo`` for ``dirl serve``: what lm-evaluation-harness scores with.

* Generated tokens: each token's log-prob under the sampling distribution is the one the
  engine recorded when it committed the token (``Rollout.logps``). The top alternatives
  (``logprobs: k`` / ``top_logprobs: k``) come from the same state: the rollout's trace is
  re-scored by the packed trace scorer (:mod:`dirl.model.trace`, one copy per denoising step),
  which gives the full distribution each token was drawn from.
* Echoed prompt tokens (``echo: true``): a diffusion LM has no next-token distribution, but it
  has an exact, deterministic likelihood under **left-to-right unmasking, one token per step**:
  token j is scored in the state where blocks before its block are clean, the tokens of its
  block before j are unmasked and j and the rest of its block are masked. Those states are
  one trace whose step ids are the positions (:mod:`dirl.model.left_to_right`), so the packed
  trace scorer computes every prompt token's log-prob in one forward. The first token has no
  context and gets ``null`` (as in OpenAI's API). The distribution is the model's own
  (temperature 1, no top-k / top-p, ``[MASK]`` excluded).

What cannot be provided is refused (:func:`logprob_request`, a 400): streaming with
log-probs, ``logprobs`` above :data:`MAX_TOP_LOGPROBS`, chat ``top_logprobs`` without
``logprobs: true``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dirl.errors import FieldError
from dirl.model.left_to_right import MODEL_DIST, Scored, left_to_right_trace, score_traces
from dirl.model.trace import trace_copies
from dirl.rollout import PolicyDist

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class LogprobRequest:
    top: int | None  # alternatives per position; None: no log-probs at all (echo of the text only)
    echo: bool


def logprob_request(req, chat: bool) -> LogprobRequest | None:
    """The request's ``logprobs`` / ``echo`` (completions) or ``logprobs`` / ``top_logprobs``
    (chat), checked: a FieldError (-> 400) for what the server cannot provide; None if neither."""
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise FieldError("top_logprobs", "needs logprobs: true")
        top = req.top_logprobs or 0
        wanted, echo = bool(req.logprobs), False
    else:
        if isinstance(req.logprobs, bool):
            raise FieldError("logprobs", f"must be an integer (the number of alternatives), got {req.logprobs}")
        top, wanted, echo = req.logprobs, req.logprobs is not None, req.echo
    if not wanted and not echo:
        return None
    if wanted and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise FieldError("top_logprobs" if chat else "logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    if req.stream:
        raise FieldError("stream", "with logprobs or echo is not supported: ask without stream")
    return LogprobRequest(top if wanted else None, echo)


def score_rollouts(model, rollouts: list, lp: LogprobRequest, dist: PolicyDist) -> list[dict]:
    """Per rollout: ``{"prompt": Scored | None, "completion": Scored | None}`` -- the echoed
    prompt (left to right, shared by the samples of one prompt) and the generated tokens'
    alternatives (their trace). Runs on the batcher thread, right after the decode."""
    if lp.top is None:
        return [{"prompt": None, "completion": None} for _ in rollouts]
    mask_id, block_size = model.arch.mask_token_id, model.arch.block_size
    prompts: dict[tuple, Scored] = {}
    if lp.echo:
        unique = list(dict.fromkeys(tuple(r.prompt_ids) for r in rollouts))
        pairs = [left_to_right_trace(list(p), block_size, mask_id) for p in unique]
        scored = score_traces(model, [t for t, _ in pairs], [c for _, c in pairs], MODEL_DIST, lp.top)
        prompts = {p: Scored(s.logps[: len(p)], s.top[: len(p)]) for p, s in zip(unique, scored)}
    completions: list[Scored | None] = [None] * len(rollouts)
    if lp.top:
        copies = [trace_copies(len(r.prompt_ids), list(r.steps), block_size) for r in rollouts]
        completions = score_traces(model, rollouts, copies, dist, lp.top)
    return [{"prompt": prompts.get(tuple(r.prompt_ids)), "completion": c} for r, c in zip(rollouts, completions)]


def _piece(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.hf.decode([token_id], skip_special_tokens=False)


def _top_dict(tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for token_id, value in top:  # most likely first: a piece two ids share keeps the larger value
        out.setdefault(_piece(tokenizer, token_id), value)
    return out


def completion_logprobs(tokenizer, lp: LogprobRequest, prompt_ids, prompt_scored: Scored | None, ids,
                        recorded: list[float], gen_scored: Scored | None) -> dict:
    """OpenAI's completions ``logprobs`` object: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (None with ``logprobs: 0``) and ``text_offset``, over the echoed prompt (when asked) then
    the returned completion tokens ``ids`` (``recorded``: the engine's log-probs)."""
    tokens, logps, tops = [], [], []
    if lp.echo:
        tokens += list(prompt_ids)
        logps += prompt_scored.logps
        tops += [_top_dict(tokenizer, t) if i else None for i, t in enumerate(prompt_scored.top)]
    tokens += list(ids)
    logps += list(recorded[: len(ids)])
    tops += [_top_dict(tokenizer, gen_scored.top[i]) for i in range(len(ids))] if gen_scored else []
    pieces = [_piece(tokenizer, t) for t in tokens]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": logps, "top_logprobs": tops if lp.top else None,
            "text_offset": offsets}


def chat_logprobs(tokenizer, ids, recorded: list[float], gen_scored: Scored | None) -> dict:
    """OpenAI's chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def entry(token_id: int, value: float) -> dict:
        piece = _piece(tokenizer, token_id)
        return {"token": piece, "logprob": value, "bytes": list(piece.encode("utf-8"))}

    content = []
    for i, token_id in enumerate(ids):
        alternatives = gen_scored.top[i] if gen_scored else []
        content.append({**entry(token_id, recorded[i]), "top_logprobs": [entry(t, v) for t, v in alternatives]})
    return {"content": content}


def choice_logprobs(tokenizer, rollout, ids: list[int], text: str, lp: LogprobRequest, scored: dict | None,
                    chat: bool) -> dict:
    """The choice fields ``lp`` asks for: ``logprobs`` and, with ``echo``, ``text`` after the prompt's text."""
    prefix = tokenizer.decode(rollout.prompt_ids, skip_special_tokens=False) if lp.echo and tokenizer else ""
    if lp.top is None:
        return {"text": prefix + text}
    if chat:
        return {"logprobs": chat_logprobs(tokenizer, ids, rollout.logps, scored["completion"])}
    return {"text": prefix + text, "logprobs": completion_logprobs(tokenizer, lp, rollout.prompt_ids, scored["prompt"],
                                                                   ids, rollout.logps, scored["completion"])}


def kept_tokens(tokenizer, ids: list[int], text_length: int) -> list[int]:
    """The completion tokens behind the first ``text_length`` characters of their decoded text
    (a stop string cut the text there)."""
    kept, at = [], 0
    for token_id in ids:
        if at >= text_length:
            break
        kept.append(token_id)
        at += len(_piece(tokenizer, token_id))
    return kept
