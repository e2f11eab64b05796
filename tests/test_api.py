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


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("module", ["dirl.train.callbacks", "dirl.rewards.scoring"])
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
