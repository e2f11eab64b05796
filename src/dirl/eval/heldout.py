"""Held-out evaluation: decode question rows with a backend, score them, summarise. The one eval path.

``dirl eval`` (:mod:`dirl.commands.eval`), the SFT and RL trainers' ``eval.every`` and the demo
all call :func:`evaluate_rows` -- "rollouts through any backend, then rewards" -- so every caller
reports the same numbers. ``eval`` sits between ``backends`` (it decodes through one) and ``train``
(the trainers import it).

Each row is rendered with its prompt template (and the tokenizer's chat template,
:func:`dirl.data.build_prompt_ids`), decoded ``k`` times (token ids in, token ids out; text only
for the reward), and every completion is scored by :func:`dirl.rewards.compute_rewards` with the
row's columns (``answer``, ``numbers``/``target``, ``puzzle``/``solution`` ...). See
:mod:`dirl.eval.metrics` for the correctness rule and the summary's definitions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dirl.data import build_prompt_ids
from dirl.eval.metrics import is_correct, summarize
from dirl.rewards import compute_rewards, parse_reward_spec
from dirl.rewards.registry import resolve_reward
from dirl.rollout import EngineOptions, SamplingSpec
from dirl.runtime import prompt_seeds

DEFAULT_REWARD = "math"
DEFAULT_TEMPLATE = "dirl_math"


def _greedy_eval_sampling() -> SamplingSpec:
    return SamplingSpec(max_new_tokens=512, temperature=0.0)


@dataclass
class EvalSpec(EngineOptions):  # + compile, batching, max_batch_tokens
    """How held-out rows are prompted, decoded and scored. Empty strings: the defaults (math)."""

    reward: str = ""               # "math" | "math,format" | "math:1.0,format:0.1"
    prompt_template: str = ""      # PROMPT_TEMPLATES name or literal format string
    chat: bool | None = None       # wrap in the chat template; None: when the tokenizer has one
    k: int = 1                     # samples per question (pass@k uses this k)
    batch_size: int = 32           # questions per engine call (k rows each)
    seed: int = 0                  # question i decodes with seed + i, whatever the batching
    use_cache: bool = True         # False: the no-cache reference decoder (slow; for checks)
    sampling: SamplingSpec = field(default_factory=_greedy_eval_sampling)  # 0 = greedy

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.k > 1 and self.sampling.temperature == 0:
            raise ValueError(f"k={self.k} samples with temperature=0 are identical (greedy), so "
                             "pass@k would equal pass@1; set sampling.temperature > 0 (e.g. 1.0) or k=1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def greedy(sampling: SamplingSpec) -> SamplingSpec:
    """The same length and unmasking rule, greedy: the argmax of the untempered, unfiltered
    distribution (its confidences drive dynamic unmasking). How the trainers measure accuracy."""
    return replace(sampling, temperature=0.0, top_k=0, top_p=1.0)


# ----------------------------------------------------------------------------- scoring

def _reward_columns(rows: Sequence[Mapping[str, Any]], k: int) -> dict[str, list]:
    """Every row column repeated k times (aligned with the k samples per row); absent -> None.

    ``completions`` would clash with the reward functions' first argument, so it is dropped.
    """
    names = {name for row in rows for name in row} - {"completions"}
    return {name: [row.get(name) for row in rows for _ in range(k)] for name in sorted(names)}


def _score_batch(rows, texts: list[str], weights: dict[str, float], k: int, errors: dict[str, int],
                 outcomes: dict[str, int]):
    """Totals and per-reward scores for one batch; accumulates error counts into ``errors`` and a
    reward's own counts (e.g. the code rewards' ``code/timeouts``) into ``outcomes``."""
    result = compute_rewards(weights, texts, _reward_columns(rows, k))
    result.raise_if_all_failed()  # a reward that fails on every completion is broken, not a score of 0
    for name in errors:
        errors[name] += int(result.metrics[f"rewards/{name}/errors"])
        for key, value in result.metrics.items():
            extra = key.removeprefix(f"rewards/{name}/")
            if key.startswith(f"rewards/{name}/") and extra not in ("mean", "std", "errors"):
                outcomes[f"{name}/{extra}"] = outcomes.get(f"{name}/{extra}", 0) + int(value)
    return result.total, result.per_reward


def _sample_records(rows, first_index: int, rollouts, texts, scores: tuple, primary: str) -> list[dict]:
    """One ``samples.jsonl`` record per rollout (rollouts come grouped by prompt, k each)."""
    totals, per_reward = scores
    records = []
    for j, (rollout, text) in enumerate(zip(rollouts, texts)):
        row = rows[rollout.prompt_index]
        row_scores = {name: values[j] for name, values in per_reward.items()}
        records.append({
            "id": row.get("id", first_index + rollout.prompt_index),
            "question_index": first_index + rollout.prompt_index,
            "sample": rollout.sample_index,
            "question": row["question"],
            "answer": row.get("answer"),
            "completion": text,
            "reward": totals[j],
            "rewards": row_scores,
            "correct": is_correct(row_scores[primary]),
            "num_tokens": rollout.num_tokens,
            "num_forwards": rollout.num_forwards,
            "finish_reason": rollout.finish_reason,
            "steps": rollout.steps[: rollout.num_tokens],  # denoising step of every token
        })
    return records


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="q", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------- the eval

def evaluate_rows(model, tokenizer, rows: Sequence[Mapping[str, Any]], spec: EvalSpec,
                  backend=None, progress: bool = False,
                  rewards: Mapping[Any, float] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Decode ``spec.k`` samples per row, score them, and return ``(summary, samples)``.

    ``model`` is used in place (its current weights, eval mode for the call, mode restored
    after). ``backend`` may replace the in-process engine with any object that has
    ``generate(prompt_ids, SamplingParams, seeds)`` (e.g. an HTTP backend). Nothing is written
    to disk. Question i always decodes with seed ``spec.seed + i``, so results do not depend on
    ``batch_size``. ``rewards``: ``{name or callable: weight}`` in place of ``spec.reward`` (the
    first one decides correctness).
    """
    weights = dict(rewards) if rewards else parse_reward_spec(spec.reward or DEFAULT_REWARD)
    names = [resolve_reward(key)[0] for key in weights]
    primary = names[0]
    prompts = build_prompt_ids(tokenizer, rows, spec.prompt_template or DEFAULT_TEMPLATE, spec.chat)
    params = spec.sampling.params(tokenizer.stop_ids(), n=spec.k, seed=spec.seed)
    if backend is None:
        from dirl.backends.native import NativeBackend

        backend = NativeBackend(model, use_cache=spec.use_cache, **spec.engine_options())
    was_training = bool(getattr(model, "training", False))
    if model is not None:
        model.eval()
    samples: list[dict] = []
    errors: dict[str, int] = {name: 0 for name in names}
    outcomes: dict[str, int] = {}
    generate_seconds, started = 0.0, time.perf_counter()
    bar = _progress_bar(len(rows), progress)
    try:
        for start in range(0, len(rows), spec.batch_size):
            batch_rows = list(rows[start:start + spec.batch_size])
            tick = time.perf_counter()
            rollouts = backend.generate(prompts[start:start + len(batch_rows)], params,
                                        prompt_seeds(spec.seed, len(batch_rows), start))
            generate_seconds += time.perf_counter() - tick
            texts = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
            scores = _score_batch(batch_rows, texts, weights, spec.k, errors, outcomes)
            samples += _sample_records(batch_rows, start, rollouts, texts, scores, primary)
            bar.update(len(batch_rows))
            bar.set_postfix(acc=f"{sum(s['correct'] for s in samples) / len(samples):.3f}")
    finally:
        bar.close()
        if model is not None and was_training:
            model.train()
    summary = summarize(samples, spec.k, generate_seconds=generate_seconds, reward_errors=errors,
                        wall_seconds=time.perf_counter() - started)
    if outcomes:
        summary["reward_outcomes"] = outcomes
    return summary, samples


