"""The compiled-step setting (``compile``, :class:`dirl.rollout.EngineOptions`) reaches every Engine
built for the user: RL rollouts, ``dirl serve``, ``dirl eval``, ``dirl generate --compile``.

Compiling costs ~50 s, so nothing here compiles: ``compiled_forward`` is replaced by an eager
stand-in that records the model it was given, and the engine's step runs through it.
"""

from __future__ import annotations

import json
import sys

import pytest

from dirl import cli
from dirl import config as config_lib
from dirl.config import ConfigError
from dirl.engine import engine as engine_mod
from dirl.eval.config import EvalConfig, load_eval_rows
from dirl.eval.heldout import evaluate_rows
from dirl.model.forward import Readout
from dirl.rollout import SamplingSpec
from dirl.serve import ServeConfig
from dirl.serve.app import create_app
from dirl.train.rl.config import RLConfig, RolloutConfig
from dirl.train.rl.loop import build_run



@pytest.fixture
def compiled(monkeypatch) -> list:
    """Record every model the engine would compile (and every step it runs) without compiling."""
    record: list = []

    def stand_in(model):
        record.append(model)

        def step(ids, pos, step, logits_index):
            record.append("step")
            return model.forward(ids, pos, None, cache=step, readout=Readout(logits_index), attn_impl="sdpa")
        return step

    monkeypatch.setattr(engine_mod, "compiled_forward", stand_in)
    return record


@pytest.mark.parametrize("backend", ["native", "checkpoint"])
def test_rollout_compile_reaches_the_backend_engine(tmp_path, monkeypatch, compiled, backend):
    cfg = config_lib.load(RLConfig, None, [f"out={tmp_path}", "rewards={rl_rewards:digit_fraction: 1.0}",
                                           f"rollout.backend={backend}", f"rollout.{backend}.compile=true"])
    run = build_run(cfg)
    try:
        engine = run.collector.backend.engine
        assert engine.compiled and compiled == [engine.model]
    finally:
        run.collector.backend.close()
    assert RolloutConfig().native.compile is False and RolloutConfig().checkpoint.compile is False


def test_serve_compile_reaches_the_batcher_engine(tiny_model, tokenizer, compiled):
    on = create_app(tiny_model, tokenizer, config_lib.load(ServeConfig, None, ["compile=true"]))
    assert on.state.dirl.batcher.engine.compiled and compiled == [tiny_model]
    off = create_app(tiny_model, tokenizer, ServeConfig())
    assert off.state.dirl.batcher.engine.compiled is False and compiled == [tiny_model]


def test_eval_compile_runs_the_compiled_step(tiny_model, tokenizer, compiled):
    cfg = EvalConfig(data="task:arithmetic", limit=1, compile=True, sampling=SamplingSpec(max_new_tokens=4,
                                                                                          temperature=0.0))
    evaluate_rows(tiny_model, tokenizer, load_eval_rows(cfg), cfg)
    assert compiled[0] is tiny_model and compiled.count("step") > 0


def test_generate_compile_flag_gives_the_eager_tokens(tiny_checkpoint, compiled, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dirl"])
    common = ["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--json", "max_new_tokens=8",
              "temperature=0", "stop_ids=[]"]
    assert cli.main(common) == 0 and compiled == []
    eager = json.loads(capsys.readouterr().out)
    assert cli.main([*common, "--compile"]) == 0 and compiled.count("step") > 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == eager["token_ids"]


@pytest.mark.parametrize("cls, key", [(RLConfig, "rollout.native.compile"), (ServeConfig, "compile"),
                                      (EvalConfig, "compile")])
def test_a_bad_compile_value_names_the_key(cls, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected bool, got 'maybe'"):
        config_lib.load(cls, None, [f"{key}=maybe"])


def test_rl_cli_exits_2_on_a_bad_compile_value(capsys):
    assert cli.main(["rl", "rollout.native.compile=2"]) == 2
    assert "rollout.native.compile" in capsys.readouterr().err
