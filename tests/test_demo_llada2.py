"""The tiny-LLaDA2 demo recipe (configs/demo-llada2*.yaml): the files load and are the SDAR demo's
DiPO recipe, and the documented commands run end to end on a shortened configuration, training
every trainable matrix while the router and its expert bias stay frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from dirl import config as config_lib
from dirl.cli import main as cli_main
from dirl.demo import DemoConfig
from dirl.train.sft.config import SFTConfig

REPO = Path(__file__).resolve().parents[1]
DEMO, SFT = REPO / "configs/demo-llada2.yaml", REPO / "configs/demo-llada2-sft.yaml"
SHORT = ["rl.max_steps=2", "rl.eval.every=0", "rl.log_every=1", "rl.rollout.num_prompts=2",
         "rl.rollout.group_size=4", "eval_limit=8", "num_train=16", "progress=false"]


def _init_args(text: str) -> list[str]:
    """The ``dirl init`` overrides the recipe's comment documents (one command, continued by ``\\``)."""
    lines = [line[1:].split("#")[0].strip() for line in text.splitlines() if line.startswith("#")]
    i = next(i for i, line in enumerate(lines) if line.startswith("dirl init"))
    words = lines[i].split()
    while lines[i].endswith("\\"):
        i += 1
        words += lines[i].split()
    return [word for word in words if "=" in word]


def test_llada2_demo_recipe_is_the_sdar_demos_dipo_recipe():
    demo, sdar = config_lib.load(DemoConfig, DEMO), DemoConfig()
    assert demo.rl.algo.estimator == "trace" and demo.rl.algo.beta == 0.0
    assert (demo.rl.rollout, demo.rl.optim) == (sdar.rl.rollout, sdar.rl.optim)
    assert (demo.task, demo.task_params, demo.eval_limit) == (sdar.task, sdar.task_params, sdar.eval_limit)
    sft = config_lib.load(SFTConfig, SFT)
    assert sft.data.source == f"{demo.out}/data/sft.jsonl" and demo.sft == f"{sft.out}/final"
    assert sft.moe.freeze_router and demo.rl.moe.freeze_router
    args = _init_args(DEMO.read_text())
    assert "family=llada2" in args and args == _init_args(SFT.read_text())


@pytest.mark.integration
def test_llada2_demo_commands_run_and_train_all_but_the_router(tmp_path, monkeypatch, capsys):
    """The recipe's four commands (init, data, SFT, demo), shortened; cwd = tmp so ``runs/`` lands there."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["init", "--out", "runs/demo-llada2-init", *_init_args(DEMO.read_text())]) == 0
    assert cli_main(["demo", "--config", str(DEMO), "stop_after=data", "num_train=16", "progress=false"]) == 0
    assert cli_main(["sft", "--config", str(SFT), "max_steps=2", "batch_size=4", "log_every=1",
                     "progress=false"]) == 0
    # A 2-step SFT model scores 0 on every rollout (zero advantages, zero gradient); weight decay
    # moves every trainable matrix anyway, so an unmoved router is the freeze, not a null update.
    assert cli_main(["demo", "--config", str(DEMO), *SHORT, "rl.optim.weight_decay=0.1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("demo: sft_acc=")
    before = load_file(tmp_path / "runs/demo-llada2-sft/final/model.safetensors")
    after = load_file(tmp_path / "runs/demo-llada2/rl/final/model.safetensors")
    assert before.keys() == after.keys()
    frozen = {name for name in before if name.endswith(("gate.weight", "gate.expert_bias"))}
    assert frozen and all((before[n] == after[n]).all() for n in frozen)
    moved = [n for n in before if n not in frozen and not (before[n] == after[n]).all()]
    assert "lm_head.weight" in moved and any("query_key_value" in n for n in moved)
