"""Trackers: metrics.jsonl always, TensorBoard, W&B in offline mode (the run file holds every
step's metrics), resume under the same W&B run id, unknown trackers and a missing tensorboard."""

from __future__ import annotations

import builtins
import json
import logging

import pytest

import wandb_records
from dirl.train.tracking import MetricsLogger, check_report_to


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def wandb_history(run_dir):
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    return [row for f in files for row in wandb_records.history(f)], files


def _log_three_steps(run, report_to):
    logger = MetricsLogger(run, report_to=report_to, config={"lr": 0.1})
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step, "learning_rate": 0.1, "note": "text is jsonl-only"})
    logger.close()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_jsonl_and_tensorboard_get_every_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _log_three_steps(run, ["tensorboard"])
    (events,) = (run / "tensorboard").iterdir()
    board = EventAccumulator(str(events)).Reload()
    assert [e.step for e in board.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in board.Scalars("loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert "note" not in board.Tags()["scalars"]  # text stays in metrics.jsonl


@pytest.mark.integration  # W&B runs a service process
def test_wandb_gets_every_step_and_a_resume_keeps_the_run_id(tmp_path, wandb_offline):
    run = tmp_path / "run"
    _log_three_steps(run, ["wandb", "tensorboard"])
    history, files = wandb_history(run)
    assert len(files) == 1
    assert [(h["_step"], h["loss"], h["learning_rate"]) for h in history] == [(1, 1.0, 0.1), (2, 0.5, 0.1),
                                                                               (3, 1 / 3, 0.1)]
    assert len(list((run / "tensorboard").iterdir())) == 1
    # a resumed run appends to the same W&B run id
    run_id = (run / "wandb-run-id").read_text()
    resumed = MetricsLogger(run, resume_step=3, report_to=["wandb"])
    resumed.log(4, {"loss": 0.25})
    resumed.close()
    assert (run / "wandb-run-id").read_text() == run_id


def test_report_to_names_and_a_missing_tensorboard(tmp_path, monkeypatch, caplog):
    assert check_report_to([]) == ["jsonl"]
    assert check_report_to(["tensorboard", "jsonl"]) == ["jsonl", "tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        check_report_to(["mlflow"])
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with caplog.at_level(logging.WARNING, logger="dirl.train.tracking"):
        logger = MetricsLogger(tmp_path, report_to=["tensorboard"])
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert "tensorboard package is not installed" in caplog.text
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "metrics.jsonl").exists()
