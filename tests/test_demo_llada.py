"""The full-attention demo (configs/demo-llada.yaml): its recipe files agree with the shipped
checkpoint, which loads as a LLaDA model, and the ``shipped-<name>`` / ``init:<family>/<preset>`` specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dirl import config as config_lib
from dirl.demo import ASSETS, SHIPPED_SFT, DemoConfig, shipped_sft
from dirl.model.checkpoint import load_config
from dirl.model.loading import init_spec, load_model_spec
from dirl.rollout import check_for_model
from dirl.train.sft.config import SFTConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG, RECIPE = REPO / "configs/demo-llada.yaml", REPO / "configs/demo-sft-llada.yaml"
ANNEAL = REPO / "configs/demo-sft-llada-anneal.yaml"  # stage 2: the shipped checkpoint's recipe


def test_shipped_names():
    assert shipped_sft("shipped") == SHIPPED_SFT
    assert shipped_sft("shipped-llada") == ASSETS / "demo-sft-llada"
    assert [shipped_sft(s) for s in ("train", "shipped-", "shipped-../x", "runs/x")] == [None] * 4


def test_init_spec_names_a_family():
    assert init_spec("init:demo") == ("sdar", "demo")
    assert init_spec("init:llada/tiny") == ("llada", "tiny")
    model, _ = load_model_spec("init:llada/tiny")
    assert model.arch.family == "llada" and model.arch.attention == "bidirectional"


def test_llada_demo_config_recipe_and_checkpoint_agree():
    cfg = config_lib.load(DemoConfig, CONFIG)
    shipped = shipped_sft(cfg.sft)
    assert shipped == ASSETS / "demo-sft-llada"
    # The shipped checkpoint carries its recipe, stage 2 (annealing), which starts from stage 1's
    # output; sft=train reruns stage 1 (from init) on the same task as the SDAR demo.
    assert (REPO / cfg.sft_recipe).resolve() == RECIPE
    assert (shipped / "recipe.yaml").read_text() == ANNEAL.read_text()
    recipe, anneal = config_lib.load(SFTConfig, RECIPE), config_lib.load(SFTConfig, ANNEAL)
    assert init_spec(recipe.model) == ("llada", "demo")
    assert Path(anneal.model) == Path(recipe.out) / "final" and anneal.data == recipe.data
    assert (cfg.task, cfg.task_params) == (DemoConfig().task, DemoConfig().task_params)
    arch = load_config(shipped).arch
    assert (arch.family, arch.attention) == ("llada", "bidirectional")
    check_for_model(cfg.rl.rollout.sampling.params(), arch)  # the RL sampling runs on this model
    size = sum(f.stat().st_size for f in shipped.iterdir())
    assert size <= 20 * 2**20, f"shipped SFT checkpoint is {size} bytes (limit 20 MB)"


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
