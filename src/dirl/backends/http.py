"""Rollouts through a ``dirl serve`` process: token ids over HTTP, weights pushed after each step.

``generate`` sends one ``/v1/completions`` request per prompt, all at once from
a thread pool, so the server's batcher packs them into shared engine calls;
each request carries its prompt's seed, so the result equals the native
engine's on the same weights (the server seeds every row as the engine does,
and the stop ids are exactly ``params.stop_ids`` via ``ignore_eos``). The
response's RL fields (``token_ids`` of whole blocks, ``num_tokens``, ``steps``,
``logps``, ``num_forwards``; ``entropies`` when the server sends them) rebuild
:class:`~dirl.engine.engine.Rollout` objects field for field.

``sync_weights`` serialises the trainer's full state dict with
``safetensors.torch.save`` and posts it to the authenticated ``/update_weights``;
the server swaps it in between two engine calls, so every later request runs on
the new weights. The weight version each response was decoded with is kept in
``last_weight_versions``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from safetensors.torch import save as save_safetensors

from dirl.backends.options import HttpOptions
from dirl.rollout import Rollout, SamplingParams, spec_fields
from dirl.runtime import prompt_seeds

RL_FIELDS = ("token_ids", "num_tokens", "steps", "logps", "num_forwards", "finish_reason")


class HttpBackendError(RuntimeError):
    """The server answered an error (its JSON message is included) or an unexpected body."""


def probe_server(opts: HttpOptions) -> None:
    """One round trip before any work: the server answers, and it takes the key (an empty
    ``/update_weights`` body: 400 with a good key, 401 with a bad one, 403 with updates off).
    Anything else is a :class:`~dirl.errors.UserError` naming ``rollout.http``."""
    from dirl.errors import UserError

    if not opts.url:
        raise UserError("rollout.http.url is empty: the http backend needs a running `dirl serve` "
                        "(rollout.http.url=http://127.0.0.1:8000)")
    key = opts.api_key if opts.api_key is not None else os.environ.get(opts.api_key_env, "")
    try:
        response = httpx.post(f"{opts.url.rstrip('/')}/update_weights", content=b"",
                              headers={"Authorization": f"Bearer {key}"}, timeout=min(opts.timeout, 30.0))
    except (httpx.HTTPError, ValueError) as err:
        raise UserError(f"rollout.http.url={opts.url}: cannot reach the server ({type(err).__name__}: {err})") from None
    if response.status_code == 401:
        raise UserError(f"rollout.http: the server at {opts.url} refused the key (set ${opts.api_key_env} "
                        "or rollout.http.api_key to the server's key)")
    if response.status_code == 403:
        raise UserError(f"rollout.http: the server at {opts.url} has weight updates off (--no-updates)")
    if response.status_code != 400:
        raise UserError(f"rollout.http.url={opts.url}: not a dirl server (HTTP {response.status_code} "
                        "from /update_weights)")


class HttpBackend:
    """A :class:`~dirl.backends.base.RolloutBackend` that is a client of ``dirl serve``.

    ``options``: the fields of :class:`HttpOptions` as keywords, e.g.
    ``HttpBackend(model, tokenizer, url=..., timeout=60)``.
    """

    def __init__(self, model, tokenizer=None, **options):
        opts = HttpOptions(**options)
        if not opts.url:
            raise ValueError("the http rollout backend needs the url of a running `dirl serve` "
                             "(rollout.http.url=http://127.0.0.1:8000)")
        self.model, self.tokenizer = model, tokenizer
        self.url = opts.url.rstrip("/")
        self.api_key = opts.api_key if opts.api_key is not None else os.environ.get(opts.api_key_env)
        self.weights_dtype = getattr(torch, opts.weights_dtype) if opts.weights_dtype else None
        self.block_size = model.arch.block_size
        self.client = httpx.Client(base_url=self.url, timeout=opts.timeout,
                                   limits=httpx.Limits(max_connections=opts.max_concurrency))
        self.pool = ThreadPoolExecutor(max_workers=opts.max_concurrency, thread_name_prefix="dirl-http")
        self.weight_version: int | None = None  # returned by our last sync_weights
        self.last_weight_versions: list[int] = []
        if opts.sync_on_init:
            self.sync_weights()

    # -- weights ----------------------------------------------------------------------------------------

    def state_payload(self) -> bytes:
        """The model's full state dict as safetensors bytes (tied lm_head omitted: it is the embedding)."""
        state = self.model.state_dict()
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        tensors = {}
        for name, tensor in state.items():
            tensor = tensor.detach()
            if self.weights_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.weights_dtype)
            tensors[name] = tensor.cpu().contiguous()
        return save_safetensors(tensors)

    def sync_weights(self) -> None:
        """Push the trainer's current weights; returns once the server serves them."""
        headers = {"Content-Type": "application/octet-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        response = self.client.post("/update_weights", content=self.state_payload(), headers=headers)
        self.weight_version = int(self._json(response)["weight_version"])

    # -- rollouts ---------------------------------------------------------------------------------------

    def request_body(self, prompt: list[int], params: SamplingParams, seed: int) -> dict:
        """The /v1/completions body for one prompt: token ids in, RL fields out."""
        decoding = spec_fields(params)  # every SamplingSpec field under its own name ...
        return {
            **decoding, "max_tokens": decoding.pop("max_new_tokens"),  # ... but OpenAI's max_tokens
            "prompt": list(prompt), "n": params.n, "stop_token_ids": list(params.stop_ids),
            "ignore_eos": True, "seed": seed, "return_token_ids": True,
        }

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[Rollout]:
        """``params.n`` rollouts per prompt, grouped by prompt (as the native engine returns them)."""
        params.validate(self.block_size)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        seeds = prompt_seeds(params.seed, len(prompts)) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        bodies = [self.request_body(p, params, s) for p, s in zip(prompts, seeds)]
        responses = list(self.pool.map(self._complete, bodies))
        self.last_weight_versions = [int(r["weight_version"]) for r in responses]
        rollouts = []
        for index, (prompt, response) in enumerate(zip(prompts, responses)):
            choices = sorted(response["choices"], key=lambda c: c["index"])
            if len(choices) != params.n:
                raise HttpBackendError(f"expected {params.n} choices, the server returned {len(choices)}")
            rollouts += [self._rollout(prompt, c, index, j) for j, c in enumerate(choices)]
        return rollouts

    def _complete(self, body: dict) -> dict:
        return self._json(self.client.post("/v1/completions", json=body))

    @staticmethod
    def _rollout(prompt: list[int], choice: dict, prompt_index: int, sample_index: int) -> Rollout:
        missing = [k for k in RL_FIELDS if k not in choice]
        if missing:
            raise HttpBackendError(f"the server's response lacks {missing}: is it a `dirl serve`?")
        return Rollout(prompt_ids=list(prompt), token_ids=choice["token_ids"], steps=choice["steps"],
                       logps=choice["logps"], num_tokens=choice["num_tokens"],
                       finish_reason=choice["finish_reason"], num_forwards=choice["num_forwards"],
                       prompt_index=prompt_index, sample_index=sample_index,
                       entropies=choice.get("entropies", []))

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        try:
            body = response.json()
        except ValueError as err:
            raise HttpBackendError(f"{response.request.url}: HTTP {response.status_code}, "
                                   f"not JSON: {response.text[:200]!r}") from err
        if response.status_code >= 400 or "error" in body:
            message = (body.get("error") or {}).get("message", body)
            raise HttpBackendError(f"{response.request.url}: HTTP {response.status_code}: {message}")
        return body

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()
