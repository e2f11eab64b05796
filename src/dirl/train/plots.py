"""``curves.png`` of a training run: its logged metrics over optimizer steps, labelled axes.

Every SFT and RL run writes one at the end (rank 0) from its ``metrics.jsonl``: SFT plots
``loss`` (the NELBO), RL the sampled ``reward`` (with a 10-step mean once there are 10 steps);
both add the held-out ``eval/accuracy`` when it was measured, on a second axis. A missing
matplotlib (a main dependency) or an empty log skips the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

PRIMARY = {"sft": ("loss", "training loss (NELBO)"), "rl": ("reward", "mean sampled reward")}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def plot_run(run_dir: str | Path, kind: str, title: str | None = None) -> Path | None:
    """Write ``run_dir/curves.png`` for a ``kind`` (sft | rl) run; returns its path (None: nothing to plot)."""
    key, label = PRIMARY[kind]
    rows = read_metrics(Path(run_dir))
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not points:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, alpha=0.4 if len(values) >= 10 else 1.0, color="tab:blue", label=label)
    if len(values) >= 10:
        smooth = np.convolve(np.asarray(values, dtype=float), np.ones(10) / 10, mode="valid")
        ax.plot(steps[9:], smooth, color="tab:blue", label=f"{label}, 10-point mean")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    handles, labels = ax.get_legend_handles_labels()
    if evals:
        acc = ax.twinx()
        acc.plot(*zip(*evals), "o-", color="tab:orange", label="held-out accuracy")
        acc.set_ylabel("held-out accuracy")
        acc.set_ylim(0, 1)
        more = acc.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best")
    ax.set_title(title or f"{kind}: {Path(run_dir).name}")
    # Fixed margins, not tight_layout: that draws the figure once more just to measure it, which
    # doubled the plot's cost at the end of every run.
    fig.subplots_adjust(left=0.11, right=0.89 if evals else 0.97, bottom=0.13, top=0.91)
    png = Path(run_dir) / "curves.png"
    fig.savefig(png, dpi=100, pil_kwargs={"compress_level": 1})  # fast zlib: a run ends sooner
    plt.close(fig)
    return png
