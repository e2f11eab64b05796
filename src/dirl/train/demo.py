"""``dirl demo``: the whole pipeline on CPU -- SFT, held-out eval, DiPO, held-out eval.

The embedded default is the built-in arithmetic task and the ``small`` model.
SFT from scratch does not fit a 10-minute CPU budget, so by default the demo
starts from the SFT checkpoint shipped in the package (made by the project's own
``dirl sft`` recipe ``configs/demo-sft.yaml``; see the README); ``sft=train``
runs that SFT stage instead. Held-out prompts come from the task's test split,
which is disjoint from the training split by construction.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dirl.data import load_prompt_rows
from dirl.eval.evaluate import EvalConfig, evaluate
from dirl.train.common import OptimConfig
from dirl.train.models import load_model_spec
from dirl.train.rl import RLConfig, RolloutConfig, train_rl
from dirl.train.rl_update import AlgoConfig
from dirl.train.sft import SFTConfig, train_sft

SHIPPED_SFT = Path(__file__).resolve().parents[1] / "assets" / "demo-sft"


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    task: str = "arithmetic"
    seed: int = 0
    sft: str = "auto"                 # auto (shipped if present, else train) | shipped | train | <checkpoint dir>
    estimator: str = "trace"          # shortcut for rl.algo.estimator
    eval_limit: int = 128             # held-out prompts
    sft_recipe: SFTConfig = field(default_factory=lambda: SFTConfig(
        model="init:tiny", max_steps=300, batch_size=16, log_every=50, save_every=0,
        optim=OptimConfig(lr=1e-3, warmup_steps=20), complementary_masks=True))
    rl: RLConfig = field(default_factory=lambda: RLConfig(
        max_steps=40, eval_every=10, log_every=5,
        rollout=RolloutConfig(num_prompts=16, group_size=8, max_new_tokens=32, threshold=0.9),
        algo=AlgoConfig(beta=0.0)))


def _held_out(model_dir: str, cfg: DemoConfig) -> dict:
    model, tokenizer = load_model_spec(model_dir, seed=cfg.seed)
    rows = load_prompt_rows(f"task:{cfg.task}:test", limit=cfg.eval_limit, seed=cfg.seed + 1)
    r = cfg.rl.rollout
    eval_cfg = EvalConfig(model=model_dir, data=f"task:{cfg.task}:test", k=1, temperature=0.0,
                          max_new_tokens=r.max_new_tokens, unmasking=r.unmasking, threshold=r.threshold,
                          steps_per_block=r.steps_per_block, seed=cfg.seed, limit=cfg.eval_limit)
    summary, _ = evaluate(model, tokenizer, rows, eval_cfg, progress=True)
    return summary


def _sft_stage(cfg: DemoConfig, out: Path) -> str:
    choice = cfg.sft
    if choice == "auto":
        choice = "shipped" if (SHIPPED_SFT / "config.json").exists() else "train"
    if choice == "shipped":
        if not (SHIPPED_SFT / "config.json").exists():
            raise FileNotFoundError(f"{SHIPPED_SFT}: the shipped SFT checkpoint is missing; run with sft=train")
        return str(SHIPPED_SFT)
    if choice == "train":
        recipe = cfg.sft_recipe
        recipe.out = str(out / "sft")
        return str(train_sft(recipe) / "final")
    return cfg.sft


def plot_curves(metrics_file: Path, png: Path, sft_acc: float) -> None:
    """Reward and held-out accuracy over RL steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label="train reward (sampled)")
    evals = [(0, sft_acc)] + [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    ax.plot(*zip(*evals), "o-", label="held-out accuracy (greedy)")
    ax.set_xlabel("RL step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("dirl demo: DiPO after SFT")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _print_table(stages: dict, sft_sum: dict, rl_sum: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dirl demo")
    for col in ("stage", "held-out accuracy", "tokens/forward", "wall s"):
        table.add_column(col)
    table.add_row("SFT", f"{sft_sum['accuracy']:.3f}", f"{sft_sum['tokens_per_forward']:.2f}", f"{stages['sft']:.0f}")
    table.add_row("eval (SFT)", "", "", f"{stages['eval_sft']:.0f}")
    table.add_row("DiPO RL", f"{rl_sum['accuracy']:.3f}", f"{rl_sum['tokens_per_forward']:.2f}", f"{stages['rl']:.0f}")
    table.add_row("eval (RL)", "", "", f"{stages['eval_rl']:.0f}")
    table.add_row("gain", f"{rl_sum['accuracy'] - sft_sum['accuracy']:+.3f}", "", "")
    Console().print(table)


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; return the summary (also written to ``out/summary.json``)."""
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = {}
    # 1. SFT (the shipped checkpoint by default).
    t0 = time.perf_counter()
    sft_dir = _sft_stage(cfg, out)
    stages["sft"] = time.perf_counter() - t0
    # 2. Held-out accuracy after SFT.
    t0 = time.perf_counter()
    sft_sum = _held_out(sft_dir, cfg)
    stages["eval_sft"] = time.perf_counter() - t0
    # 3. DiPO (or the chosen estimator) from the SFT checkpoint.
    t0 = time.perf_counter()
    rl = cfg.rl
    rl.model, rl.out, rl.data, rl.seed = sft_dir, str(out / "rl"), f"task:{cfg.task}", cfg.seed
    rl.algo.estimator, rl.eval_limit = cfg.estimator, cfg.eval_limit
    run_dir = train_rl(rl)
    stages["rl"] = time.perf_counter() - t0
    # 4. Held-out accuracy after RL, report, plot.
    t0 = time.perf_counter()
    rl_sum = _held_out(str(run_dir / "final"), cfg)
    stages["eval_rl"] = time.perf_counter() - t0
    plot_curves(run_dir / "metrics.jsonl", out / "curves.png", sft_sum["accuracy"])
    wall = time.perf_counter() - start
    summary = {"sft_acc": sft_sum["accuracy"], "rl_acc": rl_sum["accuracy"],
               "gain": rl_sum["accuracy"] - sft_sum["accuracy"], "wall_s": wall, "stages_s": stages,
               "tokens_per_forward": {"sft": sft_sum["tokens_per_forward"], "rl": rl_sum["tokens_per_forward"]},
               "estimator": cfg.estimator, "sft_checkpoint": sft_dir, "run_dir": str(run_dir)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with (out / "metrics.jsonl").open("w") as f:
        f.write(json.dumps({"stage": "sft", **sft_sum}) + "\n")
        f.write(json.dumps({"stage": "rl", **rl_sum}) + "\n")
    _print_table(stages, sft_sum, rl_sum)
    print(f"demo: sft_acc={summary['sft_acc']:.3f} rl_acc={summary['rl_acc']:.3f} "
          f"gain={summary['gain']:.3f} wall_s={wall:.0f}")
    return summary
