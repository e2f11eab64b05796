"""The full-attention demos (configs/demo-dream.yaml, configs/demo-llada.yaml): their recipe chains
agree with the shipped checkpoints, which load as their family's models, ``sft=train`` chains the
stages, and the ``shipped-<name>`` / ``init:<family>/<preset>`` specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dirl import config as config_lib
from dirl.demo import ASSETS, SHIPPED_SFT, DemoConfig, sft_recipes, shipped_sft
from dirl.model.checkpoint import load_config
from dirl.model.loading import init_spec, load_model_spec
from dirl.rollout import check_for_model
from dirl.train.sft.config import SFTConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/demo-llada.yaml"
# demo config -> (shipped name, family, the stages in order: the shipped checkpoint's recipe is the last)
DEMOS = {"demo-dream": ("dream", ["demo-sft-dream-ar", "demo-sft-dream"]),
         "demo-llada": ("llada", ["demo-sft-llada", "demo-sft-llada-anneal"])}


def test_shipped_names():
    assert shipped_sft("shipped") == SHIPPED_SFT
    assert shipped_sft("shipped-llada") == ASSETS / "demo-sft-llada"
    assert [shipped_sft(s) for s in ("train", "shipped-", "shipped-../x", "runs/x")] == [None] * 4


def test_init_spec_names_a_family():
    assert init_spec("init:demo") == ("sdar", "demo")
    assert init_spec("init:llada/tiny") == ("llada", "tiny")
    model, _ = load_model_spec("init:llada/tiny")
    assert model.arch.family == "llada" and model.arch.attention == "bidirectional"


@pytest.mark.parametrize("demo", list(DEMOS))
def test_demo_config_recipes_and_checkpoint_agree(demo):
    family, stages = DEMOS[demo]
    cfg = config_lib.load(DemoConfig, REPO / f"configs/{demo}.yaml")
    shipped = shipped_sft(cfg.sft)
    assert shipped == ASSETS / f"demo-sft-{family}"
    # sft=train runs the stages in order; the shipped checkpoint carries the last one's recipe,
    # and every later stage starts from the stage before's output.
    paths = [REPO / f"configs/{name}.yaml" for name in stages]
    assert [(REPO / p).resolve() for p in cfg.sft_recipe] == paths
    assert (shipped / "recipe.yaml").read_text() == paths[-1].read_text()
    recipes = [config_lib.load(SFTConfig, p) for p in paths]
    assert init_spec(recipes[0].model) == (family, "demo")
    for before, after in zip(recipes, recipes[1:]):
        assert Path(after.model) == Path(before.out) / "final" and after.data == before.data
    assert (cfg.task, cfg.task_params) == (DemoConfig().task, DemoConfig().task_params)
    arch = load_config(shipped).arch
    assert (arch.family, arch.attention) == (family, "bidirectional")
    check_for_model(cfg.rl.rollout.sampling.params(), arch)  # the RL sampling runs on this model
    size = sum(f.stat().st_size for f in shipped.iterdir())
    assert size <= 20 * 2**20, f"shipped SFT checkpoint is {size} bytes (limit 20 MB)"


def test_sft_train_chains_the_stages(tmp_path):
    """sft=train: each stage is pointed at the run's data and its own directory, and starts from
    the final model of the stage before; one stage keeps the plain ``out/sft``."""
    cfg = config_lib.load(DemoConfig, REPO / "configs/demo-dream.yaml", ["sft_overrides=[max_steps=3]"])
    data = {"sft": tmp_path / "data/sft.jsonl"}
    first, second = sft_recipes(cfg, data, tmp_path)
    assert (first.out, second.out) == (str(tmp_path / "sft-1"), str(tmp_path / "sft-2"))
    assert second.model == str(tmp_path / "sft-1" / "final") and first.model == "init:dream/demo"
    assert first.objective == "autoregressive" and second.objective == "nelbo"
    assert first.data.source == second.data.source == str(data["sft"]) and first.max_steps == second.max_steps == 3
    (only,) = sft_recipes(config_lib.load(DemoConfig, None), data, tmp_path)
    assert only.out == str(tmp_path / "sft") and init_spec(only.model) == ("sdar", "demo")


def test_unknown_shipped_name_is_named(tmp_path):
    cfg = config_lib.load(DemoConfig, CONFIG, [f"out={tmp_path}", "sft=shipped-nothing", "progress=false",
                                                "num_train=16", "eval_limit=8"])
    from dirl.demo import run_demo

    with pytest.raises(config_lib.ConfigError, match="sft=shipped-nothing: no shipped SFT checkpoint"):
        run_demo(cfg)


@pytest.mark.parametrize("chunk, every, calls", [(3, 0, [3, 6, 7]), (0, 0, [7]), (0, 2, [2, 4, 6, 7]), (5, 2, [5, 7])])
def test_rl_chunk_sets_the_budget_checks(monkeypatch, tmp_path, chunk, every, calls):
    """``rl_wall_s`` > 0: RL runs ``rl_chunk`` steps per call (else ``rl.eval.every``, else all),
    each call resuming the last; a budget never spent runs every chunk to ``max_steps``."""
    from dirl.demo import rl_stage
    from dirl.train import state
    from dirl.train.rl import loop

    seen = []
    monkeypatch.setattr(loop, "train_rl", lambda rl, resume=None, progress=True: seen.append(rl.max_steps) or tmp_path)
    monkeypatch.setattr(state, "resolve_resume", lambda run_dir: "ckpt")
    cfg = DemoConfig(rl_wall_s=1e9, rl_chunk=chunk, progress=False)
    cfg.rl.max_steps, cfg.rl.eval.every = 7, every
    assert rl_stage(cfg, cfg.rl) == (tmp_path, 7)
    assert seen == calls


@pytest.mark.integration
def test_dream_demo_sft_train_runs_both_stages(tmp_path):
    """``sft=train`` end to end, shortened: the causal-LM stage, the NELBO stage from its output, RL."""
    from dirl.demo import run_demo

    cfg = config_lib.load(DemoConfig, REPO / "configs/demo-dream.yaml", [
        f"out={tmp_path}", "sft=train", "sft_overrides=[max_steps=2]", "num_train=64", "eval_limit=8",
        "rl.max_steps=2", "progress=false"])
    summary = run_demo(cfg)
    stage1, stage2 = (load_config(tmp_path / name / "final").arch for name in ("sft-1", "sft-2"))
    assert stage1.family == stage2.family == "dream"
    assert summary["sft_source"] == "train" and summary["rl_steps"] == 2
    assert 0.0 <= summary["sft_acc"] <= 1.0 and 0.0 <= summary["rl_acc"] <= 1.0
