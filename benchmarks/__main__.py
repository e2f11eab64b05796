"""``python -m benchmarks [--list] [ARGS ...]``: every benchmark in turn, each given ``ARGS`` (e.g. ``--quick``).

Prints a header and a status line per benchmark and exits 1 if any failed; ``--list`` prints the names.
One benchmark alone: ``python -m benchmarks.NAME [ARGS ...]``.
"""

from __future__ import annotations

import runpy
import sys
import time

from benchmarks import available


def run_module(name: str, args: list[str]) -> int:
    """Run ``benchmarks.NAME`` as ``__main__`` with ``args``; returns its exit status."""
    saved_argv = sys.argv
    sys.argv = [f"benchmarks.{name}", *args]
    try:
        runpy.run_module(f"benchmarks.{name}", run_name="__main__")
        return 0
    except SystemExit as stop:
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved_argv


def main(argv: list[str]) -> int:
    if argv[:1] == ["--list"]:
        print("\n".join(available()))
        return 0
    failed = []
    for name in available():
        print(f"== bench {name} ==", flush=True)
        start = time.perf_counter()
        status = run_module(name, argv)
        print(f"== bench {name}: {'ok' if status == 0 else f'FAILED ({status})'} "
              f"in {time.perf_counter() - start:.1f}s ==", flush=True)
        if status:
            failed.append(name)
    if failed:
        print(f"benchmarks: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
