"""The benchmarks package: its registry and ``python -m benchmarks`` runner, ``benchmarks.engine --quick``
end to end, and ``benchmarks.estimators``' table from demo summaries (the other quick runs: test_bench_quick.py,
test_estimator_bias.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import available, engine, estimators
from benchmarks.__main__ import main as run_all


def test_registry_lists_the_benchmark_modules_but_not_helpers(capsys):
    names = available()
    assert {"engine", "estimator_bias", "serve_limits", "memory"} <= set(names)
    assert not any(name.startswith("_") for name in names)  # _engine_scale is a helper
    assert run_all(["--list"]) == 0
    assert capsys.readouterr().out.split() == names


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # engine is imported above
def test_run_all_reports_a_failing_benchmark(capsys, monkeypatch):
    monkeypatch.setattr("benchmarks.__main__.available", lambda: ["engine"])
    assert run_all(["--no-such-option"]) == 1  # argparse exits 2 inside the benchmark: caught, reported
    captured = capsys.readouterr()
    assert "== bench engine: FAILED (2)" in captured.out and "failed: engine" in captured.err


@pytest.mark.integration  # a whole benchmark run (~5 s): with the other quick benchmarks in test_bench_quick
def test_engine_quick_runs(capsys):
    assert engine.main(["--quick", "--batch", "2", "--new-tokens", "8", "--threads", "1"]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines() if "=" in line)
    assert lines["outputs_identical"] == "True"
    for key in ("engine_speedup_vs_nocache", "engine_tokens_per_s", "nocache_tokens_per_s",
                "tokens_per_forward_dynamic", "tokens_per_forward_static", "long_gen_step_ratio",
                "engine_vs_ar_speedup_b1", "engine_vs_ar_speedup_b8", "batch_forward_ratio",
                "batch_occupancy_continuous_r4", "calls_vs_ideal_chunked_r8", "rl_rollout_s_continuous"):
        assert float(lines[key]) > 0, key
    assert lines["throughput_identical_chunked_r8"] == lines["throughput_identical_longest_first_r4"] == "True"
    assert lines["fullattn_throughput_identical_chunked_r8"] == lines["rlscale_throughput_identical_chunked_r6"] \
        == "True"
    assert float(lines["fullattn_batch_occupancy_continuous_r4"]) > float(lines["fullattn_batch_occupancy_chunked_r4"])


def _estimator_accs(out: str) -> dict[str, float]:
    return {line.split("=", 1)[0]: float(line.split("=", 1)[1]) for line in out.splitlines()
            if line.startswith("estimator_acc[")}


def test_estimators_table_from_the_demo_summaries(capsys, monkeypatch, tmp_path):
    """The comparison's plumbing without the demo processes (their own test is test_demo.py):
    one ``dirl demo`` command per (variant, seed) with the quick settings, and a table, 95%
    t-intervals and ``estimator_acc`` / ``diff`` lines computed by hand from the summaries."""
    import subprocess

    fake = {"trace": (0.5, 0.25, 0.375), "mean_field": (0.125, 0.0, 0.125)}
    commands = []

    def fake_demo(cmd, **_):
        args = dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("-"))
        args["--config"] = cmd[cmd.index("--config") + 1]
        commands.append(args)
        acc = fake[args["estimator"]][int(args["seed"])]
        Path(args["out"]).mkdir(parents=True)
        (Path(args["out"]) / "summary.json").write_text(json.dumps(
            {"rl_acc": acc, "gain": acc, "rl_steps": 7, "stages_s": {"rl": 5.0}, "eval_prompts": 64}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_demo)
    bench = ["--quick", "--estimators", "trace,mean_field,trace+value", "--seeds", "0,1,2",
             "--variant", "kl:estimator=trace,rl.algo.beta=0.5", "--pairs", "trace:mean_field",
             "--eval-limit", "64", "--out", str(tmp_path)]
    estimators.main(bench)
    out = capsys.readouterr().out
    assert sorted((c["estimator"], c["seed"]) for c in commands) == sorted(
        (e, str(s)) for e in ("trace", "mean_field", "trace", "trace") for s in range(3))
    assert all(c["rl_wall_s"] == "5.0" and c["eval_limit"] == "64" and c["rl_clock"] == "cpu" for c in commands)
    assert {Path(c["--config"]).relative_to(estimators.REPO).as_posix() for c in commands} == {"configs/demo.yaml"}
    assert not any("rl_chunk" in c for c in commands)
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
    estimators.main([*bench, "--reuse"])
    assert commands == [] and "| trace | 7/7/7 |" in capsys.readouterr().out
    # --config / --chunk: another demo recipe, its RL budget checked every 2 steps
    estimators.main(["--quick", "--estimators", "trace", "--seeds", "0", "--config", "configs/demo-llada.yaml",
                     "--chunk", "2", "--out", str(tmp_path / "fa")])
    assert [(Path(c["--config"]).relative_to(estimators.REPO).as_posix(), c["rl_chunk"]) for c in commands] == [
        ("configs/demo-llada.yaml", "2")]


@pytest.mark.slow
def test_estimators_quick_runs(capsys, tmp_path):
    """The equal-wall-time comparison end to end: one real demo process per estimator (~30 s)."""
    estimators.main(["--quick", "--estimators", "trace,mean_field", "--seeds", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| trace |" in out and "| mean_field |" in out
    summaries = {name: json.loads((tmp_path / f"{name}-s0" / "summary.json").read_text())
                 for name in ("trace", "mean_field")}
    assert _estimator_accs(out) == {f"estimator_acc[{name}]": round(s["rl_acc"], 4) for name, s in summaries.items()}
    assert all(s["estimator"] == name and s["rl_steps"] >= 1 for name, s in summaries.items())
    assert (tmp_path / "trace-s0" / "curves.png").exists()
