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

from dirl.rollout import SamplingSpec


def _serve_sampling() -> SamplingSpec:
    return SamplingSpec(steps_per_block=0)


@dataclass
class ServeConfig:
    """Everything ``dirl serve`` reads (YAML / ``key=value`` overrides; the CLI flags set some)."""

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
    max_batch: int = 256               # rows (prompts x n) per engine call
    max_n: int = 64
    max_prompts: int = 64              # prompts per /v1/completions request
    max_tokens_limit: int = 4096
    # Decoding of a request that leaves a field out (max_new_tokens: OpenAI's max_tokens;
    # steps_per_block 0 = the model's block size, one token per forward).
    sampling: SamplingSpec = field(default_factory=_serve_sampling)
    max_update_mb: float = 0.0         # 0 = twice the model's state-dict size + 1 MiB
    batch_wait_ms: float = 2.0         # collection window before an engine call
    max_queue: int = 4096
    use_cache: bool = True
    num_threads: int = 0               # torch intra-op threads (0 = torch's default)
    log_level: str = "warning"


__all__ = ["ServeConfig"]
