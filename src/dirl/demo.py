"""``dirl demo``: the whole pipeline on CPU -- SFT, held-out eval, DiPO, held-out eval.

Stages (each timed; the summary table and the last line report them):

1. data -- the built-in task with the demo's difficulty knobs, written as JSON Lines
   under ``out/data``: ``sft.jsonl`` (train split, worked solutions; also the RL
   prompts) and ``test.jsonl`` (held-out prompts). The task splits by a hash of the
   question text, so the held-out prompts are disjoint from every training prompt.
2. sft -- by default the checkpoint shipped in the package (``dirl/assets/demo-sft``,
   made by ``dirl sft --config configs/demo-sft.yaml``; see the README), because SFT
   plus RL does not fit 10 minutes on a loaded 2-core CPU; ``sft=shipped-<name>`` picks
   another shipped one (``dirl/assets/demo-sft-<name>``, e.g. ``shipped-dream``: the
   full-attention demo, configs/demo-dream.yaml); ``sft=train`` runs the recipe
   (``sft_recipe``: one or more stages, default the shipped demo-sft's) here instead,
   ``sft=<dir>`` starts from any checkpoint.
3. held-out greedy accuracy of the SFT model;
4. RL with the chosen estimator (DiPO's exact ``trace`` by default); ``rl_wall_s``
   stops the stage after that many seconds (checked every ``rl_chunk`` steps, default
   ``rl.eval.every``),
   which is how estimators are compared at equal wall time;
5. held-out greedy accuracy of the RL model, ``metrics.jsonl``, ``curves.png``,
   ``summary.json``, the table and the line
   ``demo: sft_acc=0.XXX rl_acc=0.YYY gain=0.ZZZ wall_s=NNN``.

Everything is seeded: with a fixed seed, thread count and ``rl_wall_s=0`` two runs
print the same accuracies.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dirl import config as config_lib
from dirl.algo.critic import ValueConfig
from dirl.data import get_task
from dirl.rollout import SamplingSpec
from dirl.runtime import derived_seed
from dirl.train.config import HeldOutConfig
from dirl.train.optim import OptimConfig
from dirl.train.rl.config import AlgoConfig, RLConfig, RolloutConfig

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_SFT = ASSETS / "demo-sft"
SHIPPED_RECIPE = SHIPPED_SFT / "recipe.yaml"   # a copy of configs/demo-sft.yaml
STAGES = ("data", "sft", "all")
SHIPPED = "shipped"  # sft=shipped: SHIPPED_SFT; sft=shipped-<name>: ASSETS / demo-sft-<name>


def shipped_sft(sft: str) -> Path | None:
    """The shipped checkpoint ``sft`` names (``shipped`` or ``shipped-<name>``), else None."""
    if sft == SHIPPED:
        return SHIPPED_SFT
    name = sft.removeprefix(SHIPPED + "-")
    return ASSETS / f"demo-sft-{name}" if name != sft and name.replace("-", "").replace("_", "").isalnum() else None


def _demo_rl() -> RLConfig:
    """The RL recipe (configs/demo.yaml repeats it; a test holds the two equal)."""
    return RLConfig(
        device="cpu", max_steps=200, eval=HeldOutConfig(every=20), log_every=10,  # the demo is a CPU pipeline
        optim=OptimConfig(lr=3e-5, warmup_steps=5, schedule="constant", grad_clip=1.0),
        rollout=RolloutConfig(num_prompts=16, group_size=8, sampling=SamplingSpec(
            max_new_tokens=36, temperature=0.6, unmasking="dynamic", threshold=0.9)),
        # The value model's lr (used with rl.algo.critic=value) is 5x the policy's, TraceRL's ratio.
        algo=AlgoConfig(estimator="trace", beta=0.0, value=ValueConfig(lr=1.5e-4)))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seed: int = 0
    task: str = "arithmetic"
    # Chains of 3-4 one-digit operands with + and -: a 0.8M-parameter model learns the
    # worked format within ~100 SFT steps and the arithmetic gradually after that.
    task_params: dict[str, Any] = field(default_factory=lambda: {
        "min_operands": 3, "max_operands": 4, "ops": "+-", "max_operand": 9})
    num_train: int = 5000             # train-split problems (SFT targets and RL prompts)
    eval_limit: int = 256             # held-out prompts (test split)
    stop_after: str = "all"           # data | sft | all
    sft: str = "shipped"              # shipped | shipped-<name> | train | <checkpoint dir>
    # sft=train: SFTConfig YAMLs run in order, each stage from the one before's final model
    # ([] = the shipped recipe)
    sft_recipe: list[str] = field(default_factory=list)
    sft_overrides: list[str] = field(default_factory=list)  # key=value applied to every stage
    estimator: str = ""               # shortcut: sets rl.algo.estimator ("" = keep it)
    rl_wall_s: float = 0.0            # > 0: end RL after this many seconds (equal-time comparisons)
    rl_clock: str = "wall"            # what rl_wall_s counts: wall | cpu (this process's CPU seconds:
    #                                   equal compute for every run even on a machine shared with other jobs)
    rl_chunk: int = 0                 # rl_wall_s > 0: RL steps between budget checks (0 = rl.eval.every,
    #                                   else the whole run)
    progress: bool = True
    rl: RLConfig = field(default_factory=_demo_rl)

    def __post_init__(self) -> None:
        if self.stop_after not in STAGES:
            raise ValueError(f"stop_after must be one of {STAGES}, got {self.stop_after!r}")
        if self.rl_clock not in CLOCKS:
            raise ValueError(f"rl_clock must be one of {tuple(CLOCKS)}, got {self.rl_clock!r}")
        if self.eval_limit < 1 or self.num_train < 1:
            raise ValueError("eval_limit and num_train must be >= 1")
        if self.rl_chunk < 0:
            raise ValueError(f"rl_chunk must be >= 0, got {self.rl_chunk}")
        from dirl.algo.likelihood import ESTIMATORS

        # One source of truth: the shortcut lands in rl.algo, and both then name the same estimator.
        self.rl.algo.estimator = self.estimator = self.estimator or self.rl.algo.estimator
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")


# ---------------------------------------------------------------- 1. data


def write_data(cfg: DemoConfig, data_dir: Path) -> dict[str, Path]:
    """Write ``sft.jsonl`` (train split) and ``test.jsonl`` (held-out) for the demo task."""
    task = get_task(cfg.task, **cfg.task_params)
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {"sft": data_dir / "sft.jsonl", "test": data_dir / "test.jsonl"}
    splits = {"sft": task.generate("train", cfg.num_train, seed=cfg.seed),
              "test": task.generate("test", cfg.eval_limit, seed=derived_seed(cfg.seed, "held_out"))}
    for name, rows in splits.items():
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


# ---------------------------------------------------------------- 2. SFT


def sft_recipes(cfg: DemoConfig, data: dict[str, Path], out: Path) -> list:
    """The SFT stages (default: the shipped copy of configs/demo-sft.yaml) pointed at this run's data;
    a later stage starts from the one before's final model (``out/sft``, or ``out/sft-1`` ...)."""
    from dirl.train.sft.config import SFTConfig

    paths = cfg.sft_recipe or [SHIPPED_RECIPE]
    stage_dirs = [out / "sft"] if len(paths) == 1 else [out / f"sft-{i + 1}" for i in range(len(paths))]
    recipes = []
    for i, path in enumerate(paths):
        start = [f"model={stage_dirs[i - 1] / 'final'}"] if i else []
        overrides = [f"data.source={data['sft']}", f"out={stage_dirs[i]}", f"seed={cfg.seed}", *start,
                     f"progress={str(cfg.progress).lower()}", "overwrite=true", *cfg.sft_overrides]
        recipes.append(config_lib.load(SFTConfig, path, overrides))
    return recipes


