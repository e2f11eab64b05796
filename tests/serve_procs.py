"""``dirl serve`` processes for the server tests, started as soon as collection ends.

A server process spends ~5 s importing torch and FastAPI before it answers. The test
process runs on one core, so :func:`start_early` (called from ``conftest.py`` once the
selected tests are known) launches every server a selected module needs right away; the
imports then run on the other core while earlier tests run, and a module's ``server``
fixture :func:`take` s its process already warm. Run alone, a module starts its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dirl.model.factory import InitConfig, init_checkpoint

KEY = "test-serve-key"
KEY_ENV = "DIRL_TEST_SERVE_KEY"
START_TIMEOUT_S = 90
BODY_LIMIT_MB = 1
# module name -> the ``dirl serve`` flags of its server (one tiny checkpoint each)
SERVERS = {
    "test_serve": (),
    # no KV cache, so that a request can be made heavy
    "test_serve_limits": ("--no-updates", f"max_body_mb={BODY_LIMIT_MB}", "use_cache=false"),
}
_early: dict[str, tuple[subprocess.Popen, str, Path]] = {}
_tmp_dirs: list[str] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(ckpt, *flags, env_key: str | None = KEY):
    """``dirl serve`` on a free loopback port; returns (process, base url)."""
    port = free_port()
    # One intra-op thread: a tiny model gains nothing from more, and on a busy 2-core box
    # spinning OpenMP workers of two processes (server + tests) slow each other down badly.
    env = {**{k: v for k, v in os.environ.items() if k != KEY_ENV}, "OMP_NUM_THREADS": "1"}
    if env_key is not None:
        env[KEY_ENV] = env_key
    cmd = [sys.executable, "-m", "dirl.cli", "serve", "--model", str(ckpt), "--port", str(port),
           "--api-key-env", KEY_ENV, *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dirl serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"dirl serve did not become healthy in {START_TIMEOUT_S}s")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def _launch(module: str, root: Path) -> tuple[subprocess.Popen, str, Path]:
    ckpt = init_checkpoint(InitConfig(preset="tiny"), root / module / "tiny")
    return (*start_server(ckpt, *SERVERS[module]), ckpt)


def start_early(module_names: set[str]) -> None:
    """Launch the server of every selected module that has one (not waiting for them)."""
    wanted = [m for m in SERVERS if m in module_names]
    if wanted:
        root = tempfile.mkdtemp(prefix="dirl-test-serve-")
        _tmp_dirs.append(root)
        for module in wanted:
            _early[module] = _launch(module, Path(root))


def take(module: str, root: Path) -> tuple[subprocess.Popen, str, Path]:
    """``module``'s server (started early, or now under ``root``), healthy; the caller stops it."""
    proc, url, ckpt = _early.pop(module, None) or _launch(module, root)
    try:
        wait_healthy(proc, url)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url, ckpt


def stop_all() -> None:
    """Stop servers never taken (their module was deselected or failed) and remove the checkpoints."""
    while _early:
        stop_server(_early.popitem()[1][0])
    for root in _tmp_dirs:
        shutil.rmtree(root, ignore_errors=True)
