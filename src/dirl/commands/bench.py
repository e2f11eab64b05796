"""``dirl bench NAME [args ...]``: run ``benchmarks/NAME.py`` of the repository.

Benchmarks live outside the package (``benchmarks/`` beside ``src/``), so this
command finds that folder relative to the installed (editable) package and runs
the script with :mod:`runpy`, passing the remaining arguments through
(``dirl bench engine --quick``); a name may spell ``_`` as ``-`` (``dirl bench
estimator-bias`` runs ``estimator_bias.py``). ``dirl bench all`` runs every script in turn and
fails if any failed; ``dirl bench list`` prints the names.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
from pathlib import Path


def benchmarks_dir() -> Path:
    """``<repo>/benchmarks`` (``src/dirl/../../benchmarks``), overridable with ``DIRL_BENCHMARKS``."""
    if os.environ.get("DIRL_BENCHMARKS"):
        return Path(os.environ["DIRL_BENCHMARKS"])
    import dirl

    return Path(dirl.__file__).resolve().parents[2] / "benchmarks"


def available() -> dict[str, Path]:
    """Benchmark name -> script path."""
    folder = benchmarks_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.stem.startswith("_")}


def add_arguments(parser) -> None:
    parser.add_argument("name", help="benchmark name (a file benchmarks/NAME.py, '-' for '_'), 'all' or 'list'")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (e.g. --quick)")


def run_script(path: Path, args: list[str]) -> int:
    """Run one benchmark script as ``__main__``; returns its exit status."""
    saved_argv = sys.argv
    sys.argv = [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
        return 0
    except SystemExit as stop:
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved_argv


def run(args) -> int:
    scripts = available()
    if not scripts:
        print(f"dirl bench: no benchmarks found in {benchmarks_dir()} -- run from a source checkout "
              "(pip install -e .) or set DIRL_BENCHMARKS", file=sys.stderr)
        return 2
    wanted = args.name.replace("-", "_")
    if wanted == "list":
        print("\n".join(scripts))
        return 0
    if wanted != "all" and wanted not in scripts:
        print(f"dirl bench: unknown benchmark {args.name!r}; available: {', '.join(scripts)}, all",
              file=sys.stderr)
        return 2
    names = list(scripts) if wanted == "all" else [wanted]
    failed = []
    for name in names:
        if len(names) > 1:
            print(f"== bench {name} ==", flush=True)
        start = time.perf_counter()
        status = run_script(scripts[name], list(args.args))
        if len(names) > 1:
            print(f"== bench {name}: {'ok' if status == 0 else f'FAILED ({status})'} "
                  f"in {time.perf_counter() - start:.1f}s ==", flush=True)
        if status:
            failed.append(name)
    if failed:
        print(f"dirl bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
