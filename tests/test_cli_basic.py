"""Smoke tests of the real ``dirl`` CLI: help, init, show-config, generate.

``--help`` runs the installed entry point in a subprocess; the other commands run
``dirl.cli.main`` in-process (the same argument parsing and commands, without a
second interpreter importing torch for every call)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dirl import cli

REPO = Path(__file__).resolve().parents[1]
DIRL = [sys.executable, "-m", "dirl.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _dirl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*DIRL, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    """``dirl init`` of the tiny recipe, through the CLI (shared by this module's tests)."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["init", "--config", str(REPO / "configs/tiny.yaml"), "--out", str(out), "seed=1"]) == 0
    assert "wrote" in stdout.getvalue()
    return out


def test_help_lists_commands():
    proc = _dirl("--help")
    for name in ("init", "show-config", "generate", "sft", "rl"):
        assert name in proc.stdout


def test_init_writes_checkpoint(init_dir):
    cfg = json.loads((init_dir / "config.json").read_text())
    assert cfg["block_size"] == 4 and cfg["num_hidden_layers"] == 2
    assert (init_dir / "model.safetensors").exists() and (init_dir / "tokenizer.json").exists()


def test_show_config_resolves_overrides_and_rejects_unknown_keys(capsys):
    tiny = str(REPO / "configs/tiny.yaml")
    assert cli.main(["show-config", "--config", tiny, "seed=3", "model.num_hidden_layers=1"]) == 0
    out = capsys.readouterr().out
    assert "preset: tiny" in out and "seed: 3" in out and "num_hidden_layers: 1" in out
    assert cli.main(["show-config", "--config", tiny, "sede=3"]) == 2
    assert "sede" in capsys.readouterr().err


def test_generate_json(init_dir, capsys):
    assert cli.main(["generate", "--model", str(init_dir), "--prompt", "12+34=", "--json",
                     "max_new_tokens=9", "temperature=0.7", "seed=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) == {"text", "token_ids", "steps", "logps", "tokens_per_forward", "finish_reason"}
    assert 1 <= len(out["token_ids"]) <= 9 and len(out["steps"]) == len(out["logps"]) == len(out["token_ids"])
    assert out["finish_reason"] in ("stop", "length") and out["tokens_per_forward"] > 0
    assert all(lp <= 0 for lp in out["logps"])
    if out["finish_reason"] == "length":
        assert len(out["token_ids"]) == 9


def test_generate_in_process_text_chat_and_errors(init_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["dirl"])
    common = ["generate", "--model", str(init_dir), "--prompt", "hi", "max_new_tokens=6", "temperature=0"]
    assert cli.main([*common, "--json", "stop_ids=[]"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["finish_reason"] == "length" and len(plain["token_ids"]) == 6  # no stop ids: full length
    assert cli.main(common + ["stop_ids=[]"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == plain["text"]
    assert cli.main([*common, "--json", "--no-cache", "stop_ids=[]"]) == 0  # the reference decoder agrees
    reference = json.loads(capsys.readouterr().out)
    assert (reference["token_ids"], reference["steps"]) == (plain["token_ids"], plain["steps"])
    assert cli.main([*common, "--chat", "--json"]) == 0
    chat = json.loads(capsys.readouterr().out)
    assert chat["finish_reason"] in ("stop", "length")
    assert cli.main([*common, "temperature=hot"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert cli.main([*common, "unmasking=random"]) == 2  # SamplingParams.validate -> ValueError
    assert "unmasking" in capsys.readouterr().err
