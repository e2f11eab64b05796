"""Bounded server requests (issue 13), measured against a real ``dirl serve`` process on 127.0.0.1.

* ``declared_50mb_413_ms`` / ``declared_50mb_rss_growth_mb`` -- a 50 MB body announced by its
  Content-Length, sent the way an attacker would (keep writing until the server answers): time
  to the 413 and growth of the server's RSS. ``chunked_50mb_*`` -- the same without a
  Content-Length (chunked transfer): refused once the cap is crossed while streaming.
* ``health_idle_ms_*`` / ``health_heavy_ms_*`` -- ``/health`` latency (median, max of
  ``--polls``) on an idle server and while a heavy request (2 prompts x n=64 x 500 tokens) runs.
* ``abandon_to_idle_ms`` -- a client closes its heavy request: time until the server's engine
  is idle again (``running_jobs == 0``), next to ``heavy_step_ms``, the time of one engine step
  of that request (its first-step wall time over the steps it needs, measured in-process).
* ``prompt_4mb_{text,ids}_*`` -- a prompt just under the 4 MB body cap, as text and as token
  ids: its status (400: it cannot fit the context), the request's time, and the worst
  ``/health`` latency meanwhile.
* ``steps_after_cancel_max`` -- in-process, a job cancelled from another thread while its engine
  call runs: the most denoising steps that still ran after ``cancel()`` returned (over ``--trials``).

    python -m benchmarks.serve_limits [--quick]

The server runs with ``use_cache=false`` so that one request is heavy on the tiny model.
Prints ``name=value`` lines.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from benchmarks import serve as serve_bench
from dirl.model.factory import InitConfig, init_checkpoint

HEAVY = {"prompt": [[5, 6, 7], [8, 9]], "n": 64, "max_tokens": 500, "ignore_eos": True, "unmasking": "sequential"}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def raw_post(url: str, path: str, size: int, chunked: bool = False, chunk: int = 1 << 20) -> bytes:
    """POST ``size`` bytes the way an attacker would: keep sending until the server answers (or
    the body is done); returns the head of the response."""
    host, port = url.removeprefix("http://").split(":")
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{length}\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode())
        sent, payload = 0, b'{"prompt": "' + b"a" * chunk
        while sent < size and not select.select([sock], [], [], 0)[0]:
            part = payload[: min(chunk, size - sent)]
            try:
                sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed: read its answer
            sent += len(part)
        response = b""
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
        return response


def open_request(url: str, body: dict) -> socket.socket:
    """Send a completion request on a raw socket and return it unread (close it to abandon it)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def poll_health(url: str, done, timeout_s: float = 120, client: httpx.Client | None = None) -> dict:
    """GET /health until ``done(health)``; bounded by ``timeout_s``."""
    get = client.get if client is not None else httpx.get
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = get(f"{url}/health", timeout=30).json()
        if done(health):
            return health
        time.sleep(0.01)
    raise RuntimeError(f"the server never reached the expected state: {health}")


def start_limited_server(ckpt: Path) -> tuple[subprocess.Popen, str]:
    """No weight updates; the no-cache engine makes one request heavy enough to measure."""
    return serve_bench.start_server(ckpt, "--no-updates", "use_cache=false", env={"OMP_NUM_THREADS": "1"},
                                    timeout_s=180)


def health_ms(client: httpx.Client, url: str, polls: int) -> list[float]:
    """Latency of ``polls`` GET /health on one kept-alive connection (no connect in the timing)."""
    out = []
    for _ in range(polls):
        start = time.perf_counter()
        client.get(f"{url}/health", timeout=30).raise_for_status()
        out.append(1000 * (time.perf_counter() - start))
        time.sleep(0.02)
    return out


def measure_bodies(proc, url: str) -> dict:
    out = {}
    for name, chunked in (("declared", False), ("chunked", True)):
        before = rss_bytes(proc.pid)
        start = time.perf_counter()
        head = raw_post(url, "/v1/completions", 50 << 20, chunked=chunked)
        out[f"{name}_50mb_413_ms"] = 1000 * (time.perf_counter() - start)
        out[f"{name}_50mb_status"] = int(head.split()[1])
        out[f"{name}_50mb_rss_growth_mb"] = (rss_bytes(proc.pid) - before) / 2**20
    return out


