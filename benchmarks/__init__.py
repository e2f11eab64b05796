"""The benchmarks: one module each, run from the repository root as ``python -m benchmarks.NAME [--quick]``;
``python -m benchmarks [ARGS ...]`` (``make bench``) runs them all. Each prints ``key=value`` lines, and
BENCHMARKS.md records the numbers with the command that measured them.

They live beside ``src/`` rather than inside the installed package: they need the repository (configs,
the shipped demo data) and are tools for developers, not part of ``dirl``'s API.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path


def available() -> list[str]:
    """The benchmark module names (modules whose name starts with ``_`` are helpers)."""
    folder = str(Path(__file__).resolve().parent)
    return sorted(m.name for m in pkgutil.iter_modules([folder]) if not m.name.startswith("_"))
