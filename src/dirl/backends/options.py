"""Each rollout backend's own settings, as typed dataclasses (``rollout.native.*``,
``rollout.checkpoint.*``, ``rollout.http.*`` in an RL config).

Torch- and httpx-free, so a config can name them without importing a backend. A backend is
built from its own options only (:func:`dirl.backends.base.make_backend`); an RL config that sets
an option of a backend it does not use is an error naming the key (:func:`unused_options`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dirl.errors import POSITIVE, check_fields
from dirl.rollout import EngineOptions


@dataclass
class NativeOptions(EngineOptions):  # + compile, batching, max_batch_tokens
    """The in-process engine on the trainer's own weights (:class:`~dirl.backends.native.NativeBackend`)."""

    max_batch_rows: int = 256         # rows decoding at once (continuous batching refills finished ones)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, {"max_batch_rows": POSITIVE})


@dataclass
class CheckpointOptions(NativeOptions):
    """The save-and-reload loop (:class:`~dirl.backends.native.CheckpointBackend`), for measurement."""

    workdir: str | None = None        # where the policy is saved each step; None: a fresh temp dir


@dataclass
class HttpOptions:
    """A client of ``dirl serve`` (:class:`~dirl.backends.http.HttpBackend`)."""

    url: str = ""                       # the server's root, e.g. http://127.0.0.1:8000 (required)
    api_key: str | None = None          # default: the environment variable ``api_key_env``
    api_key_env: str = "DIRL_API_KEY"
    timeout: float = 600.0              # seconds per request
    max_concurrency: int = 64           # requests in flight
    weights_dtype: str | None = None    # cast pushed tensors, e.g. "bfloat16" (server bf16, trainer fp32)
    sync_on_init: bool = True           # push the trainer's weights at construction: the first rollouts use them

    def __post_init__(self) -> None:
        check_fields(self, {"timeout": POSITIVE, "max_concurrency": POSITIVE})


# backend name -> its options class (the keys of dirl.backends.base.BACKENDS)
OPTIONS = {"native": NativeOptions, "checkpoint": CheckpointOptions, "http": HttpOptions}


def unused_options(chosen: str, sections: dict[str, object]) -> list[str]:
    """``section.field`` of every option set (not at its default) in a backend other than ``chosen``."""
    out = []
    for name, options in sections.items():
        if name == chosen:
            continue
        default = type(options)()
        out += [f"{name}.{f.name}" for f in dataclasses.fields(options)
                if getattr(options, f.name) != getattr(default, f.name)]
    return out