def measure_heavy(url: str, polls: int) -> dict:
    out = {}
    with httpx.Client() as client:
        idle = health_ms(client, url, polls)
        sock = open_request(url, HEAVY)
        try:
            poll_health(url, lambda h: h["running_jobs"] >= 1, client=client)
            heavy = health_ms(client, url, polls)
            still_running = client.get(f"{url}/health", timeout=30).json()["running_jobs"] >= 1
            start = time.perf_counter()
        finally:
            sock.close()
        health = poll_health(url, lambda h: h["running_jobs"] == 0, client=client)
        out["abandon_to_idle_ms"] = 1000 * (time.perf_counter() - start)
    out["abandon_cancelled_jobs"] = health["cancelled_jobs"]
    out["heavy_still_running_at_abandon"] = still_running
    out.update(health_idle_ms_median=statistics.median(idle), health_idle_ms_max=max(idle),
               health_heavy_ms_median=statistics.median(heavy), health_heavy_ms_max=max(heavy))
    return out


def measure_big_prompts(url: str, polls: int) -> dict:
    """/health latency while a prompt just under the 4 MB cap is parsed and refused: as text
    (too long for the context: refused before tokenizing) and as token ids (parsed, checked)."""
    out = {}
    cases = {"text": {"prompt": "ab " * ((4 << 20) // 3 - 100), "max_tokens": 4},
             "ids": {"prompt": [5] * ((4 << 20) // 3 - 100), "max_tokens": 4}}
    with httpx.Client() as client:
        for name, body in cases.items():
            data = json.dumps(body).encode()
            statuses: list[int] = []
            sender = threading.Thread(target=lambda: statuses.append(httpx.post(
                f"{url}/v1/completions", content=data, headers={"Content-Type": "application/json"},
                timeout=120).status_code))
            start = time.perf_counter()
            sender.start()
            latencies = health_ms(client, url, polls)
            sender.join()
            out[f"prompt_4mb_{name}_status"] = statuses[0]
            out[f"prompt_4mb_{name}_request_ms"] = 1000 * (time.perf_counter() - start)
            out[f"prompt_4mb_{name}_health_ms_max"] = max(latencies)
    return out


def heavy_step_ms(ckpt: Path) -> float:
    """Wall time of one denoising step of the heavy request (uncached, its first 8 steps)."""
    from dirl.engine.engine import Engine
    from dirl.model.checkpoint import load_pretrained
    from dirl.rollout import SamplingParams

    model, _ = load_pretrained(ckpt)
    calls: list[float] = []
    model.register_forward_hook(lambda *_: calls.append(time.perf_counter()))
    params = SamplingParams(max_new_tokens=32, n=HEAVY["n"], unmasking="sequential", stop_ids=[])
    Engine(model.eval(), use_cache=False).generate(HEAVY["prompt"], params)
    steps = [b - a for a, b in zip(calls, calls[1:])][:8]
    return 1000 * statistics.median(steps)


def steps_after_cancel(ckpt: Path, trials: int) -> int:
    """A heavy job cancelled from this thread while the batcher's engine call runs: the most
    forwards that ran after ``cancel()`` returned."""
    from dirl.model.checkpoint import load_pretrained
    from dirl.rollout import SamplingParams
    from dirl.serve import ServeConfig
    from dirl.serve.batcher import Batcher, RequestCancelled
    from dirl.serve.weights import live_tensors

    model, _ = load_pretrained(ckpt)
    model.eval()
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    batcher = Batcher(model, live_tensors(model), ServeConfig())  # the server's defaults
    batcher.start()
    worst = 0
    try:
        for trial in range(trials):
            params = SamplingParams(max_new_tokens=256, n=32, unmasking="sequential", stop_ids=[], seed=trial)
            job = batcher.submit_generate([[5, 6, 7]] * 4, [0, 1, 2, 3], params)
            deadline = time.monotonic() + 60
            while len(calls) < 5 and time.monotonic() < deadline:  # its engine call is under way
                time.sleep(0.001)
            job.cancel()
            at_cancel = len(calls)
            try:
                job.future.result(timeout=120)
            except RequestCancelled:
                pass
            worst = max(worst, len(calls) - at_cancel)
            calls.clear()
    finally:
        batcher.close()
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer polls and trials")
    parser.add_argument("--polls", type=int, default=None)
    parser.add_argument("--trials", type=int, default=None)
    args = parser.parse_args()
    polls = args.polls or (10 if args.quick else 30)
    trials = args.trials or (3 if args.quick else 10)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint(InitConfig(preset="tiny"), Path(tmp) / "tiny")
        proc, url = start_limited_server(ckpt)
        try:
            results = {**measure_bodies(proc, url), **measure_heavy(url, polls), **measure_big_prompts(url, polls)}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        results["heavy_step_ms"] = heavy_step_ms(ckpt)
        results["steps_after_cancel_max"] = steps_after_cancel(ckpt, trials)
    for key, value in results.items():
        print(f"{key}={value:.1f}" if isinstance(value, float) else f"{key}={value}")


if __name__ == "__main__":
    main()