def sft_stage(cfg: DemoConfig, data: dict[str, Path], out: Path) -> str:
    """Return the SFT checkpoint directory (shipped, trained here, or given)."""
    shipped = shipped_sft(cfg.sft)
    if shipped is not None:
        if not (shipped / "config.json").exists():
            raise config_lib.ConfigError(f"sft={cfg.sft}: no shipped SFT checkpoint at {shipped}; run with sft=train")
        return str(shipped)
    if cfg.sft == "train":
        from dirl.train.sft.loop import train_sft

        run_dir = None
        for recipe in sft_recipes(cfg, data, out):
            run_dir = train_sft(recipe)
        return str(run_dir / "final")
    if not Path(cfg.sft, "config.json").exists():
        raise config_lib.ConfigError(f"sft={cfg.sft!r}: not 'shipped', 'shipped-<name>', 'train' or a checkpoint directory")
    return cfg.sft


# ---------------------------------------------------------------- 3/5. held-out eval


def held_out(model_dir: str, rl: RLConfig, progress: bool) -> dict:
    """Greedy accuracy (and tokens per forward) on ``rl``'s held-out prompts, decoded as in RL
    (the RL run's own held-out eval, :func:`dirl.train.rl.held_out_spec`)."""
    from dirl.data import load_prompt_rows
    from dirl.eval.heldout import evaluate_rows
    from dirl.model.loading import load_model_spec
    from dirl.train.rl.config import held_out_spec

    model, tokenizer = load_model_spec(model_dir, seed=rl.seed)
    rows = load_prompt_rows(rl.eval.data, limit=rl.eval.limit)
    summary, _ = evaluate_rows(model, tokenizer, rows, held_out_spec(rl, batch_size=64), progress=progress)
    return summary


