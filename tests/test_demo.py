"""``dirl demo`` end to end on a tiny configuration (real CLI): table, last line, files."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_pipeline_runs_and_reports(tmp_path):
    out = tmp_path / "demo"
    cmd = [str(REPO / ".venv/bin/dirl"), "demo", f"out={out}", "sft=train", "sft_recipe.max_steps=4",
           "sft_recipe.progress=false", "rl.max_steps=2", "rl.eval_every=1", "rl.rollout.num_prompts=2",
           "rl.rollout.group_size=2", "rl.rollout.max_new_tokens=8", "eval_limit=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"demo: sft_acc=\d\.\d{3} rl_acc=\d\.\d{3} gain=-?\d\.\d{3} wall_s=\d+", last), last
    assert "held-out accuracy" in proc.stdout  # the table
    assert (out / "curves.png").stat().st_size > 1000
    stages = [json.loads(x)["stage"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["sft", "rl"]
    rl_metrics = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rl_metrics] == [1, 2] and "eval/accuracy" in rl_metrics[-1]
    assert (out / "rl" / "final" / "model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["gain"] - (summary["rl_acc"] - summary["sft_acc"])) < 1e-9
