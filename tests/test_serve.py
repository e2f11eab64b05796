"""``dirl serve`` as a real process on 127.0.0.1, and the ``http`` rollout backend against it.

One server (tiny model) is started per module by ``dirl serve`` in a subprocess
(launched as soon as collection ends: tests/serve_procs.py) and killed at teardown. Tests share it, so each reads the current weight
version from ``/health`` and recomputes expected outputs locally with an
:class:`Engine` on a model holding that version's weights (``server.versions``
maps every version the tests pushed to its state dict). Every request loop is
bounded in count and in time.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors

from dirl.backends.http import HttpBackend
from dirl.engine.engine import Engine
from dirl.rollout import SamplingParams, SamplingSpec
from dirl.model.checkpoint import load_pretrained

from serve_procs import KEY, KEY_ENV, start_server, stop_server, take

pytestmark = pytest.mark.integration  # processes: deselected by default, CI runs them


@dataclass
class Server:
    url: str
    ckpt: object
    model: torch.nn.Module          # local reference model, reloaded per version
    tokenizer: object
    versions: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def version(self) -> int:
        return httpx.get(f"{self.url}/health", timeout=10).json()["weight_version"]

    def post(self, path: str, timeout: float = 60, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=timeout, **kwargs)

    def push(self, state: dict[str, torch.Tensor], key: str | None = KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.post("/update_weights", content=save_safetensors(state), headers=headers)

    def push_perturbed(self, seed: int) -> int:
        """Push a perturbed copy of the initial weights; record and return its version."""
        gen = torch.Generator().manual_seed(seed)
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in self.versions[0].items()}
        response = self.push(state)
        assert response.status_code == 200, response.text
        version = response.json()["weight_version"]
        self.versions[version] = state
        return version

    def engine(self, version: int) -> Engine:
        self.model.load_state_dict(self.versions[version])
        return Engine(self.model)

    def params(self, max_tokens: int, n: int = 1, seed: int = 0, **fields) -> SamplingParams:
        """What the server builds from a request with these fields (default stop ids = EOS)."""
        return SamplingParams(max_new_tokens=max_tokens, n=n, seed=seed,
                              stop_ids=self.tokenizer.stop_ids(), **fields)

    def text(self, rollout) -> str:
        ids = rollout.completion_ids
        if rollout.finish_reason == "stop":
            ids = ids[:-1]
        return self.tokenizer.decode(ids)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url, ckpt = take("test_serve", tmp_path_factory.mktemp("serve"))
    try:
        model, tokenizer = load_pretrained(ckpt)
        srv = Server(url, ckpt, model.eval(), tokenizer)
        srv.versions[0] = {k: v.clone() for k, v in model.state_dict().items()}
        yield srv
    finally:
        stop_server(proc)


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def test_openai_client_completes_chats_and_streams(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    version = server.version()
    engine = server.engine(version)
    prompt_ids = server.tokenizer.encode("Hello")
    [rollout] = engine.generate([prompt_ids], server.params(10, seed=3), seeds=[3])

    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, seed=3)
    assert out.choices[0].text == server.text(rollout)
    assert out.choices[0].finish_reason == rollout.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), rollout.num_tokens)
    assert out.usage.total_tokens == len(prompt_ids) + rollout.num_tokens
    assert out.model_extra["weight_version"] == version
    streamed = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, seed=3, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text

    messages = [{"role": "user", "content": "Hi there"}]
    chat_ids = server.tokenizer.encode(server.tokenizer.apply_chat_template(messages))
    [chat_rollout] = engine.generate([chat_ids], server.params(8, seed=5), seeds=[5])
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=5)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == server.text(chat_rollout)
    assert chat.usage.prompt_tokens == len(chat_ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=5, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat_rollout.num_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_token_id_prompts_return_the_engine_trace(server):
    version = server.version()
    prompts = [server.tokenizer.encode("abc"), server.tokenizer.encode("The sum of 12 and 30")]
    dllm = dict(top_k=20, unmasking="static", steps_per_block=2, temperature=0.8)
    body = {"prompt": prompts, "n": 2, "max_tokens": 9, "seed": 11, "return_token_ids": True, **dllm}
    response = server.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["weight_version"] == version
    expected = server.engine(version).generate(prompts, server.params(9, n=2, seed=11, **dllm), seeds=[11, 12])
    assert len(out["choices"]) == 4
    for choice, rollout in zip(out["choices"], expected):
        assert choice["prompt_token_ids"] == rollout.prompt_ids
        assert choice["token_ids"] == rollout.token_ids and len(choice["token_ids"]) >= choice["num_tokens"]
        assert choice["steps"] == rollout.steps and choice["num_forwards"] == rollout.num_forwards
        assert choice["logps"] == pytest.approx(rollout.logps, abs=1e-5)
        assert choice["num_tokens"] == rollout.num_tokens and choice["text"] == server.text(rollout)
    # Whole blocks: the prompt tail plus the generated tokens fill blocks of 4 exactly.
    assert all((len(c["prompt_token_ids"]) + len(c["token_ids"])) % 4 == 0 for c in out["choices"])
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)


def test_stop_strings_cut_the_text(server):
    body = {"prompt": "Once upon a time", "max_tokens": 16, "seed": 7, "temperature": 1.0}
    full = server.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(full) >= 6
    stop = full[3:5]
    cut = server.post("/v1/completions", json={**body, "stop": [stop, "\x00never"]}).json()["choices"][0]
    assert cut["text"] == full[: full.find(stop)]
    assert cut["finish_reason"] == "stop"


def test_update_requires_the_key(server):
    version = server.version()
    state = server.versions[0]
    assert_error(server.push(state, key=None), 401)
    assert_error(server.push(state, key="wrong-key"), 401)
    assert server.version() == version


def test_bad_updates_are_rejected_and_old_weights_keep_serving(server):
    body = {"prompt": "Hello", "max_tokens": 12, "seed": 21, "return_token_ids": True}
    before = server.post("/v1/completions", json=body).json()
    good = server.versions[server.version()]
    name = "model.layers.0.mlp.up_proj.weight"
    bad_updates = {
        "unknown tensor": ({"model.layers.9.mlp.up_proj.weight": good[name]}, "model.layers.9.mlp.up_proj.weight"),
        "wrong shape": ({name: good[name][:-1].clone()}, name),
        "wrong dtype": ({name: good[name].double()}, name),
        "non-finite": ({name: torch.full_like(good[name], float("nan"))}, name),
    }
    for label, (update, tensor) in bad_updates.items():
        # a good tensor rides along: it must not be applied either (all-or-nothing)
        update = {"model.norm.weight": good["model.norm.weight"] * 3, **update}
        error = assert_error(server.push(update), 400)
        assert tensor in error["message"], label
    headers = {"Authorization": f"Bearer {KEY}"}
    assert_error(server.post("/update_weights", content=b"not safetensors", headers=headers), 400)
    assert_error(server.post("/update_weights", content=b"\0" * (8 << 20), headers=headers), 413)
    after = server.post("/v1/completions", json=body).json()
    assert after["weight_version"] == before["weight_version"]
    assert after["choices"] == before["choices"]


def test_malformed_requests_get_json_errors_and_the_server_stays_healthy(server):
    raw = {"headers": {"Content-Type": "application/json"}}
    assert_error(server.post("/v1/completions", content=b'{"prompt": "x", ', **raw), 400)
    assert_error(server.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}), 400)
    assert_error(server.post("/v1/completions", json={"prompt": "x", "n": 100_000}), 400)
    assert_error(server.post("/v1/completions", json={"prompt": "x", "unmasking": "bogus"}), 400)
    assert_error(server.post("/v1/completions", json={"prompt": [], "max_tokens": 4}), 400)
    assert_error(server.post("/v1/completions", json={"prompt": [1, 10**9], "max_tokens": 4}), 400)
    assert_error(server.post("/v1/completions", json={"prompt": "x", "max_tokens": 10**6}), 400)
    assert_error(server.post("/v1/completions", json={"model": "other", "prompt": "x"}), 404)
    assert_error(server.post("/v1/chat/completions", json={"messages": "nope"}), 400)
    assert_error(httpx.get(f"{server.url}/no/such/route", timeout=10), 404)
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_concurrent_clients_during_weight_updates(server):
    """32 clients while weights change 3 times: no errors, each text matches its own version's weights."""
    prompts = ["Hello", "2+2=", "The quick brown fox", "Q: why?\nA:"]
    records, errors, updates_done = [], [], threading.Event()
    deadline = time.monotonic() + 120

    def client(worker: int, http: httpx.Client) -> None:
        for k in range(40):  # bounded; keep going until every update has landed (at least 2 requests)
            if time.monotonic() > deadline or (updates_done.is_set() and k >= 2):
                return
            prompt, seed = prompts[(worker + k) % len(prompts)], 1000 * worker + k
            try:
                r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "seed": seed})
                body = r.json()
                records.append((prompt, seed, body["choices"][0]["text"], body["weight_version"]))
            except Exception as err:  # noqa: BLE001 -- every failure is collected and asserted on
                errors.append(repr(err))

    def updater() -> None:
        try:
            for i in range(3):
                time.sleep(0.2)
                server.push_perturbed(seed=100 + i)
        except Exception as err:  # noqa: BLE001
            errors.append(repr(err))
        finally:
            updates_done.set()

    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=40)) as http:
        threads = [threading.Thread(target=client, args=(w, http)) for w in range(32)]
        threads.append(threading.Thread(target=updater))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
    assert not errors, errors[:3]
    assert len(records) >= 64
    seen = sorted({r[3] for r in records})
    assert len(seen) >= 2, f"all requests ran on one weight version {seen}"
    mismatches, differ_elsewhere = [], 0
    for version in seen:
        mine = [r for r in records if r[3] == version]
        ids = [server.tokenizer.encode(p) for p, *_ in mine]
        seeds = [r[1] for r in mine]
        rollouts = server.engine(version).generate(ids, server.params(6), seeds=seeds)
        mismatches += [(r, server.text(x)) for r, x in zip(mine, rollouts) if r[2] != server.text(x)]
        # The check has teeth: another version's weights would give other texts.
        other = seen[0] if version != seen[0] else seen[-1]
        rollouts = server.engine(other).generate(ids, server.params(6), seeds=seeds)
        differ_elsewhere += sum(r[2] != server.text(x) for r, x in zip(mine, rollouts))
    assert not mismatches, mismatches[:3]
    assert differ_elsewhere > 0


