"""One ``TrainerConfig``: the settings SFT and RL share are declared once and mean the same in both
(issue #25: ``dirl rl attn_impl=auto`` crashed at the first update while SFT accepted it), and
each rollout backend takes only its own options."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from dirl import cli
from dirl import config as config_lib
from dirl.backends.base import make_backend
from dirl.backends.options import HttpOptions, NativeOptions
from dirl.config import ConfigError
from dirl.train.config import TrainerConfig, trainer_defaults
from dirl.train.rl.config import RLConfig
from dirl.train.sft.config import SFTConfig
from dirl.train.state import list_checkpoints

SRC = Path(__file__).resolve().parents[1] / "src" / "dirl" / "train"
CONFIG_FILES = [SRC / "config.py", SRC / "sft" / "config.py", SRC / "rl" / "config.py"]
SHARED = [f.name for f in dataclasses.fields(TrainerConfig)]
RL_QUICK = ["max_steps=2", "rollout.num_prompts=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=8",
            "report_to=[jsonl]"]


def test_each_shared_setting_is_declared_once():
    """The grep of the issue: ``<name>:`` at a class body's indent, over the trainer configs."""
    text = "\n".join(path.read_text() for path in CONFIG_FILES)
    for name in SHARED:
        assert len(re.findall(rf"^    {name}: ", text, re.M)) == 1, name
    assert {"model", "out", "seed", "device", "attn_impl", "compute", "dist", "lora", "report_to", "log_every",
            "save_every", "eval", "keep_last", "max_steps", "stop_at_step", "block_size", "overwrite",
            "progress"} <= set(SHARED)


def test_both_trainers_share_the_declaration_and_validation():
    for cls in (SFTConfig, RLConfig):
        assert issubclass(cls, TrainerConfig)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert [name for name in fields if name in SHARED] == SHARED  # same order, same keys
    sft, rl = SFTConfig(), RLConfig()
    for name in ("device", "attn_impl", "keep_last", "progress", "stop_at_step", "seed", "report_to", "lora"):
        assert getattr(sft, name) == getattr(rl, name), name  # no drift in what the user did not set
    assert (sft.max_steps, rl.max_steps, sft.out, rl.out) == (300, 20, "runs/sft", "runs/rl")
    assert (rl.optim.lr, rl.optim.schedule, sft.optim.lr) == (1e-5, "constant", 1e-4)
    assert RLConfig().optim is not RLConfig().optim  # a trainer default is copied per instance
    for cls in (SFTConfig, RLConfig):
        for key, value in (("attn_impl", "eager"), ("keep_last", "0"), ("stop_at_step", "-1")):
            with pytest.raises(ConfigError, match=f"^{key}"):
                config_lib.load(cls, None, [f"{key}={value}"])


def test_trainer_defaults_refuses_a_second_declaration():
    with pytest.raises(TypeError, match="not a TrainerConfig setting"):
        trainer_defaults(max_stepz=3)(type("X", (TrainerConfig,), {}))

    class Again(TrainerConfig):
        __annotations__ = {"seed": int}
        seed = 3

    with pytest.raises(TypeError, match="declares the shared setting 'seed' again"):
        trainer_defaults(seed=4)(Again)


