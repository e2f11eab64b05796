"""Evaluate a model on question/answer rows: batched engine rollouts -> rewards -> metrics.

:func:`evaluate` is the library entry point. It takes a live model and tokenizer (no disk IO),
so the RL trainer and the demo evaluate the policy in-process; ``dirl eval`` is a thin wrapper
that loads a checkpoint and the data, calls it, and writes ``samples.jsonl`` + ``summary.json``.

Each question is rendered with its prompt template (and the tokenizer's chat template), decoded
``k`` times by the rollout engine (token ids in, token ids out; text only for the reward), and
every completion is scored by ``dirl.rewards.compute_rewards`` with the row's columns (``answer``,
``numbers``/``target``, ``puzzle``/``solution`` ...). See :mod:`dirl.eval.metrics` for the
correctness rule and the summary's definitions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from dirl.data import DataError, get_task, load_prompt_rows, to_prompt_messages
from dirl.data.datasets import TASK_PREFIX
from dirl.engine.engine import Engine, SamplingParams
from dirl.eval.metrics import is_correct, summarize
from dirl.rewards import compute_rewards, get_reward

__all__ = ["EvalConfig", "build_prompts", "evaluate", "load_eval_rows", "parse_reward_spec",
           "resolve_defaults", "sampling_params"]

DEFAULT_FILE_REWARD = "math"
DEFAULT_FILE_TEMPLATE = "dirl_math"


@dataclass
class EvalConfig:
    """What to evaluate and how to decode. Empty strings mean "derive a default" (see below)."""

    model: str = ""                # checkpoint directory (``dirl eval`` only; evaluate() gets a model)
    data: str = ""                 # .jsonl/.json/.parquet, saved dataset dir, or task:<name>[:<split>]
    split: str | None = None       # split of a saved DatasetDict / {split: rows} file
    data_seed: int = 0             # generator seed of task:<name> sources (fixed eval set)
    reward: str = ""               # "math" | "math,format" | "math:1.0,format:0.1"; "": task's / math
    prompt_template: str = ""      # PROMPT_TEMPLATES name or literal; "": task's / dirl_math
    chat: bool | None = None       # wrap in the chat template; None: when the tokenizer has one
    k: int = 1                     # samples per question (pass@k uses this k)
    limit: int | None = None       # first N rows only
    batch_size: int = 32           # questions per engine call (k rows each)
    out: str = ""                  # run directory; "": runs/eval-<timestamp>
    max_new_tokens: int = 512
    temperature: float = 0.0       # 0 = greedy; k > 1 needs > 0 (greedy samples are identical)
    top_k: int = 0
    top_p: float = 1.0
    unmasking: str = "dynamic"     # dynamic | static | sequential
    threshold: float = 0.9
    steps_per_block: int = 4
    seed: int = 0                  # question i decodes with seed + i, whatever the batching
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    dtype: str = "auto"            # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    use_cache: bool = True         # False: the no-cache reference decoder (slow; for checks)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.k > 1 and self.temperature == 0:
            raise ValueError(f"k={self.k} samples with temperature=0 are identical (greedy), so "
                             "pass@k would equal pass@1; set temperature > 0 (e.g. 1.0) or k=1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")


# ----------------------------------------------------------------------------- config helpers

def _task_name(data: str) -> str | None:
    """``task:<name>[:split]`` -> name, anything else -> None."""
    if not data.startswith(TASK_PREFIX):
        return None
    return data[len(TASK_PREFIX):].split(":", 1)[0]


def parse_reward_spec(spec: str) -> dict[str, float]:
    """``"math"`` / ``"math,format"`` / ``"math:1,format:0.1"`` -> ordered {name: weight}.

    The first name is the *primary* reward that decides correctness. Unknown names raise
    ``ValueError`` listing the registered ones.
    """
    weights: dict[str, float] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.partition(":")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward {item!r}: weight {weight!r} is not a number") from None
        get_reward(name.strip())
    if not weights:
        raise ValueError(f"reward spec {spec!r} names no reward")
    return weights


def resolve_defaults(cfg: EvalConfig) -> EvalConfig:
    """Fill ``reward`` and ``prompt_template`` from the task (task sources) or the math defaults.

    Also validates the reward names, so a typo fails before any decoding.
    """
    reward, template = cfg.reward, cfg.prompt_template
    task = _task_name(cfg.data)
    if task:
        try:
            spec = get_task(task)
        except ValueError as err:
            raise DataError(str(err)) from None
        reward, template = reward or spec.reward, template or spec.prompt_template
    resolved = replace(cfg, reward=reward or DEFAULT_FILE_REWARD,
                       prompt_template=template or DEFAULT_FILE_TEMPLATE)
    parse_reward_spec(resolved.reward)
    return resolved


def default_out_dir() -> str:
    return f"runs/eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def load_eval_rows(cfg: EvalConfig) -> list[dict]:
    """Rows with ``question`` and ``answer`` from ``cfg.data`` (``DataError`` on a bad source).

    A ``task:<name>`` source without a split means its *test* split (this is evaluation).
    """
    if not cfg.data:
        raise DataError("no data source: set data=... (a .jsonl file or task:<name>:test)")
    split = cfg.split
    if _task_name(cfg.data) and cfg.data.count(":") == 1 and split is None:
        split = "test"
    return load_prompt_rows(cfg.data, split=split, limit=cfg.limit, seed=cfg.data_seed)


def sampling_params(cfg: EvalConfig, stop_ids: Sequence[int]) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, unmasking=cfg.unmasking, threshold=cfg.threshold,
        steps_per_block=cfg.steps_per_block, stop_ids=list(stop_ids), n=cfg.k, seed=cfg.seed)


# ----------------------------------------------------------------------------- prompts

def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(getattr(tokenizer, "hf", None), "chat_template", None))


def build_prompts(tokenizer, rows: Sequence[Mapping[str, Any]], template: str,
                  chat: bool | None) -> list[list[int]]:
    """Prompt token ids per row: template -> messages -> chat template (or plain text)."""
    use_chat = _has_chat_template(tokenizer) if chat is None else chat
    if use_chat and not _has_chat_template(tokenizer):
        raise ValueError("chat=true but the tokenizer has no chat template; set chat=false")
    prompts = []
    for row in rows:
        messages = to_prompt_messages(row, template)
        if use_chat:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages)
        prompts.append(tokenizer.encode(text))
    return prompts


# ----------------------------------------------------------------------------- evaluation

def _reward_columns(rows: Sequence[Mapping[str, Any]], k: int) -> dict[str, list]:
    """Every row column repeated k times (aligned with the k samples per row); absent -> None.

    ``completions`` would clash with the reward functions' first argument, so it is dropped.
    """
    names = {name for row in rows for name in row} - {"completions"}
    return {name: [row.get(name) for row in rows for _ in range(k)] for name in sorted(names)}


def _score_batch(rows, texts: list[str], weights: dict[str, float], k: int, errors: dict[str, int]):
    """Totals and per-reward scores for one batch; accumulates error counts into ``errors``."""
    result = compute_rewards(weights, texts, _reward_columns(rows, k))
    for name in weights:
        errors[name] = errors.get(name, 0) + int(result.metrics[f"rewards/{name}/errors"])
    return result.total, result.per_reward


def _sample_records(rows, first_index: int, rollouts, texts, totals, per_reward,
                    primary: str) -> list[dict]:
    """One ``samples.jsonl`` record per rollout (rollouts come grouped by prompt, k each)."""
    records = []
    for j, (rollout, text) in enumerate(zip(rollouts, texts)):
        row = rows[rollout.prompt_index]
        scores = {name: values[j] for name, values in per_reward.items()}
        records.append({
            "id": row.get("id", first_index + rollout.prompt_index),
            "question_index": first_index + rollout.prompt_index,
            "sample": rollout.sample_index,
            "question": row["question"],
            "answer": row.get("answer"),
            "completion": text,
            "reward": totals[j],
            "rewards": scores,
            "correct": is_correct(scores[primary]),
            "num_tokens": rollout.num_tokens,
            "num_forwards": rollout.num_forwards,
            "finish_reason": rollout.finish_reason,
            "steps": rollout.steps[: rollout.num_tokens],  # denoising step of every token
        })
    return records


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="q", disable=not enabled, dynamic_ncols=True)


def evaluate(model, tokenizer, rows: Sequence[Mapping[str, Any]], cfg: EvalConfig,
             progress: bool = True, backend=None) -> tuple[dict[str, Any], list[dict]]:
    """Decode ``cfg.k`` samples per row, score them, and return ``(summary, samples)``.

    ``model`` is used in place (its current weights, eval mode for the call, mode restored
    after). ``backend`` may replace the in-process engine with any object that has
    ``generate(prompt_ids, SamplingParams, seeds)`` (e.g. an HTTP backend). Nothing is written
    to disk. Question i always decodes with seed ``cfg.seed + i``, so results do not depend on
    ``batch_size``.
    """
    cfg = resolve_defaults(cfg)
    weights = parse_reward_spec(cfg.reward)
    primary = next(iter(weights))
    prompts = build_prompts(tokenizer, rows, cfg.prompt_template, cfg.chat)
    params = sampling_params(cfg, tokenizer.stop_ids())
    generator = backend if backend is not None else Engine(model, use_cache=cfg.use_cache)
    was_training = bool(getattr(model, "training", False))
    if model is not None:
        model.eval()
    samples: list[dict] = []
    errors: dict[str, int] = {name: 0 for name in weights}
    generate_seconds, started = 0.0, time.perf_counter()
    bar = _progress_bar(len(rows), progress)
    try:
        for start in range(0, len(rows), cfg.batch_size):
            batch_rows = list(rows[start:start + cfg.batch_size])
            seeds = [cfg.seed + start + i for i in range(len(batch_rows))]
            tick = time.perf_counter()
            rollouts = generator.generate(prompts[start:start + len(batch_rows)], params, seeds)
            generate_seconds += time.perf_counter() - tick
            texts = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
            totals, per_reward = _score_batch(batch_rows, texts, weights, cfg.k, errors)
            samples += _sample_records(batch_rows, start, rollouts, texts, totals, per_reward, primary)
            bar.update(len(batch_rows))
            bar.set_postfix(acc=f"{sum(s['correct'] for s in samples) / len(samples):.3f}")
    finally:
        bar.close()
        if model is not None and was_training:
            model.train()
    summary = summarize(samples, cfg.k, generate_seconds=generate_seconds, reward_errors=errors,
                        wall_seconds=time.perf_counter() - started)
    return summary, samples
