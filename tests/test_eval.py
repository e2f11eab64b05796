"""``dirl eval`` and ``dirl.eval``: pass@k by hand, summary arithmetic, oracle plumbing, the CLI."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from dirl.config import ConfigError
from dirl.data import build_prompt_ids as build_prompts
from dirl.data import load_prompt_rows
from dirl.backends import native
from dirl.eval.config import EvalConfig, load_eval_rows, resolve_defaults
from dirl.eval.heldout import evaluate_rows
from dirl.model.factory import InitConfig, init_model
from dirl.eval.metrics import SUMMARY_KEYS, mean_pass_at_k, pass_at_k, summarize
from dirl.rollout import Rollout, SamplingSpec

SHARED = Path(__file__).resolve().parents[2] / "shared"
GSM8K = SHARED / "data" / "gsm8k_test.jsonl"
MATH500 = SHARED / "data" / "math500.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM8K.exists(), reason=f"{GSM8K} not available")


# ----------------------------------------------------------------------------- pass@k


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # k = 1 is c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong samples: every subset passes
    assert pass_at_k(3, 0, 2) == 0.0


@pytest.mark.parametrize("flags, expected", [([0, 0, 0, 0], 0.0), ([0, 0, 1, 0], 1.0), ([1, 1, 1, 1], 1.0)])
def test_pass_at_k_with_n_equal_k_is_any_correct(flags, expected):
    assert pass_at_k(len(flags), sum(flags), len(flags)) == expected


def test_mean_pass_at_k_and_bad_arguments():
    assert mean_pass_at_k([[True, False], [False, False], [True, True]], 2) == pytest.approx(2 / 3)
    assert mean_pass_at_k([[True, False, False, False, True]], 1) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_summarize_arithmetic():
    def sample(q, correct, reward, tokens, forwards, reason="stop"):
        return {"question_index": q, "correct": correct, "reward": reward, "num_tokens": tokens,
                "num_forwards": forwards, "finish_reason": reason}

    samples = [sample(0, True, 1.0, 8, 2), sample(0, False, 0.5, 4, 4, "length"),
               sample(1, False, 0.0, 12, 6), sample(1, False, 0.0, 0, 0)]
    summary = summarize(samples, 2, generate_seconds=2.0, reward_errors={"math": 1, "fmt": 2})
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["accuracy"] == 0.25 and summary["pass@k"] == 0.5
    assert summary["mean_reward"] == pytest.approx(0.375)
    assert summary["mean_length"] == 6.0
    assert summary["tokens_per_forward"] == pytest.approx(24 / 12)
    assert summary["tokens_per_s"] == pytest.approx(12.0)
    assert summary["truncated"] == 0.25
    assert (summary["num_samples"], summary["num_questions"], summary["reward_errors"]) == (4, 2, 3)
    empty = summarize([], 1, generate_seconds=0.0, reward_errors={})
    assert empty["accuracy"] is None and empty["num_samples"] == 0  # NaN -> null: strict JSON
    json.dumps(empty, allow_nan=False)


# ----------------------------------------------------------------------------- config & prompts


def test_config_defaults_follow_the_data_source():
    task = resolve_defaults(EvalConfig(data="task:countdown:test"))
    assert (task.reward, task.prompt_template) == ("countdown", "plain")
    file = resolve_defaults(EvalConfig(data="x.jsonl"))
    assert (file.reward, file.prompt_template) == ("math", "dirl_math")
    assert resolve_defaults(EvalConfig(data="x.jsonl", reward="gsm8k")).reward == "gsm8k"
    with pytest.raises(ValueError, match="unknown reward"):
        resolve_defaults(EvalConfig(data="x.jsonl", reward="math,nope"))


def test_greedy_pass_at_k_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        EvalConfig(k=4)
    assert EvalConfig(k=4, sampling=SamplingSpec(temperature=0.7)).k == 4


def test_task_source_without_split_is_the_test_split():
    rows = load_eval_rows(EvalConfig(data="task:arithmetic", limit=5))
    assert [r["id"] for r in rows] == [r["id"] for r in load_prompt_rows("task:arithmetic:test", limit=5)]


def test_build_prompts_chat_and_plain(tokenizer):
    rows = [{"question": "1+2=", "answer": "3"}]
    chat = tokenizer.decode(build_prompts(tokenizer, rows, "plain", None)[0], skip_special_tokens=False)
    plain = tokenizer.decode(build_prompts(tokenizer, rows, "plain", False)[0], skip_special_tokens=False)
    assert chat == "<|user|>1+2=<|assistant|>" and plain == "1+2="


# ----------------------------------------------------------------------------- evaluate_rows


def evaluate(model, tokenizer, rows, cfg, progress=False, backend=None):
    """What ``dirl eval`` runs: the shared eval path on the config with its task defaults."""
    return evaluate_rows(model, tokenizer, rows, resolve_defaults(cfg), backend, progress)


class OracleBackend:
    """Stands in for the engine: sample j of question i is ``answers[i][j % len(answers[i])]``."""

    def __init__(self, tokenizer, answers: list[list[str]]):
        self.tokenizer, self.answers, self.offset = tokenizer, answers, 0

    def generate(self, prompts, params, seeds=None):
        rollouts = []
        for i, prompt in enumerate(prompts):
            options = self.answers[self.offset + i]
            for j in range(params.n):
                ids = self.tokenizer.encode(options[j % len(options)]) + [self.tokenizer.eos_token_id]
                rollouts.append(Rollout(prompt, ids, list(range(len(ids))), [0.0] * len(ids), len(ids),
                                        "stop", max(1, len(ids) // 2), i, j))
        self.offset += len(prompts)
        return rollouts


@pytest.mark.parametrize("task", ["arithmetic", "countdown", "sudoku", "code"])
def test_oracle_completions_score_accuracy_one(task, tokenizer):
    """Gold responses through the real reward plumbing (task columns included) are all correct."""
    cfg = EvalConfig(data=f"task:{task}:test", limit=6, batch_size=4)
    rows = load_eval_rows(cfg)
    oracle = OracleBackend(tokenizer, [[row["response"]] for row in rows])
    summary, samples = evaluate(None, tokenizer, rows, cfg, progress=False, backend=oracle)
    assert summary["accuracy"] == 1.0 and summary["pass@k"] == 1.0 and summary["mean_reward"] == 1.0
    assert [s["id"] for s in samples] == [r["id"] for r in rows]
    assert summary["tokens_per_forward"] == pytest.approx(
        sum(s["num_tokens"] for s in samples) / sum(s["num_forwards"] for s in samples))


@needs_gsm8k
def test_patched_engine_with_gold_answers_k2(monkeypatch, tokenizer):
    """Patch the engine itself: sample 0 is gold, sample 1 wrong -> accuracy 0.5, pass@2 1.0."""
    cfg = EvalConfig(data=str(GSM8K), limit=5, reward="gsm8k", k=2, batch_size=2,
                     sampling=SamplingSpec(temperature=1.0, max_new_tokens=512))
    rows = load_eval_rows(cfg)
    oracle = OracleBackend(tokenizer, [[f"so #### {row['answer']}", "#### -1"] for row in rows])
    monkeypatch.setattr(native, "NativeBackend", lambda model, **_: oracle)  # the in-process default
    summary, samples = evaluate(None, tokenizer, rows, cfg, progress=False)
    assert [s["correct"] for s in samples] == [True, False] * 5
    assert [(s["question_index"], s["sample"]) for s in samples] == [(i, j) for i in range(5) for j in (0, 1)]
    assert summary["accuracy"] == 0.5 and summary["pass@k"] == 1.0 and summary["num_questions"] == 5


@pytest.mark.skipif(not MATH500.exists(), reason="shared data absent")
def test_math500_with_the_sdar_tokenizer_and_boxed_gold_answers(sdar_tokenizer):
    """The real recipe's path: Qwen chat template, dirl_math prompt, math-verify on \\boxed{}."""
    tok = sdar_tokenizer
    cfg = EvalConfig(data=str(MATH500), limit=12)
    rows = load_eval_rows(cfg)
    prompt = tok.decode(build_prompts(tok, rows[:1], "dirl_math", None)[0], skip_special_tokens=False)
    assert prompt.endswith("within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    gold = [[f"So the answer is $\\boxed{{{row['answer']}}}$.", "\\boxed{none}"] for row in rows]
    oracle = OracleBackend(tok, gold)
    summary, _ = evaluate(None, tok, rows, replace(cfg, k=2, sampling=replace(cfg.sampling, temperature=1.0)),
                          progress=False, backend=oracle)
    assert summary["accuracy"] == 0.5 and summary["pass@k"] == 1.0 and summary["reward_errors"] == 0


def test_results_do_not_depend_on_batch_size(tokenizer):
    model = init_model(InitConfig(preset="tiny"), tokenizer)
    model.train()
    cfg = EvalConfig(data="task:arithmetic:test", limit=4, k=2, sampling=SamplingSpec(temperature=1.0, max_new_tokens=8))
    rows = load_eval_rows(cfg)
    _, small = evaluate(model, tokenizer, rows, replace(cfg, batch_size=2), progress=False)
    _, large = evaluate(model, tokenizer, rows, cfg, progress=False)
    assert [s["completion"] for s in small] == [s["completion"] for s in large]
    assert model.training  # the caller's mode is restored


# ----------------------------------------------------------------------------- the CLI


def run_cli(capsys, monkeypatch, *args: str, cwd: Path) -> SimpleNamespace:
    """``dirl eval --no-progress ARGS`` in ``cwd``, in-process (``main`` is the console script's
    code path; no second interpreter start-up). -> returncode, stdout, stderr."""
    from dirl.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main(["eval", "--no-progress", *args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def check_run(out: Path, stdout: str, num_samples: int, k: int) -> dict:
    """Samples and summary on disk agree with each other and with the printed last line."""
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert len(samples) == num_samples and summary["num_samples"] == num_samples
    assert set(SUMMARY_KEYS) <= set(summary) and summary["k"] == k
    assert {key: printed[key] for key in summary} == summary
    assert summary["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / num_samples)
    by_question: dict[int, list[bool]] = {}
    for s in samples:
        assert {"id", "question", "completion", "reward", "correct", "steps", "num_tokens",
                "finish_reason", "sample"} <= set(s)
        assert len(s["steps"]) == s["num_tokens"]
        by_question.setdefault(s["question_index"], []).append(s["correct"])
    assert all(len(flags) == k for flags in by_question.values())
    assert summary["pass@k"] == pytest.approx(mean_pass_at_k(list(by_question.values()), k))
    return summary


@needs_gsm8k
def test_cli_on_gsm8k_file(tiny_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    proc = run_cli(capsys, monkeypatch, "--model", str(tiny_ckpt), "--data", str(GSM8K), "--reward", "gsm8k", "--out", str(out),
                   "limit=4", "sampling.max_new_tokens=8", cwd=tmp_path)  # GSM8K's 5th prompt is past 512 positions
    assert proc.returncode == 0, proc.stderr
    summary = check_run(out, proc.stdout, 4, 1)
    assert summary["num_questions"] == 4 and summary["mean_length"] <= 8
    assert "reward: gsm8k" in (out / "config.yaml").read_text()


def test_cli_on_task_with_k2_and_default_out(tiny_ckpt, tmp_path, capsys, monkeypatch):
    proc = run_cli(capsys, monkeypatch, "--model", str(tiny_ckpt), "--data", "task:arithmetic:test", "limit=8", "k=2",
                   "sampling.temperature=1", "sampling.max_new_tokens=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (out,) = (tmp_path / "runs").glob("eval-*")
    summary = check_run(out, proc.stdout, 16, 2)
    assert summary["num_questions"] == 8


def test_cli_errors_exit_2(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Bad data, bad config values and a missing checkpoint: one clear line and exit 2 (in-process
    ``main``, the same code path as the console script, to skip a subprocess start-up)."""
    from dirl.cli import main

    monkeypatch.setattr(sys, "argv", ["dirl"])  # main() rewrites sys.argv
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "no answer"}\n')
    assert main(["eval", "--model", str(tiny_ckpt), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dirl eval: ") and "bad.jsonl:2" in err and "missing field 'answer'" in err
    assert not (tmp_path / "runs").exists()
    base = ["eval", "--model", str(tiny_ckpt), "--data", "task:arithmetic:test", "limit=2"]
    assert main([*base, "k=3"]) == 2  # greedy pass@k
    assert "temperature" in capsys.readouterr().err
    assert main([*base, "reward=nope"]) == 2
    assert "unknown reward" in capsys.readouterr().err
    assert main([*base, "steps_per_block=9"]) == 2  # the tiny model's block size is 4
    assert "steps_per_block" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing"), "--data", "task:arithmetic", "limit=1"]) == 2
    assert "missing" in capsys.readouterr().err  # names the directory
    with pytest.raises(ConfigError):  # the library raises; the CLI turns it into exit 2
        from dirl import config

        config.load(EvalConfig, None, ["k=0"])
