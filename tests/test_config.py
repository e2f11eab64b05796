"""Configs: dataclasses <-> YAML, dotted overrides, type checks and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from dirl import config
from dirl.config import ConfigError
from dirl.model.factory import InitConfig


@dataclass
class Optim:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class Train:
    steps: int = 10
    bf16: bool = False
    optim: Optim = field(default_factory=Optim)


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    out: str | None = None
    train: Train = field(default_factory=Train)
    stop_ids: list[int] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)


def test_defaults_without_file_or_overrides():
    assert config.load(Recipe) == Recipe()


def test_yaml_round_trip(tmp_path):
    cfg = Recipe(name="x", seed=3, out="runs/a", stop_ids=[0, 5],
                 train=Train(steps=7, bf16=True, optim=Optim(lr=3e-5, betas=[0.8, 0.9], schedule="cosine")),
                 model={"num_hidden_layers": 3, "rope_theta": 500.0})
    path = tmp_path / "recipe.yaml"
    path.write_text(config.dump(cfg))
    assert config.load(Recipe, path) == cfg
    assert config.to_dict(config.load(Recipe, path)) == config.to_dict(cfg)


def test_partial_yaml_keeps_defaults_and_overrides_win(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("seed: 4\ntrain:\n  optim:\n    lr: 1e-2\n")  # YAML 1.1 reads 1e-2 as a string
    assert config.load(Recipe, path).train.optim.lr == 1e-2
    cfg = config.load(Recipe, path, ["train.optim.lr=2e-3", "train.steps=99"])
    assert cfg.seed == 4 and cfg.train.optim.lr == 2e-3 and cfg.train.steps == 99
    assert cfg.train.optim.betas == [0.9, 0.999] and cfg.name == "run"


@pytest.mark.parametrize("override, named", [
    ("sed=1", "sed"),
    ("train.optim.lrr=1", "train.optim.lrr"),
    ("trian.steps=1", "trian"),
])
def test_unknown_override_key_is_named(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config.load(Recipe, None, [override])


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        config.load(Recipe, None, ["sed=1"])


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        config.load(Recipe, path)


@pytest.mark.parametrize("override", [
    "seed=abc", "seed=1.5", "train.bf16=maybe", "train.optim.lr=fast", "train.optim.schedule=linear",
    "stop_ids=[a, b]", "train=3",
])
def test_bad_types_raise(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(Recipe, None, [override])


def test_scalar_coercions():
    cfg = config.load(Recipe, None, ["seed=2.0", "train.optim.lr=1", "train.bf16=true", "name=123",
                                     "out=none", "stop_ids=[1, 2]"])
    assert cfg.seed == 2 and isinstance(cfg.seed, int)
    assert cfg.train.optim.lr == 1.0 and isinstance(cfg.train.optim.lr, float)
    assert cfg.train.bf16 is True and cfg.name == "123" and cfg.out is None and cfg.stop_ids == [1, 2]
    assert config.load(Recipe, None, ["stop_ids=3,4"]).stop_ids == [3, 4]


def test_dict_fields_take_free_form_subkeys():
    cfg = config.load(Recipe, None, ["model.num_hidden_layers=3", "model.rope_theta=500.0", "model={a: 1}"])
    assert cfg.model == {"a": 1}  # a whole-mapping override replaces the dict
    cfg = config.load(Recipe, None, ["model.num_hidden_layers=3", "model.rope_theta=500.0"])
    assert cfg.model == {"num_hidden_layers": 3, "rope_theta": 500.0}


def test_setting_inside_a_value_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        config.load(Recipe, None, ["seed.x=1"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        config.load(Recipe, None, ["seed"])
    with pytest.raises(ConfigError, match="not found"):
        config.load(Recipe, tmp_path / "nope.yaml")


def test_repo_recipes_load():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    tiny = config.load(InitConfig, configs / "tiny.yaml", ["model.num_hidden_layers=1"])
    assert tiny.preset == "tiny" and tiny.model == {"num_hidden_layers": 1}
    assert config.load(InitConfig, configs / "small.yaml").preset == "small"


def test_a_partial_section_keeps_its_fields_own_defaults(tmp_path):
    """``RolloutConfig.sampling`` / ``EvalSpec.sampling`` defaults differ from ``SamplingSpec()``:
    overriding one key of the section (flag or YAML) must keep the others of the field's default."""
    from dirl.eval.config import EvalConfig
    from dirl.train.rl.config import RLConfig

    cfg = config.load(EvalConfig, None, ["sampling.max_new_tokens=16"])
    assert (cfg.sampling.max_new_tokens, cfg.sampling.temperature) == (16, 0.0)  # still greedy
    yaml_file = tmp_path / "rl.yaml"
    yaml_file.write_text("rollout:\n  sampling: {temperature: 0.5}\noptim: {lr: 0.1}\n")
    rl = config.load(RLConfig, yaml_file, ["rollout.group_size=2"])
    assert (rl.rollout.sampling.temperature, rl.rollout.sampling.max_new_tokens, rl.rollout.group_size) == (0.5, 32, 2)
    assert (rl.optim.lr, rl.optim.schedule) == (0.1, "constant")  # RL's constant schedule, not OptimConfig's
