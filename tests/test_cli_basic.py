"""Smoke tests of the real ``dirl`` CLI: help, init, show-config, generate, bench.

``--help`` runs the installed entry point in a subprocess; the other commands run
``dirl.cli.main`` in-process (the same argument parsing and commands, without a
second interpreter importing torch for every call)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
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
    for name in ("init", "show-config", "generate", "bench", "sft", "rl"):
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


def test_bench_registry(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["dirl"])
    assert cli.main(["bench", "list"]) == 0
    assert "engine" in capsys.readouterr().out.split()
    assert cli.main(["bench", "no-such-bench"]) == 2
    assert "no-such-bench" in capsys.readouterr().err
    monkeypatch.setenv("DIRL_BENCHMARKS", "/nonexistent")
    assert cli.main(["bench", "engine"]) == 2
    assert "no benchmarks found" in capsys.readouterr().err


def test_bench_engine_quick_runs(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["dirl"])
    assert cli.main(["bench", "engine", "--quick", "--batch", "2", "--new-tokens", "8", "--threads", "1"]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines() if "=" in line)
    assert lines["outputs_identical"] == "True"
    for key in ("engine_speedup_vs_nocache", "engine_tokens_per_s", "nocache_tokens_per_s",
                "tokens_per_forward_dynamic", "tokens_per_forward_static", "long_gen_step_ratio",
                "engine_vs_ar_speedup_b1", "engine_vs_ar_speedup_b8", "batch_forward_ratio"):
        assert float(lines[key]) > 0, key


def _estimator_accs(out: str) -> dict[str, float]:
    return {line.split("=", 1)[0]: float(line.split("=", 1)[1]) for line in out.splitlines()
            if line.startswith("estimator_acc[")}


def test_bench_estimators_table_from_the_demo_summaries(capsys, monkeypatch, tmp_path):
    """The comparison's plumbing without the demo processes (their own test is test_demo.py):
    one ``dirl demo`` command per (variant, seed) with the quick settings, and a table, 95%
    t-intervals and ``estimator_acc`` / ``diff`` lines computed by hand from the summaries."""
    import subprocess

    fake = {"trace": (0.5, 0.25, 0.375), "mean_field": (0.125, 0.0, 0.125)}
    commands = []

    def fake_demo(cmd, **_):
        args = dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("-"))
        commands.append(args)
        acc = fake[args["estimator"]][int(args["seed"])]
        Path(args["out"]).mkdir(parents=True)
        (Path(args["out"]) / "summary.json").write_text(json.dumps(
            {"rl_acc": acc, "gain": acc, "rl_steps": 7, "stages_s": {"rl": 5.0}, "eval_prompts": 64}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_demo)
    monkeypatch.setattr("sys.argv", ["dirl"])
    bench = ["bench", "estimators", "--quick", "--estimators", "trace,mean_field,trace+value", "--seeds", "0,1,2",
             "--variant", "kl:estimator=trace,rl.algo.beta=0.5", "--pairs", "trace:mean_field",
             "--eval-limit", "64", "--out", str(tmp_path)]
    assert cli.main(bench) == 0
    out = capsys.readouterr().out
    assert sorted((c["estimator"], c["seed"]) for c in commands) == sorted(
        (e, str(s)) for e in ("trace", "mean_field", "trace", "trace") for s in range(3))
    assert all(c["rl_wall_s"] == "5.0" and c["eval_limit"] == "64" and c["rl_clock"] == "cpu" for c in commands)
    assert sum(c.get("rl.algo.beta") == "0.5" for c in commands) == 3  # the variant's own overrides
    assert sum(c.get("rl.algo.critic") == "value" for c in commands) == 3  # trace+value: trace with the critic
    # trace: mean 0.375, sd 0.125 -> 4.303 * 0.125 / sqrt(3) = 0.311 (t_0.975 with 2 dof)
    assert "| trace | 7/7/7 | 5/5/5 | 0.500 | 0.250 | 0.375 | 0.375 ± 0.311 | +0.375 |" in out
    assert "| kl | 7/7/7 | 5/5/5 | 0.500 | 0.250 | 0.375 | 0.375 ± 0.311 | +0.375 |" in out
    lines = {line.split("=", 1)[0]: float(line.split("=", 1)[1]) for line in out.splitlines()
             if re.match(r"^\w+\[.+\]=", line)}
    assert _estimator_accs(out) == {"estimator_acc[trace]": 0.375, "estimator_acc[mean_field]": 0.0833,
                                    "estimator_acc[kl]": 0.375, "estimator_acc[trace+value]": 0.375}
    # paired per seed: 0.375, 0.25, 0.25 -> mean 0.2917, sd 0.0722 -> 4.303 * 0.0722 / sqrt(3) = 0.1793
    assert lines["diff[trace-mean_field]"] == pytest.approx(0.2917, abs=1e-4)
    assert lines["diff_ci95[trace-mean_field]"] == pytest.approx(0.1793, abs=1e-4)
    assert "paired trace - mean_field over 3 seeds: +0.2917 ± 0.1793 (95% t): resolved" in out
    # --reuse: the finished runs are read back, no demo is started
    commands.clear()
    assert cli.main([*bench, "--reuse"]) == 0
    assert commands == [] and "| trace | 7/7/7 |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_estimators_quick_runs(capsys, monkeypatch, tmp_path):
    """The equal-wall-time comparison end to end: one real demo process per estimator (~30 s)."""
    monkeypatch.setattr("sys.argv", ["dirl"])
    assert cli.main(["bench", "estimators", "--quick", "--estimators", "trace,mean_field", "--seeds", "0",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| trace |" in out and "| mean_field |" in out
    summaries = {name: json.loads((tmp_path / f"{name}-s0" / "summary.json").read_text())
                 for name in ("trace", "mean_field")}
    assert _estimator_accs(out) == {f"estimator_acc[{name}]": round(s["rl_acc"], 4) for name, s in summaries.items()}
    assert all(s["estimator"] == name and s["rl_steps"] >= 1 for name, s in summaries.items())
    assert (tmp_path / "trace-s0" / "curves.png").exists()