# ---------------------------------------------------------------- 4. RL


def rl_config(cfg: DemoConfig, sft_dir: str, data: dict[str, Path], out: Path) -> RLConfig:
    """``cfg.rl`` pointed at the SFT checkpoint and the demo data (its held-out split too)."""
    task = get_task(cfg.task)
    rl = copy.deepcopy(cfg.rl)
    rl.model, rl.out, rl.seed = sft_dir, str(out / "rl"), cfg.seed
    rl.overwrite = True  # the demo owns its directory: a rerun replaces its stages
    rl.data, rl.eval.data, rl.eval.limit = str(data["sft"]), str(data["test"]), cfg.eval_limit
    rl.prompt_template, rl.rewards = task.prompt_template, {task.reward: 1.0}
    return rl


def rl_stage(cfg: DemoConfig, rl: RLConfig) -> tuple[Path, int]:
    """Run RL; with ``rl_wall_s`` in chunks of ``rl_chunk`` (else ``eval.every``) steps, resuming exactly,
    until the budget (on ``rl_clock``) is spent. Returns (run dir, steps done)."""
    from dirl.train.rl.loop import train_rl
    from dirl.train.state import resolve_resume

    if cfg.rl_wall_s <= 0:  # one call: exactly the recipe, deterministic
        return train_rl(rl, progress=cfg.progress), rl.max_steps
    total, chunk = rl.max_steps, cfg.rl_chunk or rl.eval.every or rl.max_steps
    clock = CLOCKS[cfg.rl_clock]
    start, done, resume, run_dir = clock(), 0, None, Path(rl.out)
    while done < total and (done == 0 or clock() - start < cfg.rl_wall_s):
        # The schedule is rebuilt per call: fine for the constant schedule RL uses.
        rl.max_steps = min(done + chunk, total)
        run_dir = train_rl(rl, resume=resume, progress=cfg.progress)
        done, resume = rl.max_steps, str(resolve_resume(run_dir))
    return run_dir, done


# ---------------------------------------------------------------- report


