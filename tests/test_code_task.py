"""The built-in ``code`` task: rows carry hidden tests the sandboxed ``code`` reward runs; the
examples determine the rule; the worked body passes, wrong or hard-coded bodies fail."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dirl.data import get_task, split_of
from dirl.data.code_task import apply_rule
from dirl.rewards import compute_rewards


def _rows(num=6, split="train", seed=0):
    return get_task("code").generate(split, num, seed=seed)


def test_rows_shape_and_unambiguous_examples():
    for row in _rows(300):
        shown = [(int(x), int(y)) for x, y in re.findall(r"f\((-?\d+)\)=(-?\d+)", row["question"])]
        assert len(shown) == 2 and row["entry_point"] == "f"
        fits = [(op, c) for op in "+-*" for c in range(1, 10)
                if all(apply_rule(op, c, x) == y for x, y in shown)]
        assert len(fits) == 1 and row["response"] == f"    return x{fits[0][0]}{fits[0][1]}"
        tested = [int(x) for x in re.findall(r"candidate\((-?\d+)\)", row["test"])]
        assert tested[:2] == [x for x, _ in shown] and len(tested) == 6  # + 4 hidden inputs
        assert compile(row["question"] + row["response"] + "\n" + row["test"], "<row>", "exec")


def test_held_out_split_is_disjoint_by_construction():
    train = {r["question"] for r in _rows(500)}
    test = {r["question"] for r in _rows(100, "test")}
    assert not train & test and {split_of(q) for q in test} == {"test"}


def test_code_reward_scores_the_worked_body_and_rejects_wrong_ones():
    rows = _rows(4)
    columns = {key: [r[key] for r in rows] * 3 for key in ("question", "test", "entry_point")}
    hard_coded = []
    for row in rows:
        (x1, y1), (x2, y2) = re.findall(r"f\((-?\d+)\)=(-?\d+)", row["question"])
        hard_coded.append(f"    return {{{x1}: {y1}, {x2}: {y2}}}[x]")
    texts = [r["response"] for r in rows] + ["    return x"] * 4 + hard_coded
    scores = compute_rewards(["code"], texts, columns).per_reward["code"]
    assert scores[:4] == [1.0] * 4
    assert scores[8:] == [0.0] * 4          # the hidden inputs catch a lookup table
    assert sum(scores[4:8]) <= 1            # identity passes only for x*1


@pytest.mark.integration
def test_code_demo_runs_end_to_end_on_the_sandboxed_reward(tmp_path):
    """``dirl demo --config configs/demo-code.yaml``, shortened: SFT here, RL with the ``code``
    reward (completions run in the sandbox), held-out pass rates before and after."""
    from dirl import config as config_lib
    from dirl.demo import DemoConfig, run_demo

    repo = Path(__file__).resolve().parents[1]
    cfg = config_lib.load(DemoConfig, repo / "configs/demo-code.yaml", [
        f"out={tmp_path}", "progress=false", "num_train=32", "eval_limit=8", "rl.max_steps=2",
        "rl.eval.every=1", "rl.log_every=1", "rl.rollout.num_prompts=2", "rl.rollout.group_size=4",
        "sft_overrides=[data.max_length=64, max_steps=3, batch_size=4, log_every=1]"])
    summary = run_demo(cfg)
    assert summary["task"] == "code" and summary["rl_steps"] == 2 and summary["eval_prompts"] == 8
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/code/timeouts" in row for row in rows)
