"""``dirl serve``: an OpenAI-compatible HTTP server with authenticated live weight updates.

* :mod:`dirl.serve.app` -- the FastAPI app (routes, errors, streaming) and :class:`ServeConfig`;
* :mod:`dirl.serve.schemas` -- request fields (OpenAI + dLLM + RL extensions);
* :mod:`dirl.serve.batcher` -- one worker thread owns the engine and batches requests;
* :mod:`dirl.serve.weights` -- validating and swapping in pushed state dicts.

The trainer side of the protocol is :class:`dirl.backends.http.HttpBackend`.
"""

from __future__ import annotations

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    # Lazy: importing the package must not pull in FastAPI for users of the schemas only.
    if name in __all__:
        from dirl.serve import app

        return getattr(app, name)
    raise AttributeError(name)
