"""The FastAPI app of ``dirl serve``: OpenAI-compatible completions + live weight updates.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (request fields: :mod:`dirl.serve.schemas`) and
``POST /update_weights`` (body: raw ``safetensors.torch.save`` bytes of a full or
partial state dict; header ``Authorization: Bearer <key>``; answers
``{"weight_version", "updated_tensors"}``).

Text is handled here only (tokenize, chat template, decode, stop strings); the
engine behind the :class:`~dirl.serve.batcher.Batcher` sees token ids. Every
error is JSON ``{"error": {"message", "type", ...}}`` with a 4xx/5xx status.

Bounds on one request: a body cap on every route (``max_body_mb`` on the
completion routes, ``max_update_mb`` on ``/update_weights``, 64 KiB elsewhere);
text that is not valid Unicode (a lone surrogate) or too long to fit the context
is refused before tokenizing, and tokenizing runs off the event loop; prompts x
n x max_tokens must stay within ``max_request_tokens``; and a request whose
client disconnects is cancelled, its rows leaving the engine's batch before the
next denoising step.
Streaming (``stream: true``) is server-sent events in the OpenAI chunk format;
the whole completion is decoded first and then sent as one content chunk per
choice, a final chunk with ``finish_reason`` (and ``usage`` when
``stream_options.include_usage``), then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from dirl.errors import FieldError
from dirl.rollout import Rollout, SamplingParams, check_for_model
from dirl.runtime import MAX_SEED, prompt_seed, prompt_seeds
from dirl.serve import ServeConfig
from dirl.serve.batcher import Batcher, QueueFullError
from dirl.serve.guard import DeclaredSizeGuard, UpdateLog, check_stop_strings
from dirl.serve.logprobs import LogprobRequest, choice_logprobs, kept_tokens, logprob_request, score_rollouts
from dirl.serve.schemas import (DECODING_FIELDS, ChatCompletionRequest, CompletionRequest, SamplingFields, error_body,
                               usage)
from dirl.serve.weights import WeightUpdateError, live_tensors, prepare_update, state_dict_nbytes

DISCONNECT_POLL_S = 0.05       # how often a waiting request checks that its client is still there


def max_prompt_chars(tokenizer, context: int) -> int:
    """Characters beyond which a text surely has more than ``context`` tokens: context x the
    longest token (in characters) x 4, a margin for normalizers that compose characters (NFC
    maps up to 3 code points to 1)."""
    hf = tokenizer.hf
    longest = max(len(t) for t in hf.batch_decode([[i] for i in range(len(hf))]))
    return 4 * context * max(longest, 1)


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param), status_code=status)


class ServerState:
    """Model, tokenizer, batcher and limits; turns requests into engine jobs and back."""

    def __init__(self, model, tokenizer, cfg: ServeConfig, api_key: str | None):
        self.model, self.tokenizer, self.cfg, self.api_key = model, tokenizer, cfg, api_key
        self.name = cfg.served_model_name or (cfg.model.rstrip("/").rsplit("/", 1)[-1] if cfg.model else "dirl")
        self.live = live_tensors(model)
        self.max_update_bytes = int(cfg.max_update_mb * 2**20) or 2 * state_dict_nbytes(self.live) + 2**20
        self.batcher = Batcher(model, self.live, cfg)
        self.last_update = UpdateLog()
        mc = self.arch = model.arch
        self.block_size, self.vocab_size, self.context = mc.block_size, mc.vocab_size, mc.max_position_embeddings
        self.default_stops = set(tokenizer.stop_ids()) if tokenizer is not None else {mc.eos_token_id}
        self.max_body_bytes = int(cfg.max_body_mb * 2**20)
        self.body_limits = {"/v1/completions": self.max_body_bytes, "/v1/chat/completions": self.max_body_bytes,
                            "/update_weights": self.max_update_bytes}
        probe = dataclasses.replace(cfg.sampling, max_new_tokens=self.block_size, temperature=0.0,
                                    steps_per_block=self.block_size, unmasking="sequential")
        self.batcher.probe_params = probe.params([], n=1, seed=0)  # every update is probed with it
        # A text longer than this cannot fit the context, so it is refused without tokenizing it.
        self.max_prompt_chars = max_prompt_chars(tokenizer, self.context) if tokenizer is not None else 0

    # -- checks -----------------------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
        if not self.api_key or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid API key", "authentication_error")

    def check_model(self, name: str | None) -> None:
        if name and name not in (self.name, self.cfg.model):
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.name!r}",
                           "not_found_error", "model")

    def check_prompt(self, ids: list[int], max_tokens: int) -> list[int]:
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param="prompt")
        if len(ids) + max_tokens > self.context:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {self.context} tokens", param="max_tokens")
        return ids

    # -- request -> engine job --------------------------------------------------------------------------

    def check_budget(self, num_prompts: int, params: SamplingParams) -> None:
        """The compute budget: prompts x n x max_tokens generated tokens per request."""
        if num_prompts > self.cfg.max_prompts:
            raise ApiError(400, f"at most {self.cfg.max_prompts} prompts per request, got {num_prompts}",
                           param="prompt")
        asked = num_prompts * params.n * params.max_new_tokens
        if asked > self.cfg.max_request_tokens:
            raise ApiError(400, f"request too large: {num_prompts} prompt(s) x n={params.n} x max_tokens="
                                f"{params.max_new_tokens} = {asked} tokens exceeds this server's budget of "
                                f"{self.cfg.max_request_tokens} per request (max_request_tokens); split it up",
                           "request_too_large", "max_tokens")

    def encode(self, text: str, param: str = "prompt") -> list[int]:
        """Text -> ids, refusing text that is not valid Unicode or cannot fit the context (called
        off the event loop: tokenizing a few MB takes a while)."""
        if self.tokenizer is None:
            raise ApiError(400, "this checkpoint has no tokenizer: send prompts as token ids", param=param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ApiError(400, f"{param} is not valid Unicode: lone surrogate {text[err.start]!r} at "
                                f"character {err.start}", param=param) from None
        if len(text) > self.max_prompt_chars:
            raise ApiError(400, f"{param} of {len(text)} characters cannot fit the model's context of "
                                f"{self.context} tokens", param=param)
        return self.tokenizer.encode(text)

    def completion_prompts(self, req: CompletionRequest, params: SamplingParams) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        self.check_budget(len(prompt), params)  # before any tokenizing
        return [self.check_prompt(self.encode(p) if isinstance(p, str) else list(p), params.max_new_tokens)
                for p in prompt]

    def chat_prompt(self, req: ChatCompletionRequest, params: SamplingParams) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this checkpoint has no tokenizer: chat needs one; use /v1/completions")
        if not req.messages:
            raise ApiError(400, "messages is empty", param="messages")
        self.check_budget(1, params)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as err:
            raise ApiError(400, str(err), param="messages") from err
        return self.check_prompt(self.encode(text, "messages"), params.max_new_tokens)

    def sampling_params(self, req: SamplingFields, max_tokens: int | None) -> SamplingParams:
        cfg = self.cfg
        if not 1 <= req.n <= cfg.max_n:
            raise ApiError(400, f"n must be in [1, {cfg.max_n}], got {req.n}", param="n")
        if max_tokens is None:
            max_tokens = cfg.sampling.max_new_tokens
        if not 1 <= max_tokens <= cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be in [1, {cfg.max_tokens_limit}], got {max_tokens}",
                           param="max_tokens")
        seed = secrets.randbelow(2**31) if req.seed is None else req.seed
        if not 0 <= seed <= MAX_SEED:
            raise ApiError(400, f"seed must be in [0, 2**63 - 1], got {seed}", param="seed")
        problem = check_stop_strings(req.stop_strings(), cfg.max_stop_strings, cfg.max_stop_chars)
        if problem:
            raise ApiError(400, problem, param="stop")
        if len(req.stop_token_ids) > cfg.max_tokens_limit:
            raise ApiError(400, f"at most {cfg.max_tokens_limit} stop_token_ids", param="stop_token_ids")
        if any(not 0 <= t < self.vocab_size for t in req.stop_token_ids):
            raise ApiError(400, "stop_token_ids must be ids inside the vocabulary", param="stop_token_ids")
        stops = set(req.stop_token_ids) | (set() if req.ignore_eos else self.default_stops)
        given = {name: getattr(req, name) for name in DECODING_FIELDS if getattr(req, name) is not None}
        try:  # the spec range-checks its fields when built; validate() adds the model's block size
            spec = dataclasses.replace(cfg.sampling, **given, max_new_tokens=max_tokens)
            spec.steps_per_block = spec.steps_per_block or self.block_size  # 0: one token per forward
            params = spec.params(sorted(stops), n=req.n, seed=seed)
            check_for_model(params, self.arch)
        except FieldError as err:
            raise ApiError(400, str(err), param=err.key) from err
        except ValueError as err:
            raise ApiError(400, str(err)) from err
        return params

    async def run(self, prompts: list[list[int]], params: SamplingParams, request: Request, after=None):
        """Queue the prompts (prompt i gets seed ``params.seed + i``, as in the engine) and await
        them; if the client disconnects meanwhile, the job is cancelled (the engine drops its rows
        before its next step). ``after``: run on the rollouts on the same weights (log-probs)."""
        seeds = prompt_seeds(params.seed, len(prompts))
        try:
            job = self.batcher.submit_generate(prompts, seeds, params, after)
        except QueueFullError as err:
            raise ApiError(503, str(err), "server_overloaded") from err
        result = asyncio.wrap_future(job.future)
        while not (await asyncio.wait({result}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                job.cancel()
                result.cancel()
                raise ApiError(499, "the client closed the connection", "client_closed_request")
        return result.result()

    # -- engine result -> response ----------------------------------------------------------------------

    def choice(self, rollout: Rollout, req: SamplingFields, params: SamplingParams,
               lp: LogprobRequest | None = None, scored: dict | None = None) -> dict:
        """Text, finish reason, log-probs and (on request) the RL fields of one rollout."""
        ids, finish = rollout.completion_ids, rollout.finish_reason
        if finish == "stop" and ids and ids[-1] in params.stop_ids:
            ids = ids[:-1]  # the stop token is not part of the text
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        cuts = [i for i in (text.find(s) for s in req.stop_strings() if s) if i >= 0]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
            ids = kept_tokens(self.tokenizer, ids, len(text))
        out = {"text": text, "finish_reason": finish, "logprobs": None}
        if lp is not None:
            out.update(choice_logprobs(self.tokenizer, rollout, ids, text, lp, scored,
                                       isinstance(req, ChatCompletionRequest)))
        if req.return_token_ids:
            out.update(prompt_token_ids=rollout.prompt_ids, token_ids=rollout.token_ids,
                       num_tokens=rollout.num_tokens, steps=rollout.steps, logps=rollout.logps,
                       entropies=rollout.entropies, num_forwards=rollout.num_forwards,
                       seed=prompt_seed(params.seed, rollout.prompt_index))
        return out

    def logprob_request(self, req: SamplingFields, chat: bool) -> LogprobRequest | None:
        try:
            return logprob_request(req, chat)
        except FieldError as err:
            raise ApiError(400, str(err), param=err.key) from err

    def choices(self, result, req: SamplingFields, params: SamplingParams, chat: bool, lp, scores) -> list[dict]:
        choices = []
        for k, rollout in enumerate(result.rollouts):
            fields = self.choice(rollout, req, params, lp, scores[k])
            text = fields.pop("text")
            body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append({"index": k, **body, **fields})
        return choices

    async def complete(self, req: SamplingFields, prompts: list[list[int]], params: SamplingParams, chat: bool,
                       request: Request):
        lp = self.logprob_request(req, chat)  # a 400 before any decoding
        after = None if lp is None or lp.top is None else functools.partial(
            score_rollouts, self.model, lp=lp, dist=params)
        result = await self.run(prompts, params, request, after)
        scores = result.extra or [None] * len(result.rollouts)
        # decoding and stop-string matching: off the event loop (/health stays responsive)
        choices = await run_in_threadpool(self.choices, result, req, params, chat, lp, scores)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.name, "choices": choices,
            "usage": usage(sum(len(p) for p in prompts), sum(r.num_tokens for r in result.rollouts)),
            "weight_version": result.weight_version,
        }


def sse_chunks(body: dict, chat: bool, include_usage: bool):
    """A finished response as OpenAI stream chunks (one content chunk + one finish chunk per choice)."""
    head = {k: body[k] for k in ("id", "created", "model", "weight_version")}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"

    def event(choices, **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    for choice in body["choices"]:
        index, finish = choice["index"], choice["finish_reason"]
        rl = {k: v for k, v in choice.items() if k not in ("index", "message", "text", "finish_reason", "logprobs")}
        if chat:
            content = {"delta": {"role": "assistant", "content": choice["message"]["content"]}}
            last = {"delta": {}}
        else:
            content, last = {"text": choice["text"]}, {"text": ""}
        yield event([{"index": index, **content, "logprobs": None, "finish_reason": None}])
        yield event([{"index": index, **last, "logprobs": None, "finish_reason": finish, **rl}])
    if include_usage:
        yield event([], usage=body["usage"])
    yield "data: [DONE]\n\n"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return _error(err.status, err.message, err.type, err.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
                             f"{e.get('msg')}" for e in err.errors()[:5])
        return _error(400, f"invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 413:  # the route's max_body_size (FastAPI / Starlette's body limit)
            limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
            return _error(413, f"request body exceeds this route's limit of {limit} bytes", "request_too_large")
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(err.status_code, str(err.detail), kind)

    @app.exception_handler(Exception)
    async def internal_error(_, err: Exception):
        return _error(500, f"internal error: {type(err).__name__}: {err}", "internal_error")


def create_app(model, tokenizer, cfg: ServeConfig, api_key: str | None = None) -> FastAPI:
    """The app; its lifespan starts and stops the batcher thread."""
    state = ServerState(model, tokenizer, cfg, api_key)

    @asynccontextmanager
    async def lifespan(_app):
        state.batcher.start()
        yield
        state.batcher.close()

    # Every route has a body cap: a declared Content-Length is checked before a byte is read
    # (DeclaredSizeGuard; SMALL_BODY_BYTES for routes without their own), and the routes that read
    # a body also count it while it streams in (FastAPI's max_body_size). Routes that never read
    # their body leave it to uvicorn's flow control, which stops reading from the socket.
    app = FastAPI(title="dirl serve", lifespan=lifespan)
    app.add_middleware(DeclaredSizeGuard, limits=state.body_limits)
    app.state.dirl = state
    _install_error_handlers(app)
    _add_info_routes(app, state)
    _add_completion_routes(app, state)
    _add_weight_routes(app, state)
    return app


def _guard(state: ServerState, request: Request) -> None:
    if state.cfg.auth_completions:
        state.check_key(request)


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        alive = state.batcher.alive
        body = {"status": "ok" if alive else "error", "model": state.name,
                "weight_version": state.batcher.weight_version, "queue": state.batcher.queue_size,
                "running_jobs": state.batcher.running_jobs,
                "model_state": "serving" if alive else "stopped", "last_update": state.last_update.as_dict(),
                "updates_enabled": state.cfg.allow_updates, **state.batcher.stats}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        _guard(state, request)
        card = {"id": state.name, "object": "model", "created": 0, "owned_by": "dirl",
                "max_model_len": state.context, "block_size": state.block_size}
        return JSONResponse({"object": "list", "data": [card]})


def _add_completion_routes(app: FastAPI, state: ServerState) -> None:
    async def respond(req: SamplingFields, prompts, params, chat: bool, request: Request):
        body = await state.complete(req, prompts, params, chat, request)
        if req.stream:
            return StreamingResponse(sse_chunks(body, chat, req.include_usage_in_stream()),
                                     media_type="text/event-stream")
        return JSONResponse(body)

    @app.post("/v1/completions", max_body_size=state.body_limits["/v1/completions"])
    async def completions(req: CompletionRequest, request: Request):
        _guard(state, request)
        state.check_model(req.model)
        params = state.sampling_params(req, req.max_tokens)
        prompts = await run_in_threadpool(state.completion_prompts, req, params)  # tokenizing: off the loop
        return await respond(req, prompts, params, chat=False, request=request)

    @app.post("/v1/chat/completions", max_body_size=state.body_limits["/v1/chat/completions"])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        _guard(state, request)
        state.check_model(req.model)
        params = state.sampling_params(req, req.token_limit())
        prompt = await run_in_threadpool(state.chat_prompt, req, params)
        return await respond(req, [prompt], params, chat=True, request=request)


def _add_weight_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/update_weights", max_body_size=state.body_limits["/update_weights"])
    async def update_weights(request: Request):
        if not state.cfg.allow_updates:
            raise ApiError(403, "weight updates are disabled on this server (--no-updates)", "permission_error")
        state.check_key(request)
        body = await request.body()  # capped by the route's max_body_size
        start = time.perf_counter()
        version = state.batcher.weight_version
        if not body:  # a client's probe of the key (dirl.backends.http.probe_server): not an update
            raise ApiError(400, "empty body: expected safetensors bytes of a state dict", "invalid_weights")
        try:
            tensors = await run_in_threadpool(prepare_update, state.live, body, state.cfg.max_update_scale)
        except WeightUpdateError as err:
            state.last_update.record("rejected", str(err), version)
            raise ApiError(400, str(err), "invalid_weights", err.tensor) from err
        try:
            version = await asyncio.wrap_future(state.batcher.submit_update(tensors))
        except QueueFullError as err:
            raise ApiError(503, str(err), "server_overloaded") from err
        except WeightUpdateError as err:  # the probe on the new weights failed: rolled back
            state.last_update.record("rolled_back", str(err), state.batcher.weight_version)
            raise ApiError(400, str(err), "invalid_weights") from err
        state.last_update.record("applied", f"{len(tensors)} tensors", version)
        return JSONResponse({"weight_version": version, "updated_tensors": len(tensors),
                             "elapsed_ms": round(1000 * (time.perf_counter() - start), 3)})