def held_out_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The keys the trainers log for a held-out eval (SFT and RL log the same names)."""
    return {"eval/accuracy": summary["accuracy"], "eval/mean_reward": summary["mean_reward"]}


def evaluate(model, rows: Sequence[Mapping[str, Any]], reward: Any = DEFAULT_REWARD, *, tokenizer=None,
             prompt_template: str = "", sampling: SamplingSpec | None = None, k: int = 1,
             batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """``dirl.evaluate``: held-out accuracy of ``model`` on ``rows`` -- the trainers' eval path.

    ``model``: a dirl model object (with ``tokenizer=``), a checkpoint path or ``init:<preset>``;
    ``rows``: dicts with ``question`` (+ the columns the reward reads, e.g. ``answer``);
    ``reward``: a registered name, a callable with TRL's signature, a list of them or a
    ``{reward: weight}`` mapping (the first decides ``correct``). Greedy by default (``sampling``:
    any :class:`~dirl.rollout.SamplingSpec`). Returns the summary (``accuracy``, ``mean_reward``,
    ``pass@k`` ...) with the per-sample records under ``"samples"``.
    """
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        from dirl.model.loading import load_model_spec
        model, tokenizer = load_model_spec(str(model))
    if tokenizer is None:
        raise ValueError("a model object needs its tokenizer: dirl.evaluate(model, rows, tokenizer=...)")
    if isinstance(reward, str):
        weights = parse_reward_spec(reward)
    elif isinstance(reward, Mapping):
        weights = dict(reward)
    else:
        weights = dict.fromkeys(reward if isinstance(reward, (list, tuple)) else [reward], 1.0)
    spec = EvalSpec(prompt_template=prompt_template, k=k, batch_size=batch_size, seed=seed,
                    sampling=sampling or SamplingSpec(max_new_tokens=256, temperature=0.0))
    summary, samples = evaluate_rows(model, tokenizer, [dict(r) for r in rows], spec, rewards=weights)
    return {**summary, "samples": samples}
