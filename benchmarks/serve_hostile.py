"""A hostile client against a real ``dirl serve`` on 127.0.0.1 (issue 30).

* ``slowloris_*`` -- ``--connections`` sockets (3,000 by default, opened in batches of 100) each
  send half a request head and stall: the server's RSS before, at the peak and
  ``--settle`` seconds after they were all opened (the server cuts them at its connection cap
  at once and the rest at ``header_timeout_s``), and how many the server closed by itself.
* ``worst_*`` -- ``/health`` latency (p50 / p99 / max over every poll) while the heaviest request
  the default server accepts runs: n=64 x max_tokens=500 and 16 stop strings of 256 characters
  (the caps), plus the request's time.

    python -m benchmarks.serve_hostile [--quick] [--connections 3000] [--settle 12]

``--quick``: 300 connections, 3 s to settle, a worst request of n=8.

Prints ``name=value`` lines.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks import serve as serve_bench
from benchmarks.serve_limits import open_request, rss_bytes
from dirl.model.factory import InitConfig, init_checkpoint

WORST = {"prompt": [[5, 6, 7]], "n": 64, "max_tokens": 500, "ignore_eos": True, "unmasking": "sequential",
         "stop": ["\u00e9" * 255 + f"{i:x}" for i in range(16)]}


def slowloris(url: str, proc, connections: int, settle_s: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    before = rss_bytes(proc.pid)
    socks, peak = [], before
    for start in range(0, connections, 100):  # bounded: batches of 100, each socket sends once
        for _ in range(min(100, connections - start)):
            try:
                sock = socket.create_connection((host, int(port)), timeout=5)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                socks.append(sock)
            except OSError:
                break
        peak = max(peak, rss_bytes(proc.pid))
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        peak = max(peak, rss_bytes(proc.pid))
        time.sleep(0.5)
    closed = 0
    for sock in socks:
        sock.settimeout(0.05)
        try:
            closed += sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed += 1
        except (TimeoutError, OSError):
            pass
        sock.close()
    time.sleep(1.0)
    after = rss_bytes(proc.pid)
    ok = httpx.get(f"{url}/health", timeout=10).status_code
    return {"slowloris_opened": len(socks), "slowloris_closed_by_server": closed,
            "slowloris_rss_before_mb": round(before / 2**20, 1), "slowloris_rss_peak_mb": round(peak / 2**20, 1),
            "slowloris_rss_after_mb": round(after / 2**20, 1),
            "slowloris_rss_growth_after_mb": round((after - before) / 2**20, 1), "health_after": ok}


def worst_request(url: str, n: int = 64) -> dict:
    done = threading.Event()
    outcome: dict = {}

    def send():
        started = time.perf_counter()
        sock = open_request(url, {**WORST, "n": n})
        sock.settimeout(1800)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        outcome["status"] = int(data.split(b" ", 2)[1]) if data else 0
        outcome["seconds"] = time.perf_counter() - started
        sock.close()
        done.set()

    worker = threading.Thread(target=send, daemon=True)
    worker.start()
    latencies = []
    with httpx.Client() as client:
        client.get(f"{url}/health")
        while not done.is_set() and len(latencies) < 20000:
            started = time.perf_counter()
            client.get(f"{url}/health", timeout=30)
            latencies.append(1000 * (time.perf_counter() - started))
            time.sleep(0.01)
    worker.join(600)
    latencies.sort()
    return {"worst_status": outcome.get("status"), "worst_request_s": round(outcome.get("seconds", 0), 2),
            "worst_health_polls": len(latencies), "worst_health_p50_ms": round(statistics.median(latencies), 2),
            "worst_health_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 2),
            "worst_health_max_ms": round(latencies[-1], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--settle", type=float, default=12.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.connections, args.settle = min(args.connections, 300), 3.0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint(InitConfig(preset="tiny"), Path(tmp) / "ckpt")
        proc, url = serve_bench.start_server(ckpt, "--no-updates", env={"OMP_NUM_THREADS": "1"}, timeout_s=180)
        try:
            httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8}, timeout=120)  # warm up
            results = {**slowloris(url, proc, args.connections, args.settle),
                       **worst_request(url, n=8 if args.quick else 64)}
        finally:
            proc.terminate()
            proc.wait(30)
    for key, value in results.items():
        print(f"{key}={value}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
