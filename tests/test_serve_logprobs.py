"""``dirl serve`` log-probs (OpenAI ``logprobs`` / ``echo``, chat ``logprobs`` / ``top_logprobs``).

Oracles: an echoed prompt token's log-prob equals an independent, unpacked forward of its
left-to-right state (earlier blocks clean, its block unmasked up to it, the rest masked); a
generated token's equals the engine's recorded log-prob (``return_token_ids``); the top
alternatives agree with the token's value when it is the argmax (lm-eval's greedy test).
"""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from dirl.model.masks import TokenMeta
from dirl.model.policy import policy_logprobs
from dirl.serve import ServeConfig
from dirl.serve.app import create_app


@pytest.fixture
def client(tiny_model, tokenizer):
    with TestClient(create_app(tiny_model, tokenizer, ServeConfig(allow_updates=False))) as client:
        yield client


def _left_to_right_oracle(model, prompt: list[int], j: int) -> float:
    """log p(prompt[j]) with blocks before j's clean, j's block unmasked before j: one plain forward."""
    block = model.arch.block_size
    start = j // block * block
    state = prompt[start:j] + [model.arch.mask_token_id] * (block - (j - start))
    ids = torch.tensor([prompt[:start] + state])
    pos = torch.arange(ids.shape[1])[None]
    meta = TokenMeta.clean(pos[:, :start], block).cat(
        TokenMeta.noisy_copy(pos[:, start:], block, torch.zeros_like(pos[:, start:])))
    with torch.no_grad():
        logits = model(ids, pos, meta).logits[0, j]
    return policy_logprobs(logits, mask_token_id=model.arch.mask_token_id)[prompt[j]].item()


def test_echo_scores_the_prompt_left_to_right(client, tiny_model, tokenizer):
    prompt = tokenizer.encode("12+34=46 and 7*8=56")  # several blocks, a partial last one
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0,
                                                 "logprobs": 1, "echo": True, "seed": 3}).json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(tokenizer.decode(prompt, skip_special_tokens=False))
    assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
    for j in range(1, len(prompt)):
        assert abs(lp["token_logprobs"][j] - _left_to_right_oracle(tiny_model, prompt, j)) <= 1e-5, j
        top = lp["top_logprobs"][j]
        assert len(top) == 1 and max(top.values()) >= lp["token_logprobs"][j] - 1e-6
    assert lp["text_offset"][1] == len(lp["tokens"][0]) and lp["tokens"][0] == tokenizer.decode([prompt[0]])


def test_generated_token_logprobs_are_the_engines(client, tokenizer):
    request = {"prompt": "12+34=", "max_tokens": 8, "temperature": 0.7, "seed": 5, "ignore_eos": True}
    plain = client.post("/v1/completions", json={**request, "return_token_ids": True}).json()["choices"][0]
    with_lp = client.post("/v1/completions", json={**request, "logprobs": 3}).json()["choices"][0]
    assert with_lp["text"] == plain["text"]  # the same decode
    n = len(with_lp["logprobs"]["tokens"])
    assert n == plain["num_tokens"] and with_lp["logprobs"]["token_logprobs"] == plain["logps"][:n]
    for tok, value, top in zip(plain["token_ids"], plain["logps"], with_lp["logprobs"]["top_logprobs"]):
        assert len(top) == 3 and max(top.values()) >= value - 1e-4  # the trace re-scores the engine's state
        if tokenizer.decode([tok]) in top:
            assert abs(top[tokenizer.decode([tok])] - value) <= 1e-4


def test_chat_logprobs_content(client):
    body = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "1+1="}], "max_tokens": 4, "temperature": 0,
        "logprobs": True, "top_logprobs": 2, "ignore_eos": True}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert "".join(c["token"] for c in content) == body["choices"][0]["message"]["content"]
    for c in content:  # greedy: the chosen token is the most likely one
        assert abs(c["logprob"] - c["top_logprobs"][0]["logprob"]) <= 1e-4


def test_echo_without_logprobs_returns_the_prompt_text(client):
    choice = client.post("/v1/completions", json={"prompt": "7*8=", "max_tokens": 2, "echo": True,
                                                  "temperature": 0}).json()["choices"][0]
    assert choice["text"].startswith("7*8=") and choice["logprobs"] is None


@pytest.mark.parametrize("payload, param", [
    ({"prompt": "1+1=", "logprobs": 1, "stream": True}, "stream"),
    ({"prompt": "1+1=", "echo": True, "stream": True}, "stream"),
    ({"prompt": "1+1=", "logprobs": 21}, "logprobs"),
    ({"prompt": "1+1=", "logprobs": True}, "logprobs"),
])
def test_what_cannot_be_provided_is_a_400(client, payload, param):
    response = client.post("/v1/completions", json={**payload, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_chat_top_logprobs_without_logprobs_is_a_400(client):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 2, "top_logprobs": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"