def rl_step_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(rows: list[dict], png: Path, sft_acc: float, title: str) -> None:
    """Training reward and held-out greedy accuracy over RL steps."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, rewards = [r["step"] for r in rows], np.array([r["reward"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, rewards, alpha=0.3, color="tab:blue", label="train reward (sampled)")
    if len(rewards) >= 10:  # a trailing 10-step mean: one step's 128 samples are noisy
        smooth = np.convolve(rewards, np.ones(10) / 10, mode="valid")
        ax.plot(steps[9:], smooth, color="tab:blue", label="train reward (10-step mean)")
    evals = [(0, sft_acc)] + [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    ax.plot(*zip(*evals), "o-", color="tab:orange", label="held-out accuracy (greedy)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward (sampled) / held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def print_table(summary: dict) -> None:
    """The per-stage table (rich renders it; plain text when piped)."""
    from rich.console import Console
    from rich.table import Table

    st, acc, tpf = summary["stages_s"], summary, summary["tokens_per_forward"]
    critic = f", critic={summary['critic']}" if summary["critic"] != "none" else ""
    table = Table(title=f"dirl demo ({summary['task']}, estimator={summary['estimator']}{critic})")
    for col in ("stage", "held-out accuracy", "tokens/forward", "wall s"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    table.add_row("data", "", "", f"{st['data']:.1f}")
    table.add_row(f"SFT ({summary['sft_source']})", "", "", f"{st['sft']:.1f}")
    table.add_row("eval after SFT", f"{acc['sft_acc']:.3f}", f"{tpf['sft']:.2f}", f"{st['eval_sft']:.1f}")
    table.add_row(f"RL ({summary['rl_steps']} steps)", "", "", f"{st['rl']:.1f}")
    table.add_row("eval after RL", f"{acc['rl_acc']:.3f}", f"{tpf['rl']:.2f}", f"{st['eval_rl']:.1f}")
    table.add_row("gain", f"{acc['gain']:+.3f}", "", "")
    table.add_row("total", "", "", f"{summary['wall_s']:.1f}")
    Console(width=100).print(table)


def _write_metrics(path: Path, sft_sum: dict, rl_rows: list[dict], rl_sum: dict, summary: dict) -> None:
    """One JSON object per line: the SFT eval, every RL step, the RL eval, the summary."""
    lines = [{"stage": "eval_sft", **sft_sum}] + [{"stage": "rl", **row} for row in rl_rows]
    lines += [{"stage": "eval_rl", **rl_sum}, {"stage": "summary", **summary}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


# ---------------------------------------------------------------- the pipeline


def run_demo(cfg: DemoConfig) -> dict:
    """Run the stages; return the summary (also written to ``out/summary.json``)."""
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.yaml").write_text(config_lib.dump(cfg))
    stages: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        stages[name] = time.perf_counter() - t0
        return result

    data = timed("data", write_data, cfg, out / "data")
    if cfg.stop_after == "data":
        return {"data": {k: str(v) for k, v in data.items()}}
    sft_dir = timed("sft", sft_stage, cfg, data, out)
    if cfg.stop_after == "sft":
        return {"sft_checkpoint": sft_dir}
    rl = rl_config(cfg, sft_dir, data, out)
    sft_sum = timed("eval_sft", held_out, sft_dir, rl, cfg.progress)
    run_dir, steps = timed("rl", rl_stage, cfg, rl)
    rl_sum = timed("eval_rl", held_out, str(run_dir / "final"), rl, cfg.progress)
    rows = rl_step_rows(run_dir)
    plot_curves(rows, out / "curves.png", sft_sum["accuracy"], f"dirl demo: {cfg.estimator} RL after SFT ({cfg.task})")
    summary = {"sft_acc": sft_sum["accuracy"], "rl_acc": rl_sum["accuracy"],
               "gain": rl_sum["accuracy"] - sft_sum["accuracy"], "wall_s": time.perf_counter() - start,
               "stages_s": stages, "rl_steps": steps, "eval_prompts": sft_sum["num_questions"],
               "tokens_per_forward": {"sft": sft_sum["tokens_per_forward"], "rl": rl_sum["tokens_per_forward"]},
               "task": cfg.task, "estimator": cfg.estimator, "critic": cfg.rl.algo.critic,
               "sft_source": cfg.sft if shipped_sft(cfg.sft) or cfg.sft == "train" else "dir",
               "sft_checkpoint": sft_dir, "run_dir": str(run_dir)}
    _write_metrics(out / "metrics.jsonl", sft_sum, rows, rl_sum, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    print(f"demo: sft_acc={summary['sft_acc']:.3f} rl_acc={summary['rl_acc']:.3f} "
          f"gain={summary['gain']:.3f} wall_s={summary['wall_s']:.0f}", flush=True)
    return summary
