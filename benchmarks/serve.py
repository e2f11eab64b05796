"""Serving benchmark: a real ``dirl serve`` process on 127.0.0.1, measured from a client.

* ``c{1,8,32}_requests_per_s`` / ``c{1,8,32}_tokens_per_s`` -- completions with
  1, 8 and 32 concurrent clients (threads, each sending ``--requests`` requests
  with its own seeds), with their ``p50_ms`` / ``p99_ms`` request latencies;
  ``batching_speedup_c32_vs_c1`` is the headline ratio: what the batcher gains by
  packing concurrent requests into shared engine calls.
* ``mixed_c32_*`` -- 32 clients whose requests mix lengths (every 8th asks for 4x
  ``--max-tokens``, the rest for half of it): tokens/s and p50 / p99 latency, where
  a short request joining the running engine loop need not wait for a long one.
* ``mixed_c32_cap8_{continuous,shared}_*`` -- the same mixed load on servers of ``max_batch=8``
  rows, FIFO (``batching=continuous``) against time sharing (``batching=shared``).
* ``update_ms_median`` -- a full state dict pushed to ``/update_weights``
  (serialisation + HTTP + validation + swap, idle server), next to what changing
  weights costs without it, in the same run: ``restart_ms`` (save a checkpoint,
  start a fresh ``dirl serve`` on it, wait for /health) and ``reload_ms_median``
  (save + load into a new model in-process, the trainer-side reload loop).

    python -m benchmarks.serve [--quick] [--markdown BENCHMARKS.md]

``--quick`` uses the tiny preset and fewer requests. Prints ``name=value`` lines;
``--markdown PATH`` also appends a "Serve" section with the numbers to PATH.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save as save_safetensors

from dirl.model.checkpoint import load_pretrained, save_pretrained
from dirl.model.factory import InitConfig, init_checkpoint

KEY = "bench-serve-key"
PROMPTS = ["Hello", "What is 12 + 30?", "The quick brown fox jumps over", "Q: name a prime.\nA:"]


def start_server(ckpt: Path, *serve_args: str, env: dict | None = None,
                 timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """``dirl serve --model CKPT SERVE_ARGS`` on a free loopback port; returns once /health is 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "dirl.cli", "serve", "--model", str(ckpt), "--port", str(port), *serve_args]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dirl serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"dirl serve did not start in {timeout_s:.0f} s")


