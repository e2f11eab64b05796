"""Bounded server requests (issue 13): body caps, the compute budget, bad text, cancellation.

The engine and batcher tests run in-process and are deterministic (the cancellation is
triggered from a forward hook, so "stops within one step" is counted exactly). The others
start one real ``dirl serve`` process (tiny model, no KV cache so that a request can be made
heavy) on a free loopback port. Every loop is bounded in count and time; no test asserts a
duration (the latencies are measured by ``python -m benchmarks.serve_limits``).
"""

from __future__ import annotations

import httpx
import pytest

# The attacker-style client (raw sockets) is shared with the benchmark that times these paths.
from benchmarks import serve_limits as limits
from dirl.engine.engine import Engine
from dirl.rollout import SamplingParams
from dirl.serve import ServeConfig
from dirl.serve.batcher import Batcher, RequestCancelled
from dirl.serve.weights import live_tensors
from serve_procs import BODY_LIMIT_MB, stop_server, take

pytestmark = pytest.mark.integration  # processes: deselected by default, CI runs them


def _forward_counter(model, cancel_at: int | None = None, on_cancel=None) -> list:
    """Count the model's forwards; at forward ``cancel_at`` call ``on_cancel()`` (same thread)."""
    calls: list[int] = []

    def hook(*_):
        calls.append(1)
        if cancel_at is not None and len(calls) == cancel_at:
            on_cancel()

    model.register_forward_hook(hook)
    return calls


def test_engine_drops_cancelled_rows_before_the_next_step(tiny_model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    params = SamplingParams(max_new_tokens=24, n=2, seed=3)
    alone = Engine(tiny_model).generate(prompts, params)
    calls = _forward_counter(tiny_model)
    out = Engine(tiny_model).generate(prompts, params, is_cancelled=lambda i: i == 0 and len(calls) >= 4)
    assert out[0] is None and out[1] is None  # prompt 0's two rows
    for got, want in zip(out[2:], alone[2:]):  # the other prompt's rows are unchanged
        assert (got.token_ids, got.steps, got.num_tokens) == (want.token_ids, want.steps, want.num_tokens)
        assert got.logps == pytest.approx(want.logps, abs=1e-6)
    calls.clear()
    everything = Engine(tiny_model).generate(prompts, params, is_cancelled=lambda i: len(calls) >= 5)
    assert everything == [None] * 4
    assert 5 <= len(calls) <= 6  # the flag is read before every step: at most that step's forwards ran
    calls.clear()
    assert Engine(tiny_model).generate(prompts, params, is_cancelled=lambda i: True) == [None] * 4
    assert not calls  # cancelled before its chunk started: not even a prefill


def test_batcher_cancels_a_running_job_and_its_batch_neighbour_finishes(tiny_model):
    params = SamplingParams(max_new_tokens=64, n=8, seed=1)
    small = [[7, 8, 9]]
    expected = Engine(tiny_model).generate(small, params, seeds=[11])
    batcher = Batcher(tiny_model, live_tensors(tiny_model), ServeConfig(batch_wait_ms=500))
    jobs = []
    calls = _forward_counter(tiny_model, cancel_at=6, on_cancel=lambda: jobs[0].cancel())
    batcher.start()
    try:
        jobs.append(batcher.submit_generate([[1, 2, 3, 4, 5]] * 4, [0, 1, 2, 3], params))  # the abandoned one
        jobs.append(batcher.submit_generate(small, [11], params))
        with pytest.raises(RequestCancelled):
            jobs[0].future.result(timeout=120)
        result = jobs[1].future.result(timeout=120)
    finally:
        batcher.close()
    assert batcher.stats["cancelled_jobs"] == 1 and batcher.stats["engine_calls"] == 1  # one shared call
    assert [r.token_ids for r in result.rollouts] == [r.token_ids for r in expected]
    assert len(calls) > 6  # the neighbour kept decoding after the cancel


# ----------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url, _ = take("test_serve_limits", tmp_path_factory.mktemp("limits"))
    try:
        yield proc, url
    finally:
        stop_server(proc)


def test_oversized_bodies_get_413_without_being_read(server):
    proc, url = server
    before = limits.rss_bytes(proc.pid)
    declared = limits.raw_post(url, "/v1/completions", 50 << 20)
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    streamed = limits.raw_post(url, "/v1/completions", 8 << 20, chunked=True)
    assert streamed.startswith(b"HTTP/1.1 413"), streamed[:200]
    assert limits.raw_post(url, "/health", 1 << 20).startswith(b"HTTP/1.1 413")  # every route has a cap
    assert limits.rss_bytes(proc.pid) - before < 100 << 20
    # Just under the cap is read and parsed: a clean 400 (too long for the context), no 413.
    text = "a" * ((BODY_LIMIT_MB << 20) - 100)
    response = httpx.post(f"{url}/v1/completions", json={"prompt": text, "max_tokens": 4}, timeout=60)
    assert response.status_code == 400 and "cannot fit" in response.json()["error"]["message"]


def test_budget_context_and_bad_text_are_400s(server):
    _, url = server

    def post(path: str, **kwargs) -> dict:
        response = httpx.post(f"{url}{path}", timeout=60, **kwargs)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    error = post("/v1/completions", json={"prompt": ["a"] * 16, "n": 64, "max_tokens": 256})
    assert error["type"] == "request_too_large" and "262144" in error["message"]
    assert "context" in post("/v1/completions", json={"prompt": [5] * 600, "max_tokens": 4})["message"]
    assert post("/v1/completions", json={"prompt": "x", "temperature": -1})["param"] == "temperature"
    assert post("/v1/completions", json={"prompt": "x", "top_p": 1.5})["param"] == "top_p"
    raw = {"headers": {"Content-Type": "application/json"}}
    assert "surrogate" in post("/v1/completions", content=b'{"prompt": "hi \\ud800"}', **raw)["message"]
    chat = b'{"messages": [{"role": "user", "content": "\\udc00"}]}'
    assert "surrogate" in post("/v1/chat/completions", content=chat, **raw)["message"]
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


def test_health_answers_during_a_heavy_request_and_an_abandoned_one_is_cancelled(server):
    _, url = server
    sock = limits.open_request(url, limits.HEAVY)
    try:
        health = limits.poll_health(url, lambda h: h["running_jobs"] >= 1, timeout_s=60)
        assert health["status"] == "ok"  # answered while the heavy request runs
    finally:
        sock.close()  # the client gives up
    health = limits.poll_health(url, lambda h: h["cancelled_jobs"] >= 1 and h["running_jobs"] == 0, timeout_s=60)
    assert health["cancelled_jobs"] == 1
    small = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
    assert small.status_code == 200