def test_rl_cli_runs_with_attn_impl_auto(tmp_path, capsys):
    """SFT's default, given to RL: resolved by the shared set-up (sdpa on CPU), not a crash."""
    out = tmp_path / "rl"
    assert cli.main(["rl", "attn_impl=auto", f"out={out}", *RL_QUICK, "max_steps=1", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1] and rows[0]["loss"] == rows[0]["loss"]  # a finite update ran
    assert (out / "final" / "model.safetensors").exists()


def test_rl_stop_at_step_and_keep_last(tmp_path):
    """RL honours the shared ``stop_at_step`` (a checkpoint, no ``final/``) and ``keep_last``."""
    cfg = config_lib.load(RLConfig, None, [f"out={tmp_path}", *RL_QUICK, "max_steps=3", "save_every=1",
                                           "keep_last=1", "stop_at_step=2", "progress=false"])
    from dirl.train.rl.loop import train_rl

    train_rl(cfg)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    assert not (tmp_path / "final").exists()


def test_an_option_of_another_backend_is_an_error():
    with pytest.raises(ConfigError, match=r"^rollout\.native\.compile is set, but rollout\.backend=http"):
        config_lib.load(RLConfig, None, ["rollout.backend=http", "rollout.http.url=http://127.0.0.1:9",
                                         "rollout.native.compile=true"])
    with pytest.raises(ConfigError, match=r"^rollout\.http\.url is set, but rollout\.backend=native"):
        config_lib.load(RLConfig, None, ["rollout.http.url=http://127.0.0.1:9"])
    cfg = config_lib.load(RLConfig, None, ["rollout.backend=checkpoint", "rollout.checkpoint.compile=true"])
    assert cfg.rollout.backend_options().compile and not cfg.rollout.native.compile
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout\.native\.bogus'"):
        config_lib.load(RLConfig, None, ["rollout.native.bogus=1"])


def test_make_backend_takes_only_the_chosen_backends_options():
    with pytest.raises(TypeError, match="takes NativeOptions, got HttpOptions"):
        make_backend("native", None, None, HttpOptions(url="http://127.0.0.1:9"))
    with pytest.raises(TypeError, match="compile"):  # no backend swallows a keyword it does not know
        from dirl.backends.http import HttpBackend
        HttpBackend(None, None, url="http://127.0.0.1:9", compile=True)
    assert NativeOptions().max_batch_rows == 256


def test_one_eval_section_for_both_trainers():
    """``eval.every / data / limit`` mean the same in SFT and RL; only the default limit differs."""
    sft = config_lib.load(SFTConfig, None, ["eval.every=5", "eval.data=task:arithmetic:test"])
    rl = config_lib.load(RLConfig, None, ["eval.every=5", "eval.data=task:arithmetic:test"])
    assert type(sft.eval) is type(rl.eval)
    assert (sft.eval.every, sft.eval.data, sft.eval.limit) == (5, "task:arithmetic:test", 32)
    assert (rl.eval.every, rl.eval.data, rl.eval.limit) == (5, "task:arithmetic:test", 64)
    with pytest.raises(ConfigError, match="eval.limit"):
        config_lib.load(RLConfig, None, ["eval.limit=0"])


def test_renamed_keys_still_load_from_recipes_overrides_and_saved_runs(tmp_path, capsys):
    """A recipe or a run saved before the renames (``eval_every``, ``rollout.url`` ...) loads with the
    values at their new keys, and stderr names the new key; a key given under both names keeps the new."""
    old = tmp_path / "old.yaml"
    old.write_text("eval_every: 4\neval_limit: 9\nrollout:\n  max_batch_rows: 12\n  compile: false\n")
    cfg = config_lib.load(RLConfig, old, ["eval_data=task:arithmetic:test"])
    assert (cfg.eval.every, cfg.eval.limit, cfg.eval.data) == (4, 9, "task:arithmetic:test")
    assert cfg.rollout.native.max_batch_rows == 12
    assert "eval_every is now eval.every" in capsys.readouterr().err
    http = config_lib.load(RLConfig, None, ["rollout.backend=http", "rollout.url=http://h:1"])
    assert http.rollout.http.url == "http://h:1"
    sft = config_lib.load(SFTConfig, None, ["eval_num=7"])
    assert sft.eval.limit == 7
    both = tmp_path / "both.yaml"
    both.write_text("eval_every: 4\neval: {every: 6}\n")
    assert config_lib.load(SFTConfig, both).eval.every == 6
    resumed, _ = config_lib.load_on_top(RLConfig, config_lib.load(RLConfig, None, ["eval.every=2"]), old)
    assert resumed.eval.every == 4  # the file's (old-named) key wins over the saved run's
