"""The Python API: trainers from Python give the CLI's metrics for the same config; models and
datasets as paths or objects; callbacks; a W&B offline run dir holding the step metrics; the
docstring examples run."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch

import dirl
import wandb_records
from dirl import config as config_lib
from dirl.cli import main as cli_main
from dirl.data import load_sft_rows

REPO = Path(__file__).resolve().parents[1]
SFT_OVERRIDES = ["max_steps=2", "batch_size=4", "data.limit=16", "log_every=1", "save_every=0", "progress=false",
                 "report_to=[jsonl]"]
TIMING = ("tokens_per_s", "timing/")


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock values (the only thing two runs may differ in)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


def _sft_config(out: Path, *extra: str) -> dirl.SFTConfig:
    return config_lib.load(dirl.SFTConfig, REPO / "configs" / "tiny-sft.yaml", [*SFT_OVERRIDES, f"out={out}", *extra])


class Recorder(dirl.TrainerCallback):
    def __init__(self):
        self.steps, self.saves = [], []

    def on_step_end(self, step, metrics):
        self.steps.append((step, metrics["loss"], metrics["learning_rate"]))

    def on_save(self, step, checkpoint_dir):
        self.saves.append((step, Path(checkpoint_dir).name))


def test_sft_cli_and_api_give_identical_metrics(tmp_path):
    assert cli_main(["sft", "--config", str(REPO / "configs" / "tiny-sft.yaml"), *SFT_OVERRIDES,
                     f"out={tmp_path / 'cli'}"]) == 0
    recorder = Recorder()
    api_dir = dirl.SFTTrainer(args=_sft_config(tmp_path / "api"), callbacks=[recorder]).train()
    cli, api = _records(tmp_path / "cli"), _records(api_dir)
    assert len(cli) == 2 and cli == api
    assert {"loss", "learning_rate", "grad_norm"} <= set(api[0])
    assert [(s, loss) for s, loss, _ in recorder.steps] == [(r["step"], pytest.approx(r["loss"])) for r in api]
    assert recorder.saves == [(2, "step-000002")]


def test_sft_dataset_and_model_as_objects_match_paths(tmp_path):
    """Rows in memory (a list, a datasets.Dataset) and a model object give the path run's metrics."""
    import datasets

    rows = load_sft_rows("task:arithmetic", limit=16)
    by_path = dirl.SFTTrainer("init:tiny", train_dataset="task:arithmetic", args=_sft_config(tmp_path / "a")).train()
    by_rows = dirl.SFTTrainer(train_dataset=rows, args=_sft_config(tmp_path / "b")).train()
    model, tokenizer = dirl.load_model("init:tiny")
    trainer = dirl.SFTTrainer(model, tokenizer=tokenizer, train_dataset=datasets.Dataset.from_list(rows),
                              args=_sft_config(tmp_path / "c"))
    by_objects = trainer.train()
    assert _records(by_path) == _records(by_rows) == _records(by_objects)
    assert trainer.model is model and not torch.equal(model.lm_head.weight, dirl.load_model("init:tiny")[0].lm_head.weight)
    saved = config_lib.load(dirl.SFTConfig, by_objects / "config.yaml")
    assert saved.model == "<in-memory>" and saved.data.source == "<in-memory>"
    with pytest.raises(ValueError, match="needs its tokenizer"):
        dirl.SFTTrainer(model)


@pytest.mark.integration
def test_wandb_offline_run_dir_holds_the_step_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config")}.items():
        monkeypatch.setenv(key, value)
    run_dir = dirl.SFTTrainer(args=_sft_config(tmp_path / "run", "report_to=[jsonl,wandb]")).train()
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_records.history(run_file)
    logged = _records(run_dir)
    assert [h["_step"] for h in history] == [r["step"] for r in logged] == [1, 2]
    for h, r in zip(history, logged):
        assert h["loss"] == pytest.approx(r["loss"]) and h["learning_rate"] == pytest.approx(r["learning_rate"])


@pytest.mark.parametrize("module", ["dirl.train.callbacks", "dirl.rewards.scoring", "dirl.train.trainers"])
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- RL

RL_OVERRIDES = ["max_steps=2", "rollout.num_prompts=2", "rollout.group_size=4", "rollout.sampling.max_new_tokens=8",
                "report_to=[jsonl]", "rewards.rl_rewards:digit_fraction=1.0"]


def _rl_config(out: Path, *extra: str) -> dirl.RLConfig:
    return config_lib.load(dirl.RLConfig, REPO / "configs" / "tiny-rl.yaml", [*RL_OVERRIDES, f"out={out}", *extra])


