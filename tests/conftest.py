"""Shared fixtures: a tiny fp32 model on the char tokenizer, and checkpoint dirs.

Kept generic so every test module can reuse them:

* ``tokenizer``      -- the built-in char tokenizer (session-scoped, ~100 ids).
* ``tiny_model``     -- a fresh ``tiny`` preset model (2 layers, d 64), fp32, eval
  mode, seed 0; function-scoped, so a test may modify it freely.
* ``make_tiny_model``-- factory ``make_tiny_model(seed=0, block_size=4, **model_fields)``.
* ``tiny_checkpoint``-- a saved checkpoint directory of ``tiny_model`` (weights +
  tokenizer), in a per-test tmp dir.
* ``ckpt_dir``       -- an empty-path (not yet created) checkpoint directory in tmp.
* ``tiny_ckpt``      -- a session-wide ``dirl init`` checkpoint of the tiny preset (read-only).
* ``one_thread``     -- autouse: every test runs torch on one intra-op thread.
* the ``dirl serve`` processes of the server tests start as soon as collection ends
  (``pytest_collection_finish``, tests/serve_procs.py).
* ``sdar_tokenizer`` -- the real SDAR/Qwen tokenizer of ``SDAR_DIR``, loaded once per session
  (~0.7 s a load): read-only.
* ``SHARED`` / ``SDAR_DIR`` -- the shared data folder and the real SDAR-8B-Chat
  config/tokenizer folder (tests needing it skip when absent).
"""

from __future__ import annotations

import os

# One intra-op thread: tiny models gain nothing from more, and tests that run a
# server or several ranks beside the test process otherwise oversubscribe the
# cores badly (measured: up to 10x slower on 2 cores). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No fsync of checkpoints (dirl.model.checkpoint.fsync_enabled): the atomic renames still run, and
# tests/test_checkpoint.py checks the fsyncs with it on. Subprocesses inherit it too.
os.environ.setdefault("DIRL_FSYNC", "0")

from pathlib import Path  # noqa: E402

import pytest
import torch

from dirl.model.checkpoint import save_pretrained
from dirl.model.factory import InitConfig, init_checkpoint, init_model
from dirl.model.tokenizer import char_tokenizer

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
# DIRL_SHARED: where the shared folder is when the checkout is not beside it (a worktree).
SHARED = Path(os.environ.get("DIRL_SHARED", REPO.parent / "shared"))
SDAR_DIR = SHARED / "sdar-8b-chat"


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in character tokenizer."""
    return char_tokenizer()


@pytest.fixture
def make_tiny_model(tokenizer):
    """Factory for tiny fp32 models: ``make_tiny_model(seed=0, block_size=4, **model_fields)``."""

    def make(seed: int = 0, block_size: int = 4, **model_fields):
        cfg = InitConfig(preset="tiny", seed=seed, block_size=block_size, param_dtype="float32",
                         model=model_fields)
        return init_model(cfg, tokenizer).eval()

    return make


@pytest.fixture
def tiny_model(make_tiny_model):
    """A tiny (2 layers, d 64) fp32 model in eval mode, block size 4, seed 0."""
    return make_tiny_model()


@pytest.fixture
def peaky_model(tiny_model):
    """The tiny model with a sharper LM head: confidences spread over (0, 1), so
    dynamic unmasking commits several tokens in some forwards and one in others."""
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(20.0)
    return tiny_model


@pytest.fixture
def ckpt_dir(tmp_path) -> Path:
    """A checkpoint directory path inside the test's tmp dir (not created yet)."""
    return tmp_path / "ckpt"


@pytest.fixture
def tiny_checkpoint(tiny_model, tokenizer, ckpt_dir) -> Path:
    """``tiny_model`` saved with its tokenizer; returns the directory."""
    return save_pretrained(tiny_model, tokenizer, ckpt_dir)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A ``tiny`` preset checkpoint (seed 0, char tokenizer) shared by the session: do not modify."""
    return init_checkpoint(InitConfig(preset="tiny"), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread: with several torch processes sharing the 2
    cores, OpenMP workers spin against each other (measured 40x slower on 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sdar_dir() -> Path:
    """The real SDAR-8B-Chat config/tokenizer folder (skips the test when absent)."""
    if not (SDAR_DIR / "config.json").exists():
        pytest.skip(f"{SDAR_DIR} not available")
    return SDAR_DIR


@pytest.fixture(scope="session")
def sdar_tokenizer(sdar_dir):
    """The real SDAR-8B-Chat tokenizer (151,936 ids), shared by the session: do not modify."""
    from dirl.model.tokenizer import load_tokenizer

    return load_tokenizer(sdar_dir)


def pytest_collection_finish(session):
    """Launch the ``dirl serve`` processes the selected server tests need (tests/serve_procs.py):
    their ~5 s of imports then overlap the tests that run before them."""
    import serve_procs

    serve_procs.start_early({item.module.__name__ for item in session.items if item.module is not None})


def pytest_sessionfinish(session):
    import serve_procs

    serve_procs.stop_all()