def start_keyed_server(ckpt: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """The server this benchmark measures: weight updates on (API key ``KEY``)."""
    return start_server(ckpt, *([f"num_threads={threads}"] if threads else []), env={"DIRL_API_KEY": KEY})


def mixed_lengths(worker: int, k: int, cap: int) -> int:
    """Heavy-tailed ``max_tokens`` per request: most short, every 8th at ``cap`` (deterministic)."""
    return cap if (worker * 5 + k) % 8 == 0 else max(4, cap // 8)


def load_test(url: str, clients: int, requests: int, max_tokens: int,
              lengths=None) -> tuple[float, float, list[float]]:
    """(requests/s, completion tokens/s, per-request latencies in s) with ``clients`` threads of
    ``requests`` requests each; ``lengths(worker, k)`` gives each request's max_tokens (default all
    ``max_tokens``)."""
    tokens, errors, latencies = [], [], []

    def client(worker: int, http: httpx.Client) -> None:
        for k in range(requests):
            body = {"prompt": PROMPTS[(worker + k) % len(PROMPTS)],
                    "max_tokens": lengths(worker, k) if lengths else max_tokens,
                    "seed": 1000 * worker + k, "ignore_eos": True}
            try:
                start = time.perf_counter()
                response = http.post("/v1/completions", json=body)
                tokens.append(response.json()["usage"]["completion_tokens"])
                latencies.append(time.perf_counter() - start)
            except Exception as err:  # noqa: BLE001 -- reported below
                errors.append(repr(err))

    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        threads = [threading.Thread(target=client, args=(w, http)) for w in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return len(tokens) / wall, sum(tokens) / wall, latencies


def percentile_ms(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values`` seconds, in ms."""
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def update_latency(url: str, ckpt: Path, repeats: int, threads: int) -> dict[str, float]:
    """Median ms of a full-state-dict push, against the two ways to change weights without it.

    ``reload``: save a checkpoint and load it into a fresh model in-process (the
    trainer-side reload loop); ``restart``: save a checkpoint and start a new
    ``dirl serve`` on it, until it answers /health (what a server without live
    updates needs).
    """
    model, tokenizer = load_pretrained(ckpt)
    state = {k: v + 0.01 for k, v in model.state_dict().items()}
    pushes, reloads = [], []
    with httpx.Client(base_url=url, timeout=600) as http, tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            start = time.perf_counter()
            response = http.post("/update_weights", content=save_safetensors(state),
                                 headers={"Authorization": f"Bearer {KEY}"})
            pushes.append(time.perf_counter() - start)
            response.raise_for_status()
            start = time.perf_counter()
            save_pretrained(model, tokenizer, Path(tmp) / "ckpt")
            load_pretrained(Path(tmp) / "ckpt", with_tokenizer=False)
            reloads.append(time.perf_counter() - start)
        start = time.perf_counter()
        proc, _ = start_keyed_server(save_pretrained(model, tokenizer, Path(tmp) / "restart"), threads)
        restart = time.perf_counter() - start
        proc.terminate()
        proc.wait(timeout=30)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    push_ms, reload_ms = 1000 * statistics.median(pushes), 1000 * statistics.median(reloads)
    return {"update_mb": round(nbytes / 2**20, 2), "update_ms_median": round(push_ms, 1),
            "reload_ms_median": round(reload_ms, 1), "restart_ms": round(1000 * restart, 1),
            "update_speedup_vs_reload": round(reload_ms / push_ms, 2),
            "update_speedup_vs_restart": round(1000 * restart / push_ms, 2)}


def run_benchmark(args) -> dict[str, float | int | str]:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint(InitConfig(preset=args.preset), Path(tmp) / args.preset)
        params = sum(t.numel() for t in load_pretrained(ckpt, with_tokenizer=False)[0].state_dict().values())
        proc, url = start_keyed_server(ckpt, args.threads)
        try:
            out: dict[str, float | int | str] = {"preset": args.preset, "params_millions": round(params / 1e6, 2),
                                                 "max_tokens": args.max_tokens, "requests_per_client": args.requests}
            load_test(url, 4, 1, args.max_tokens)  # warm-up
            for clients in (1, 8, 32):
                rps, tps, lat = load_test(url, clients, args.requests, args.max_tokens)
                out[f"c{clients}_requests_per_s"], out[f"c{clients}_tokens_per_s"] = round(rps, 2), round(tps, 1)
                out[f"c{clients}_p50_ms"], out[f"c{clients}_p99_ms"] = percentile_ms(lat, .5), percentile_ms(lat, .99)
            out["batching_speedup_c32_vs_c1"] = round(out["c32_requests_per_s"] / out["c1_requests_per_s"], 2)
            # Mixed lengths: a short request need not wait for a long one's engine call to end.
            rps, tps, lat = load_test(url, 32, args.requests, args.max_tokens,
                                      lambda w, k: mixed_lengths(w, k, 4 * args.max_tokens))
            out["mixed_c32_tokens_per_s"], out["mixed_c32_requests_per_s"] = round(tps, 1), round(rps, 2)
            out["mixed_c32_p50_ms"], out["mixed_c32_p99_ms"] = percentile_ms(lat, .5), percentile_ms(lat, .99)
            out.update(update_latency(url, ckpt, args.update_repeats, args.threads))
            stats = httpx.get(f"{url}/health", timeout=10).json()
            out["engine_calls"], out["jobs"] = stats["engine_calls"], stats["jobs"]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        for batching in ("continuous", "shared"):
            out.update(mixed_at_capacity(ckpt, args, batching))
    return out


def mixed_at_capacity(ckpt: Path, args, batching: str, max_batch: int = 8) -> dict[str, float]:
    """The mixed-length load with more requests than ``max_batch`` rows, on a server with ``batching``:
    FIFO makes a short request wait for a row to end, time sharing runs it beside the long ones."""
    proc, url = start_server(ckpt, f"max_batch={max_batch}", f"batching={batching}",
                             *([f"num_threads={args.threads}"] if args.threads else []), env={"DIRL_API_KEY": KEY})
    try:
        load_test(url, 4, 1, args.max_tokens)  # warm-up
        _, tps, lat = load_test(url, 32, args.requests, args.max_tokens,
                                lambda w, k: mixed_lengths(w, k, 4 * args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    name = f"mixed_c32_cap{max_batch}_{batching}"
    return {f"{name}_tokens_per_s": round(tps, 1), f"{name}_p50_ms": percentile_ms(lat, .5),
            f"{name}_p99_ms": percentile_ms(lat, .99)}


def markdown(results: dict, command: str) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in results.items())
    return (f"\n## Serve\n\n`{command}` (CPU, {os.cpu_count()} cores; a real `dirl serve` process on "
            f"127.0.0.1, clients are threads in the benchmark process)\n\n| metric | value |\n|---|---|\n{rows}\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 requests per client")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--update-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="server torch threads (0: torch default; 1 avoids OpenMP oversubscription on a busy CPU)")
    parser.add_argument("--markdown", default=None, help="append a 'Serve' section to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.requests, args.update_repeats = "tiny", 2, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the client side only serialises; leave the cores to the server
    results = run_benchmark(args)
    for key, value in results.items():
        print(f"{key}={value}")
    if args.markdown:
        command = "python -m benchmarks.serve " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.markdown, "a") as f:
            f.write(markdown(results, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
