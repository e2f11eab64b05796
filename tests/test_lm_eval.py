"""lm-evaluation-harness against ``dirl serve`` on loopback: a generation task and a log-likelihood
(multiple-choice) task from local task yamls over ``../shared/data`` (its ``local-completions`` model).

Oracle: the harness's log-likelihood of a continuation equals the sum of its tokens' left-to-right
log-probs computed here with plain forwards (tests/test_serve_logprobs.py's oracle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from serve_procs import start_server, stop_server, wait_healthy
from test_serve_logprobs import _left_to_right_oracle

from dirl.model.checkpoint import load_pretrained

pytestmark = pytest.mark.integration
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'dirl[dev]' (lm-eval[api])")
SHARED = Path(os.environ.get("DIRL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA = SHARED / "data" / "countdown_test.jsonl"
LIMIT = 3

GEN_TASK = """task: dirl_countdown_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  temperature: 0
metric_list:
  - metric: exact_match
"""
MC_TASK = """task: dirl_countdown_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{[answer, (target + 1) | string]}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    if not DATA.exists():
        pytest.skip(f"{DATA} not available")
    proc, url = start_server(tiny_ckpt, "--no-updates")
    try:
        wait_healthy(proc, url)
        yield url
    finally:
        stop_server(proc)


def _evaluate(tmp_path, model: str, model_args: str) -> dict:
    from lm_eval.tasks import TaskManager

    (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=DATA))
    (tmp_path / "mc.yaml").write_text(MC_TASK.format(data=DATA))
    return lm_eval.simple_evaluate(model=model, model_args=model_args,
                                   tasks=["dirl_countdown_gen", "dirl_countdown_mc"], limit=LIMIT,
                                   task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)


def test_generation_and_loglikelihood_tasks_run_against_dirl_serve(server, tiny_ckpt, tmp_path):
    model_args = (f"model={tiny_ckpt.name},base_url={server}/v1/completions,tokenizer={tiny_ckpt},"
                  "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,max_length=512")
    _check(_evaluate(tmp_path, "local-completions", model_args), tiny_ckpt)


def test_the_registered_dirl_model_runs_in_process(tiny_ckpt, tmp_path):
    import dirl.eval.lm_harness  # noqa: F401 -- registers "dirl" with lm-eval

    if not DATA.exists():
        pytest.skip(f"{DATA} not available")
    _check(_evaluate(tmp_path, "dirl", f"pretrained={tiny_ckpt}"), tiny_ckpt)


def _check(results: dict, tiny_ckpt) -> None:
    """Both tasks ran; the multiple-choice log-likelihoods are the left-to-right oracle's."""
    assert "exact_match,none" in results["results"]["dirl_countdown_gen"]
    assert 0.0 <= results["results"]["dirl_countdown_mc"]["acc,none"] <= 1.0
    generations = results["samples"]["dirl_countdown_gen"]
    assert len(generations) == LIMIT and all(isinstance(s["resps"][0][0], str) for s in generations)

    model, tokenizer = load_pretrained(tiny_ckpt)
    sample = results["samples"]["dirl_countdown_mc"][0]
    doc = sample["doc"]
    context = f"{doc['question']}\nAnswer:"
    for choice, (resp,) in zip([doc["answer"], str(doc["target"] + 1)], sample["resps"]):
        loglik, _is_greedy = resp
        ids = tokenizer.encode(context + " " + choice)
        start = len(tokenizer.encode(context))
        expected = sum(_left_to_right_oracle(model, ids, j) for j in range(start, len(ids)))
        assert abs(float(loglik) - expected) <= 1e-4, json.dumps(sample["resps"])