def test_http_backend_matches_the_native_engine(server):
    """Push the trainer's (new) weights, then rollouts over HTTP equal in-process ones."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for tensor in server.model.state_dict().values():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))
    backend = HttpBackend(server.model, server.tokenizer, url=server.url, api_key=KEY, timeout=60)
    try:
        assert backend.weight_version == server.version()
        encode = server.tokenizer.encode
        prompts = [encode("abc"), encode("Hello world"), encode("x"), encode("12+30=")]
        eos = server.tokenizer.eos_token_id
        cases = [SamplingParams(max_new_tokens=10, n=3, seed=5, stop_ids=[eos]),
                 SamplingParams(max_new_tokens=7, temperature=0.0, unmasking="static", steps_per_block=2,
                                stop_ids=[eos, encode("e")[0]]),
                 SamplingParams(max_new_tokens=9, top_k=5, top_p=0.9, threshold=0.05, n=2)]
        for params in cases:
            seeds = [3, 1, 4, 1] if params.n == 2 else None
            remote = backend.generate(prompts, params, seeds)
            native = Engine(server.model).generate(prompts, params, seeds)
            assert len(remote) == len(native) == len(prompts) * params.n
            assert set(backend.last_weight_versions) == {backend.weight_version}
            for r, n in zip(remote, native):
                assert (r.prompt_ids, r.token_ids, r.steps) == (n.prompt_ids, n.token_ids, n.steps)
                assert (r.num_tokens, r.finish_reason, r.num_forwards) == (n.num_tokens, n.finish_reason,
                                                                         n.num_forwards)
                assert (r.prompt_index, r.sample_index) == (n.prompt_index, n.sample_index)
                assert r.logps == pytest.approx(n.logps, abs=1e-5)
    finally:
        backend.close()
        server.versions[server.version()] = {k: v.clone() for k, v in server.model.state_dict().items()}


def test_refuses_to_start_without_a_key(server):
    proc, _ = start_server(server.ckpt, env_key=None)
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            stop_server(proc)
    assert proc.returncode == 2 and "refusing to start" in output


def test_no_updates_mode_answers_403(server):
    """In-process (same app, no second server process): /update_weights is off, completions work."""
    from fastapi.testclient import TestClient

    from dirl.serve import ServeConfig
    from dirl.serve.app import create_app

    model, tokenizer = load_pretrained(server.ckpt)
    app = create_app(model.eval(), tokenizer, ServeConfig(model=str(server.ckpt), allow_updates=False))
    with TestClient(app) as client:
        state = {"model.norm.weight": server.versions[0]["model.norm.weight"] * 2}
        response = client.post("/update_weights", content=save_safetensors(state),
                               headers={"Authorization": f"Bearer {KEY}"})
        assert_error(response, 403)
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "seed": 1})
        assert ok.status_code == 200 and ok.json()["weight_version"] == 0
        assert client.get("/health").json()["updates_enabled"] is False
    assert torch.equal(model.model.norm.weight, server.versions[0]["model.norm.weight"])


def test_rl_through_the_server_matches_native(server, tmp_path, monkeypatch):
    """At a fixed seed, ``rollout.backend=http`` gives the same rewards and parameters
    after 2 RL steps as the in-process backend (DESIGN §8)."""
    from dirl.train.optim import OptimConfig
    from dirl.backends.options import HttpOptions
    from dirl.train.rl.config import AlgoConfig, RLConfig, RolloutConfig
    from dirl.train.rl.loop import train_rl

    monkeypatch.setenv(KEY_ENV, KEY)

    def run(backend: str):
        http = {"http": HttpOptions(url=server.url, api_key_env=KEY_ENV)} if backend == "http" else {}
        cfg = RLConfig(model="init:tiny", out=str(tmp_path / backend), max_steps=2, log_every=0,
                       rewards={"rl_rewards:digit_fraction": 1.0},
                       # eps=1e-3: Adam's first steps are ~lr * sign(g), so a 1e-7 wobble in the
                       # server's log-probs (its batching depends on request timing) could flip
                       # whole updates of near-zero gradients; a large eps keeps the step smooth in g.
                       optim=OptimConfig(lr=1e-3, schedule="constant", eps=1e-3),
                       rollout=RolloutConfig(backend=backend, num_prompts=2, group_size=4, **http,
                                             sampling=SamplingSpec(max_new_tokens=8)),
                       algo=AlgoConfig(beta=0.01))
        run_dir = train_rl(cfg, progress=False)
        rewards = [json.loads(line)["reward"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        model, _ = load_pretrained(run_dir / "final")
        return rewards, model.state_dict()

    native_rewards, native_state = run("native")
    http_rewards, http_state = run("http")
    assert http_rewards == pytest.approx(native_rewards, abs=1e-9)
    assert len(set(native_rewards)) > 1 or native_rewards[0] > 0  # the rewards carry signal
    for name, value in native_state.items():
        assert torch.allclose(value, http_state[name], atol=1e-6), name
