"""``dirl demo``: the real CLI end to end on a shortened configuration, the recipe files,
held-out disjointness, determinism and the equal-wall-time chunking."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dirl import config as config_lib
from dirl.cli import main as cli_main
from dirl.demo import SHIPPED_RECIPE, SHIPPED_SFT, DemoConfig, run_demo, write_data

REPO = Path(__file__).resolve().parents[1]
# A few seconds: 2 RL steps of 2 prompts x 4 samples, 8 held-out prompts.
SHORT = ["rl.max_steps=2", "rl.eval.every=1", "rl.log_every=1", "rl.rollout.num_prompts=2",
         "rl.rollout.group_size=4", "eval_limit=8", "num_train=16",
         "progress=false"]


def _short(out: Path, *extra: str) -> DemoConfig:
    return config_lib.load(DemoConfig, REPO / "configs/demo.yaml", [f"out={out}", *SHORT, *extra])


@pytest.mark.integration
def test_demo_cli_end_to_end_with_sft(tmp_path, capsys):
    """``dirl demo`` through ``dirl.cli.main`` (the console script's code path, in-process)."""
    out = tmp_path / "demo"
    assert cli_main(["demo", "--config", str(REPO / "configs/demo.yaml"), f"out={out}", *SHORT, "sft=train",
                     "sft_overrides=[max_steps=3, batch_size=4, log_every=1]"]) == 0
    stdout = capsys.readouterr().out
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"demo: sft_acc=\d\.\d{3} rl_acc=\d\.\d{3} gain=-?\d\.\d{3} wall_s=\d+", last), last
    assert "held-out accuracy" in stdout and "tokens/forward" in stdout  # the table
    assert (out / "curves.png").stat().st_size > 1000
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in lines] == ["eval_sft", "rl", "rl", "eval_rl", "summary"]
    assert [x["step"] for x in lines if x["stage"] == "rl"] == [1, 2] and "eval/accuracy" in lines[2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gain"] == pytest.approx(summary["rl_acc"] - summary["sft_acc"], abs=1e-12)
    assert summary["rl_steps"] == 2 and summary["eval_prompts"] == 8
    # SFT ran here: 3 steps of the shipped recipe, then RL started from its checkpoint.
    assert json.loads((out / "sft" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert summary["sft_checkpoint"] == str(out / "sft" / "final")


def test_demo_recipe_files_match_the_code():
    assert config_lib.load(DemoConfig, REPO / "configs/demo.yaml") == DemoConfig()
    # The shipped checkpoint carries the recipe that made it.
    assert SHIPPED_RECIPE.read_text() == (REPO / "configs/demo-sft.yaml").read_text()
    size = sum(f.stat().st_size for f in SHIPPED_SFT.iterdir())
    assert size <= 20 * 2**20, f"shipped SFT checkpoint is {size} bytes (limit 20 MB)"


def test_held_out_prompts_are_disjoint_from_training(tmp_path):
    cfg = DemoConfig(out=str(tmp_path))
    files = write_data(cfg, tmp_path)
    questions = {name: {json.loads(x)["question"] for x in path.read_text().splitlines()} for name, path in files.items()}
    assert len(questions["test"]) == cfg.eval_limit and len(questions["sft"]) > 1000
    assert not questions["test"] & questions["sft"]


@pytest.mark.integration
def test_demo_is_deterministic_and_wall_time_chunks_resume_exactly(tmp_path):
    """Two runs with the same seed print the same numbers; ``rl_wall_s`` (RL in chunks of
    ``eval.every`` steps, each resumed from the last checkpoint) equals one uninterrupted run.
    (The second run is the chunked one: equal to the first, it shows both at once.)"""
    first = run_demo(_short(tmp_path / "a"))
    chunked = run_demo(_short(tmp_path / "c", "rl_wall_s=1000", "rl_clock=cpu"))
    assert (chunked["sft_acc"], chunked["rl_acc"], chunked["rl_steps"]) == (first["sft_acc"], first["rl_acc"], 2)
    rewards = {name: [json.loads(x)["reward"] for x in (tmp_path / name / "rl" / "metrics.jsonl").read_text().splitlines()]
               for name in "ac"}
    assert len(rewards["a"]) == 2 and rewards["a"] == rewards["c"]
    final = {name: load_file(tmp_path / name / "rl" / "final" / "model.safetensors") for name in "ac"}
    assert all(torch.equal(final["a"][k], final["c"][k]) for k in final["a"])
    shipped = load_file(SHIPPED_SFT / "model.safetensors")
    assert any(not torch.equal(shipped[k], final["a"][k]) for k in shipped)  # RL did update


def test_bad_choices_are_named(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="stop_after"):
        config_lib.load(DemoConfig, None, ["stop_after=everything"])
    with pytest.raises(config_lib.ConfigError, match="rl_clock must be one of"):
        config_lib.load(DemoConfig, None, ["rl_clock=sundial"])
    with pytest.raises(config_lib.ConfigError, match="estimator must be one of"):
        config_lib.load(DemoConfig, None, ["estimator=trace_typo"])
    # The shortcut and the full key name one estimator, whichever is given.
    assert config_lib.load(DemoConfig, None, ["estimator=coupled"]).rl.algo.estimator == "coupled"
    assert config_lib.load(DemoConfig, None, ["rl.algo.estimator=trace_mc"]).estimator == "trace_mc"
    with pytest.raises(config_lib.ConfigError, match="sft='nowhere'"):
        run_demo(_short(tmp_path, "sft=nowhere"))


@pytest.mark.slow
def test_full_demo_meets_the_goal(tmp_path):
    """The issue's accuracy goal on the embedded default (~5 min on 2 cores): gain >= 0.20.
    (Its wall time is a measurement for BENCHMARKS.md, not asserted here.)"""
    summary = run_demo(config_lib.load(DemoConfig, REPO / "configs/demo.yaml", [f"out={tmp_path}", "progress=false"]))
    assert summary["rl_steps"] == 200 and summary["gain"] >= 0.20, summary
