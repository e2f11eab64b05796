"""The bad-input matrix (issue 13): every command, every kind of bad input -> ONE line
``dirl <command>: <message naming the key, file or line>`` on stderr, exit status 2, no
traceback, and nothing created for errors found while checking the config.

Runs in-process through :func:`dirl.cli.main` (the console script's code path) in a fresh
working directory per case; the files a case needs are made by the ``files`` fixture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dirl.cli import main
from dirl.model.factory import InitConfig, init_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    good = init_checkpoint(InitConfig(preset="tiny"), root / "good")
    truncated = init_checkpoint(InitConfig(preset="tiny"), root / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "bad.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n{"question": "no answer"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "latin1.jsonl").write_bytes('{"question": "1+1?", "answer": "2"}\n{"question": "caf\xe9", '
                                        '"answer": "1"}\n'.encode("latin-1"))
    (root / "run" / "checkpoints").mkdir(parents=True)  # a run directory without any checkpoint
    (root / "held" / "final").mkdir(parents=True)        # a run directory holding a finished run
    (root / "held" / "config.yaml").write_text("max_steps: 1\n")
    return {"good": good, "truncated": truncated, "root": root}


# (command line with {good} {truncated} {root} placeholders, text the one error line must contain)
CASES = {
    # rl: out-of-range values, resolved names, data and checkpoints -- all before any loading
    "rl-num-prompts": ("rl rollout.num_prompts=-2", "rollout.num_prompts must be > 0"),
    "rl-max-steps": ("rl max_steps=-3", "max_steps must be > 0"),
    "rl-save-every": ("rl save_every=-5", "save_every must be >= 0"),
    "rl-lr": ("rl optim.lr=-1e-3", "optim.lr must be a finite number in (0, 1]"),
    "rl-lr-nan": ("rl optim.lr=nan", "optim.lr"),
    "rl-group-size": ("rl rollout.group_size=0", "rollout.group_size must be > 0"),
    "rl-max-new-tokens": ("rl rollout.sampling.max_new_tokens=-5", "rollout.sampling.max_new_tokens must be > 0"),
    "rl-temperature": ("rl rollout.sampling.temperature=-1", "rollout.sampling.temperature must be"),
    "rl-top-p": ("rl rollout.sampling.top_p=1.5", "rollout.sampling.top_p must be in (0, 1]"),
    "rl-steps-per-block": ("rl rollout.sampling.steps_per_block=9", "rollout.sampling.steps_per_block must be in"),
    "rl-block-size": ("rl block_size=0", "block_size must be > 0"),
    "rl-block-size-context": ("rl block_size=100000", "block_size=100000 is more than the model's context"),
    "rl-block-size-sampling": ("rl model={good} block_size=2 rollout.sampling.unmasking=static",
                               "rollout.sampling.steps_per_block must be in [1, 2] (1 to the block size), got 4 "
                               "(with block_size=2)"),
    "rl-block-size-schedule": ("rl block_size_schedule=4:8,2:4", "block_size_schedule must look like '0:4,100:8'"),
    "rl-block-size-schedule-sampling": ("rl block_size_schedule=0:4,5:2 rollout.sampling.steps_per_block=3",
                                        "got 3 (with block_size_schedule=2)"),
    "rl-block-size-http": ("rl rollout.backend=http rollout.http.url=http://127.0.0.1:9 block_size=8",
                           "block_size cannot change with rollout.backend=http"),
    "rl-estimator": ("rl algo.estimator=bogus", "algo.estimator must be one of"),
    "rl-beta": ("rl algo.beta=-1", "algo.beta"),
    "rl-mc-sampling": ("rl algo.mc_sampling=sobol", "algo.mc_sampling must be one of"),
    "rl-mc-floor": ("rl algo.mc_floor=0", "algo.mc_floor must be in (0, 1]"),
    "rl-reward": ("rl rewards.nope=1", "unknown reward 'nope'"),
    "rl-reward-weight": ("rl rewards.math=inf", "rewards.math must be a finite number"),
    "rl-missing-model": ("rl model={root}/missing", "config.json"),
    "rl-truncated-model": ("rl model={truncated} max_steps=1", "model.safetensors"),
    "rl-bad-line": ("rl data={root}/bad.jsonl", "bad.jsonl:2: missing field 'answer'"),
    "rl-empty-data": ("rl data={root}/empty.jsonl", "empty.jsonl: holds no rows"),
    "rl-not-utf8": ("rl data={root}/latin1.jsonl", "latin1.jsonl:2: not UTF-8"),
    "rl-resume-missing": ("rl --resume {root}/nowhere", "does not exist"),
    "rl-resume-no-checkpoint": ("rl --resume {root}/run", "neither a checkpoint"),
    "rl-out-holds-a-run": ("rl out={root}/held", "already holds a run"),
    # sft
    "sft-keep-last": ("sft keep_last=0", "keep_last must be > 0"),
    "sft-max-steps": ("sft max_steps=-3", "max_steps must be > 0"),
    "sft-lr": ("sft optim.lr=-1e-3", "optim.lr must be a finite number in (0, 1]"),
    "sft-betas": ("sft optim.betas=[0.9,1.5]", "optim.betas"),
    "sft-block-size": ("sft block_size=-1", "block_size must be > 0"),
    "sft-bad-line": ("sft data.source={root}/bad.jsonl", "bad.jsonl:2"),
    "sft-empty-data": ("sft data.source={root}/empty.jsonl", "holds no rows"),
    "sft-not-utf8": ("sft data.source={root}/latin1.jsonl", "latin1.jsonl:2: not UTF-8"),
    "sft-truncated-model": ("sft model={truncated}", "model.safetensors"),
    "sft-resume-missing": ("sft --resume {root}/nowhere", "does not exist"),
    "sft-out-holds-a-run": ("sft out={root}/held", "already holds a run"),
    "sft-unknown-key": ("sft optim.learning_rate=1", "unknown config key 'optim.learning_rate'"),
    # eval
    "eval-missing-model": ("eval --model {root}/missing --data task:arithmetic", "config.json"),
    "eval-truncated-model": ("eval --model {truncated} --data task:arithmetic limit=1", "model.safetensors"),
    "eval-empty-data": ("eval --model {good} --data {root}/empty.jsonl", "holds no rows"),
    "eval-not-utf8": ("eval --model {good} --data {root}/latin1.jsonl", "latin1.jsonl:2: not UTF-8"),
    "eval-reward": ("eval --model {good} --data task:arithmetic reward=nope", "unknown reward 'nope'"),
    "eval-top-p": ("eval --model {good} --data task:arithmetic sampling.top_p=0", "sampling.top_p must be in"),
    "eval-greedy-k": ("eval --model {good} --data task:arithmetic k=4", "temperature"),
    "eval-k": ("eval --model {good} --data task:arithmetic k=0", "k must be >= 1"),
    # generate
    "generate-missing-model": ("generate --model {root}/missing --prompt hi", "config.json"),
    "generate-truncated-model": ("generate --model {truncated} --prompt hi", "model.safetensors"),
    "generate-max-new-tokens": ("generate --model {good} --prompt hi max_new_tokens=-5", "max_new_tokens"),
    "generate-temperature": ("generate --model {good} --prompt hi temperature=-1", "temperature must be"),
    "generate-top-p": ("generate --model {good} --prompt hi top_p=2", "top_p must be in (0, 1]"),
    # serve (all refused before the server starts)
    "serve-missing-model": ("serve --no-updates --model {root}/missing", "config.json"),
    "serve-truncated-model": ("serve --no-updates --model {truncated}", "model.safetensors"),
    "serve-port": ("serve --no-updates --model {good} --port 70000", "port must be a port"),
    "serve-max-n": ("serve --no-updates --model {good} max_n=0", "max_n must be > 0"),
    "serve-dtype": ("serve --no-updates --model {good} param_dtype=float64", "param_dtype must be one of"),
    # init, show-config, demo
    "init-preset": ("init --out {root}/x preset=nope", "preset must be one of"),
    "init-model-field": ("init --out {root}/x model.hiden_size=8", "model.hiden_size is not a model config field"),
    "show-config-key": ("show-config --kind rl algo.estimatr=trace", "unknown config key 'algo.estimatr'"),
    "demo-estimator": ("demo estimator=bogus", "estimator"),
    "config-file-missing": ("sft --config {root}/nowhere.yaml", "nowhere.yaml not found"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(name, files, tmp_path, monkeypatch, capsys):
    command, expected = CASES[name]
    argv = command.format(**files).split()
    monkeypatch.setattr(sys, "argv", ["dirl"])  # main() rewrites sys.argv
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith(f"dirl {argv[0]}: "), captured.err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()  # nothing was created
    assert not (files["root"] / "held" / "checkpoints").exists()  # the held run is untouched


def test_debug_shows_the_traceback(files, monkeypatch):
    from dirl.config import ConfigError

    monkeypatch.setattr(sys, "argv", ["dirl"])
    with pytest.raises(ConfigError, match="max_steps"):
        main(["--debug", "rl", "max_steps=-3"])
    with pytest.raises(ConfigError, match="keep_last"):
        main(["sft", "keep_last=0", "--debug"])


def test_the_readme_eval_example_with_k_4_runs(files, tmp_path, monkeypatch, capsys):
    """README: ``dirl eval ... k=4 sampling.temperature=1.0`` (greedy k=4 is the error above)."""
    monkeypatch.setattr(sys, "argv", ["dirl"])
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", str(files["good"]), "--data", "task:arithmetic", "--reward", "math", "k=4",
            "sampling.temperature=1.0", "limit=2", "sampling.max_new_tokens=8", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_samples"] == 8
