"""Resume hardening (issue 13): the run's own config, listed overrides, torn metrics, exact
log windows, stale temporary directories, and runs that must not be overwritten silently.

Everything runs in-process through :func:`dirl.cli.main` on the tiny model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dirl.cli import main
from dirl.model.checkpoint import load_pretrained
from dirl.ownership import MARKER

RL = ["model=init:tiny", "rewards={rl_rewards:digit_fraction: 1.0}", "rollout.num_prompts=2",
      "rollout.group_size=2", "rollout.sampling.max_new_tokens=8", "optim.lr=1e-3", "log_every=0", "--no-progress"]
SFT = ["model=init:tiny", "data.source=task:arithmetic", "data.max_length=64", "batch_size=4", "data.limit=32",
       "optim.lr=1e-3", "--no-progress"]
TIMING = ("tokens_per_s",)


@pytest.fixture(autouse=True)
def _cli(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["dirl"])  # main() rewrites sys.argv
    monkeypatch.chdir(tmp_path)  # a default out (runs/...) would land here


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(run_dir / "final")[0].state_dict()


def test_rl_resume_takes_the_runs_config_and_lists_overrides(tmp_path, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(["rl", *RL, f"out={straight}", "max_steps=2"]) == 0
    assert main(["rl", *RL, f"out={run}", "max_steps=1"]) == 0
    capsys.readouterr()
    # Only --resume and one override: everything else (the tiny rollouts, the reward) comes from the run.
    assert main(["rl", "--resume", str(run), "max_steps=2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "max_steps: 1 -> 2" in err and "num_prompts" not in err
    assert not (tmp_path / "runs").exists()  # nothing went to the default out
    assert [r["step"] for r in rows(run)] == [1, 2]
    assert [r["reward"] for r in rows(run)] == [r["reward"] for r in rows(straight)]
    a, b = weights(straight), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_resume_continues_log_windows_over_a_torn_metrics_line(tmp_path):
    """log_every=2 with a checkpoint at step 3 (not a multiple): the resumed run's step-4 average
    covers steps 3 and 4, as in a straight run, although the kill tore the last metrics row."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    common = [*SFT, "max_steps=4", "log_every=2", "save_every=3"]
    assert main(["sft", *common, f"out={straight}"]) == 0
    assert main(["sft", *common, f"out={run}", "stop_at_step=3"]) == 0
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "loss": 1.2')  # killed mid-write after the checkpoint
    stale = [run / ".final.tmp-999999999", run / "checkpoints" / ".step-000004.tmp-999999999"]
    for path in stale:  # what a killed writer leaves: marked as dirl's own before anything else
        path.mkdir()
        (path / MARKER).write_text("")
    users = run / ".notes.tmp-999999999"  # a user's own directory of the same name pattern
    users.mkdir()
    assert main(["sft", "--resume", str(run), "--no-progress"]) == 0
    assert not any(path.exists() for path in stale)
    assert users.is_dir()  # not dirl's: left alone
    got, want = rows(run), rows(straight)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in TIMING} == {k: v for k, v in w.items() if k not in TIMING}


def test_a_run_directory_is_not_overwritten_silently(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sft", *SFT, f"out={run}", "max_steps=2"]) == 0
    before = weights(run)
    capsys.readouterr()
    assert main(["sft", *SFT, f"out={run}", "max_steps=2", "seed=5"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert all(torch.equal(v, weights(run)[k]) for k, v in before.items())  # untouched
    assert main(["sft", *SFT, f"out={run}", "max_steps=2", "seed=5", "overwrite=true"]) == 0
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-000002"]
    assert not all(torch.equal(v, weights(run)[k]) for k, v in before.items())  # replaced
