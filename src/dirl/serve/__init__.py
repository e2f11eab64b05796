"""``dirl serve``: an OpenAI-compatible HTTP server with authenticated live weight updates.

* :mod:`dirl.serve.app` -- the FastAPI app (routes, errors, streaming);
* :mod:`dirl.serve.schemas` -- request fields (OpenAI + dLLM + RL extensions);
* :mod:`dirl.serve.batcher` -- one worker thread owns the engine and batches requests;
* :mod:`dirl.serve.weights` -- validating and swapping in pushed state dicts.

:class:`ServeConfig` lives here, free of heavy imports, so ``dirl serve`` can
check its arguments (and refuse to start without a key) before loading torch.
The trainer side of the protocol is :class:`dirl.backends.http.HttpBackend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dirl.errors import FINITE_NON_NEGATIVE, FINITE_POSITIVE, NON_NEGATIVE, POSITIVE, check_fields, one_of
from dirl.rollout import EngineOptions, SamplingSpec


def _serve_sampling() -> SamplingSpec:
    return SamplingSpec(steps_per_block=0)


@dataclass
class ServeConfig(EngineOptions):
    """Everything ``dirl serve`` reads (YAML / ``key=value`` overrides; the CLI flags set some).

    ``compile`` (from :class:`~dirl.rollout.EngineOptions`): the engine's step compiles lazily,
    so the first requests wait for it (~50 s of CPU in all); weight updates copy in place and
    keep the compiled graphs. ``batching=shared`` admits every queued row that fits
    ``max_batch_tokens`` (set it: each admitted row holds its KV cache) and runs the ``max_batch``
    least advanced ones per forward, so a short request finishes without waiting for long ones."""

    model: str = ""                    # checkpoint directory
    host: str = "127.0.0.1"            # loopback by default: nothing else can reach the server
    port: int = 8000
    served_model_name: str = ""        # default: the directory's name
    param_dtype: str = ""              # weights: "" = the checkpoint's; float32 | bfloat16 | float16
    device: str = "cpu"
    api_key: str = ""                  # prefer api_key_env: keys in YAML files end up in git
    api_key_env: str = "DIRL_API_KEY"  # environment variable holding the /update_weights key
    allow_updates: bool = True         # False (--no-updates): /update_weights answers 403, no key needed
    auth_completions: bool = False     # also require the key on /v1/* (not just on updates)
    max_batch: int = 256               # rows (prompts x n) decoding at once; finished rows are refilled
    max_n: int = 64
    max_prompts: int = 64              # prompts per /v1/completions request
    max_tokens_limit: int = 4096
    # Decoding of a request that leaves a field out (max_new_tokens: OpenAI's max_tokens;
    # steps_per_block 0 = the model's block size, one token per forward).
    sampling: SamplingSpec = field(default_factory=_serve_sampling)
    max_request_tokens: int = 65536    # compute budget per request: prompts x n x max_tokens
    max_body_mb: float = 4.0           # request body cap of the completion routes (413 above)
    max_stop_strings: int = 16         # stop strings per request (matched off the event loop)
    max_stop_chars: int = 256          # characters per stop string
    max_connections: int = 512         # open connections; more are closed at once (slow-loris)
    header_timeout_s: float = 10.0     # a request's head must arrive within this, else disconnect
    body_timeout_s: float = 60.0       # and its body within this
    max_update_scale: float = 100.0    # an update's largest |w| <= this x the live one's (0 = no check)
    max_update_mb: float = 0.0         # 0 = twice the model's state-dict size + 1 MiB
    batch_wait_ms: float = 2.0         # collection window before an engine loop starts
    max_queue: int = 4096
    use_cache: bool = True
    num_threads: int = 0               # torch intra-op threads (0 = torch's default)
    log_level: str = "warning"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, {
            "port": (lambda v: 0 <= v < 65536, "a port in [0, 65535]"), "max_batch": POSITIVE, "max_n": POSITIVE,
            "max_prompts": POSITIVE, "max_tokens_limit": POSITIVE,
            "max_request_tokens": POSITIVE, "max_body_mb": FINITE_POSITIVE, "max_stop_strings": NON_NEGATIVE,
            "max_stop_chars": POSITIVE, "max_connections": POSITIVE, "header_timeout_s": FINITE_POSITIVE,
            "body_timeout_s": FINITE_POSITIVE, "max_update_scale": FINITE_NON_NEGATIVE,
            "max_update_mb": FINITE_NON_NEGATIVE,
            "batch_wait_ms": FINITE_NON_NEGATIVE, "max_queue": POSITIVE, "num_threads": NON_NEGATIVE,
            "param_dtype": one_of("", "float32", "bfloat16", "float16"),
            "log_level": one_of("critical", "error", "warning", "info", "debug", "trace")})


__all__ = ["ServeConfig"]
