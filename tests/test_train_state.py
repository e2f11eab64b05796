"""Checkpoints and resume plumbing (dirl.train.state) and the shared step helpers (dirl.train.optim)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dirl.model.checkpoint import CheckpointError, load_pretrained
from dirl.model.factory import InitConfig, init_model
from dirl.model.masks import TokenMeta
from dirl.train import state as state_lib
from dirl.train.optim import OptimConfig, build_optimizer, build_scheduler, clip_and_step, lr_factor
from dirl.train.state import get_rng_state, set_rng_state
from dirl.train.tracking import MetricsLogger


@pytest.fixture
def trainer(tokenizer):
    model = init_model(InitConfig(preset="tiny", seed=0), tokenizer)
    cfg = OptimConfig(lr=1e-3, warmup_steps=2)
    optimizer = build_optimizer(model, cfg)
    return model, optimizer, build_scheduler(optimizer, cfg, total_steps=10), cfg


def _backward(model, scale: float = 1.0) -> None:
    positions = torch.arange(8)[None]
    out = model(torch.arange(8)[None] + 4, positions, TokenMeta.clean(positions, 4))
    (out.logits.square().mean() * scale).backward()


def _save(run_dir, step, trainer, tokenizer, keep_last=3):
    model, optimizer, scheduler, cfg = trainer
    return state_lib.save_checkpoint(run_dir, step, state_lib.Trainable(model, tokenizer, optimizer, scheduler),
                                     {"cursor": {"epoch": 0, "position": step}}, cfg, keep_last=keep_last)


def test_checkpoint_round_trip_restores_everything(tmp_path, trainer, tokenizer):
    model, optimizer, scheduler, cfg = trainer
    _backward(model)
    clip_and_step(model, optimizer, scheduler, cfg)
    torch.manual_seed(123)
    path = _save(tmp_path, 1, trainer, tokenizer)
    expected_draw = torch.rand(3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()

    fresh = init_model(InitConfig(preset="tiny", seed=5), tokenizer)
    fresh_opt = build_optimizer(fresh, cfg)
    fresh_sched = build_scheduler(fresh_opt, cfg, total_steps=10)
    state = state_lib.load_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched)
    assert state["step"] == 1 and state["extra"] == {"cursor": {"epoch": 0, "position": 1}}
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items())
    for key, value in opt_state["state"][0].items():
        assert torch.equal(fresh_opt.state_dict()["state"][0][key], value)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the moment of saving
    # the checkpoint is also a plain HF model directory
    loaded, loaded_tok = load_pretrained(path)
    assert loaded_tok is not None and torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert "warmup_steps: 2" in (path / "config.yaml").read_text()


def test_atomic_checkpoint_survives_crash_mid_write(tmp_path, trainer, tokenizer, monkeypatch):
    good = _save(tmp_path, 1, trainer, tokenizer)
    weights = {k: v.clone() for k, v in trainer[0].state_dict().items()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing trainer_state.pt")

    with torch.no_grad():
        trainer[0].lm_head.weight.add_(1.0)
    monkeypatch.setattr(state_lib.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, trainer, tokenizer)
    with pytest.raises(KeyboardInterrupt):  # also a crash while overwriting the same step
        _save(tmp_path, 1, trainer, tokenizer)
    monkeypatch.undo()

    assert not state_lib.checkpoint_dir(tmp_path, 2).exists()
    leftovers = [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert leftovers  # the crashed writes left only temporary directories behind
    assert state_lib.resolve_resume(tmp_path) == good
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000001"
    model = init_model(InitConfig(preset="tiny", seed=9), tokenizer)
    state_lib.load_checkpoint(tmp_path, model)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    _save(tmp_path, 3, trainer, tokenizer)  # the next good save clears the leftovers
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_resolve_resume_picks_newest(tmp_path, trainer, tokenizer):
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        state_lib.resolve_resume(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        state_lib.resolve_resume(tmp_path / "nope")
    for step in (5, 10, 15):
        _save(tmp_path, step, trainer, tokenizer, keep_last=None)
    newest = state_lib.checkpoint_dir(tmp_path, 15)
    assert state_lib.resolve_resume(tmp_path) == newest
    assert state_lib.resolve_resume(tmp_path / "checkpoints") == newest
    older = state_lib.checkpoint_dir(tmp_path, 5)
    assert state_lib.resolve_resume(older) == older  # a checkpoint dir is taken as is
    # a stale `latest` (e.g. its checkpoint deleted by hand) falls back to the newest complete one
    (tmp_path / "checkpoints" / "latest").write_text("step-000099\n")
    assert state_lib.resolve_resume(tmp_path) == newest
    (tmp_path / "checkpoints" / "latest").unlink()
    assert state_lib.resolve_resume(tmp_path) == newest


def test_keep_last_prunes_old_checkpoints(tmp_path, trainer, tokenizer):
    for step in range(1, 6):
        _save(tmp_path, step, trainer, tokenizer, keep_last=2)
    assert [s for s, _ in state_lib.list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000004",
                                                                             "step-000005"]


def test_trainer_state_is_weights_only_loadable(tmp_path, trainer, tokenizer):
    path = _save(tmp_path, 3, trainer, tokenizer)
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and "rng" in state and "optimizer" in state


def test_rng_state_round_trip():
    state = get_rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[0] == again[0] and draws[1] == again[1] and torch.equal(draws[2], again[2])


def test_nan_guard_skips_step_and_keeps_weights(trainer):
    model, optimizer, scheduler, cfg = trainer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr_before = scheduler.get_last_lr()
    _backward(model, scale=float("nan"))
    norm, skipped = clip_and_step(model, optimizer, scheduler, cfg)
    assert skipped and not np.isfinite(norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert scheduler.get_last_lr() == lr_before and not optimizer.state
    _backward(model)
    norm, skipped = clip_and_step(model, optimizer, scheduler, cfg)
    assert not skipped and np.isfinite(norm)
    assert not torch.equal(before["lm_head.weight"], model.lm_head.weight)


def test_no_weight_decay_on_norms_and_clipping(trainer):
    model, _, _, _ = trainer
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1, grad_clip=0.5))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    _backward(model, scale=1e4)
    seen_norms = []
    original_step = optimizer.step

    def step_and_record(*args, **kwargs):  # the gradient the optimizer actually applies
        grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        seen_norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))
        return original_step(*args, **kwargs)

    optimizer.step = step_and_record
    norm, skipped = clip_and_step(model, optimizer, None, OptimConfig(grad_clip=0.5))
    assert not skipped and norm > 0.5  # the returned norm is the one before clipping
    assert seen_norms == [pytest.approx(0.5, rel=1e-4)]


def test_lr_schedule_warmup_cosine_constant():
    cosine = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cosine, 14) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(9, cosine, 14) == pytest.approx(0.55)  # half-way through the decay
    assert lr_factor(14, cosine, 14) == pytest.approx(0.1)
    assert lr_factor(100, cosine, 14) == pytest.approx(0.1)
    constant = OptimConfig(warmup_steps=2, schedule="constant")
    assert [lr_factor(s, constant, 10) for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="linear")


def test_metrics_logger_truncates_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in (1, 2, 3, 4):
        logger.log(step, {"loss": float(step), "t": torch.tensor(0.5)})
    logger.close()
    resumed = MetricsLogger(tmp_path, resume_step=2)  # steps 3 and 4 ran after the last checkpoint
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert rows[0]["t"] == 0.5
    # A fresh run in the same directory starts a new file; the old one is kept beside it.
    MetricsLogger(tmp_path).log(1, {"loss": 7.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 7.0)]
    assert len((tmp_path / "metrics.prev.jsonl").read_text().splitlines()) == 3