def test_rl_cli_and_api_give_identical_metrics(tmp_path):
    assert cli_main(["rl", "--config", str(REPO / "configs" / "tiny-rl.yaml"), *RL_OVERRIDES,
                     f"out={tmp_path / 'cli'}", "--no-progress"]) == 0
    recorder = Recorder()
    api_dir = dirl.DiPOTrainer(args=_rl_config(tmp_path / "api"), callbacks=[recorder]).train(progress=False)
    cli, api = _records(tmp_path / "cli"), _records(api_dir)
    assert len(cli) == 2 and cli == api
    for key in ("learning_rate", "reward", "reward_std", "rewards/rl_rewards:digit_fraction/std",
                "completions/min_length", "completions/max_length", "completions/mean_terminated_length"):
        assert key in api[0], key
    assert api[0]["completions/min_length"] <= api[0]["completions/mean_length"] <= api[0]["completions/max_length"]
    assert [s for s, _, _ in recorder.steps] == [1, 2] and recorder.saves == [(2, "step-000002")]


def test_rl_with_trl_reward_callables_and_rows_in_memory(tmp_path):
    seen = {}

    def trl_reward(prompts, completions, completion_ids, task, **kwargs):  # TRL's signature
        seen.update(prompts=list(prompts), lengths=[len(i) for i in completion_ids], task=list(task))
        return [None if t == "skip" else sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.5
                for c, t in zip(completions, task)]

    rows = [{"prompt": "3+4=", "task": "add"}, {"prompt": "9-5=", "task": "skip"}]
    trainer = dirl.DiPOTrainer("init:tiny", reward_funcs=[trl_reward], train_dataset=rows,
                               args=_rl_config(tmp_path / "run", "rewards={}", "rollout.num_prompts=2"))
    run_dir = trainer.train(progress=False)
    (first, _) = _records(run_dir)
    assert sorted(set(seen["prompts"])) == ["3+4=", "9-5="] and set(seen["task"]) == {"add", "skip"}
    assert all(0 < n <= 8 for n in seen["lengths"])
    assert first["rewards/trl_reward/mean"] >= 0.5 and first["rewards/trl_reward/errors"] == 0.0
    # "skip" rows are not applicable: their total is 0, the applicable ones score >= 0.5
    assert first["reward"] == pytest.approx(first["rewards/trl_reward/mean"] / 2, rel=1e-6)
    assert config_lib.load(dirl.RLConfig, run_dir / "checkpoints" / "step-000002" / "config.yaml").data == "<in-memory>"


def test_a_reward_failing_on_the_whole_first_step_stops_the_run(tmp_path, capsys):
    def needs_truth(completions, ground_truth, **kwargs):
        return [float(t in c) for c, t in zip(completions, ground_truth)]

    def broken(completions, **kwargs):
        raise KeyError("solution")

    with pytest.raises(ValueError, match="reward 'needs_truth' needs argument 'ground_truth'"):
        dirl.DiPOTrainer("init:tiny", reward_funcs=needs_truth, args=_rl_config(tmp_path / "a")).train(progress=False)
    with pytest.raises(dirl.RewardError, match="reward 'broken' failed on all 8 completions.*KeyError"):
        dirl.DiPOTrainer("init:tiny", reward_funcs=[broken, "rl_rewards:digit_fraction"],
                         args=_rl_config(tmp_path / "b")).train(progress=False)
    assert not (tmp_path / "b" / "final").exists()
    # the CLI: one line naming the reward, exit 2
    assert cli_main(["rl", "--config", str(REPO / "configs" / "tiny-rl.yaml"), *RL_OVERRIDES,
                     "rewards.rl_rewards:always_raises=1.0", f"out={tmp_path / 'c'}", "--no-progress"]) == 2
    assert "reward 'rl_rewards:always_raises' failed on all 8 completions" in capsys.readouterr().err


def test_reward_names_from_python_are_the_config_s(tmp_path):
    trainer = dirl.DiPOTrainer(reward_funcs={"math": 0.5, "rl_rewards:digit_fraction": 2},
                               args=_rl_config(tmp_path))
    assert trainer.args.rewards == {"math": 0.5, "rl_rewards:digit_fraction": 2.0}
    assert trainer.inputs.reward_funcs is None
    unweighted = dirl.DiPOTrainer(reward_funcs=["math", "gsm8k"], args=_rl_config(tmp_path))
    assert unweighted.args.rewards == {"math": 1.0, "gsm8k": 1.0}


def test_generate_decodes_text():
    model, tokenizer = dirl.load_model("init:tiny")
    spec = dirl.SamplingSpec(max_new_tokens=8, temperature=0)
    one, both = dirl.generate(model, tokenizer, "12+34=", spec), dirl.generate(model, tokenizer, ["12+34=", "1+1="], spec)
    assert isinstance(one, str) and both[0] == one and len(both) == 2
