"""``dirl eval --model DIR --data FILE|task:<name>:test [--reward R] [--out D] [key=value ...]``.

Loads the checkpoint and the rows, runs the shared eval path
(:func:`dirl.eval.heldout.evaluate_rows`), writes
``samples.jsonl``, ``summary.json`` and the resolved ``config.yaml`` into the run directory, and
prints the summary as ONE line of JSON, the last line of stdout (progress goes to stderr), so
scripts can read it with ``tail -n 1``. Precedence: dataclass defaults <- ``--config`` YAML <-
flags <- ``key=value`` overrides. Bad data, a missing checkpoint or a bad config exit with 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from dirl import config as config_lib
from dirl.commands import add_config_arguments
from dirl.errors import UserError

# flag -> config key; flags are applied as overrides before the positional ones.
FLAG_KEYS = {"model": "model", "data": "data", "reward": "reward", "out": "out"}


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="checkpoint directory")
    parser.add_argument("--data", help="benchmark file (.jsonl/.json/.parquet) or task:<name>:test")
    parser.add_argument("--reward", help="reward name or comma list (default: task's reward, else math)")
    parser.add_argument("--out", help="run directory, new or empty (default runs/eval-<timestamp>); "
                        "overwrite=true replaces its files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(parser)


def _load_model(cfg, device):
    """``(model, tokenizer)`` from ``cfg.model``; dtype auto = bf16 on CUDA, fp32 on CPU."""
    from dirl.model.checkpoint import CheckpointError, load_pretrained

    if not cfg.model:
        raise config_lib.ConfigError("no checkpoint: pass --model DIR (or model=DIR)")
    dtype = cfg.param_dtype if cfg.param_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model, tokenizer = load_pretrained(cfg.model, dtype=dtype, device=device)
    if tokenizer is None:
        raise CheckpointError(f"{cfg.model}: the checkpoint has no tokenizer files")
    return model.eval(), tokenizer


def write_run(out: Path, cfg, summary: dict, samples: list[dict]) -> None:
    """samples.jsonl (one record per completion), summary.json and the resolved config."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w", encoding="utf-8") as fh:
        for sample in samples:
            fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "config.yaml").write_text(config_lib.dump(cfg))


def run(args) -> int:
    from dirl.data import build_prompt_ids, to_prompt_messages
    from dirl.eval.config import EvalConfig, default_out_dir, load_eval_rows, resolve_defaults
    from dirl.eval.heldout import evaluate_rows
    from dirl.rollout import check_sampling
    from dirl.ownership import check_output, pop_overwrite
    from dirl.runtime import resolve_device

    flags = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items()
             if getattr(args, flag) is not None]
    overrides, overwrite = pop_overwrite([*flags, *args.overrides])
    cfg = config_lib.load(EvalConfig, args.config, overrides)
    cfg = resolve_defaults(cfg)  # unknown reward names fail here, before any loading
    out = check_output(cfg.out or default_out_dir(), inputs=[cfg.model, cfg.data], overwrite=overwrite, key="out")
    device = resolve_device(cfg.device)
    rows = load_eval_rows(cfg)
    to_prompt_messages(rows[0], cfg.prompt_template)  # a bad template fails before the model loads
    model, tokenizer = _load_model(cfg, device)
    try:
        longest = max(len(ids) for ids in build_prompt_ids(tokenizer, rows, cfg.prompt_template, cfg.chat))
    except ValueError as err:  # chat=true without a chat template
        if isinstance(err, UserError):
            raise
        raise config_lib.ConfigError(str(err)) from None
    # e.g. steps_per_block > block size, the longest prompt + max_new_tokens past the context
    check_sampling(cfg.sampling, model.arch, "sampling", model.arch.max_position_embeddings, longest)
    summary, samples = evaluate_rows(model, tokenizer, rows, cfg, progress=not args.no_progress)
    write_run(out, dataclasses.replace(cfg, out=str(out)), summary, samples)
    print(f"dirl eval: wrote {out}/samples.jsonl and summary.json", file=sys.stderr)
    print(json.dumps({**summary, "out": str(out)}), flush=True)
    return 0
