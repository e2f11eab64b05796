"""What dirl may write, replace and delete: only what it wrote itself.

* An output directory (``--out``, ``out=``) that exists and is not empty is refused unless the
  user passes ``overwrite=true``; an output equal to, inside or containing an input (the convert
  source, the merge base or adapters, the eval model) is always refused: replacing it would
  destroy the input.
* Every directory dirl writes atomically carries :data:`MARKER`. Clean-up of half-written or
  replaced directories (``.NAME.tmp-PID`` / ``.NAME.old-PID``) removes an entry only when it is a
  real directory (not a symlink) holding the marker -- never by its name alone, which a user's
  own file may share.
* Paths read from files (a checkpoint's ``latest``, a weight index's shard names) are resolved
  and must stay inside their directory.

A leaf module: every failure is a :class:`~dirl.errors.UserError` (one line, exit status 2).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from dirl.errors import UserError, echo

__all__ = ["MARKER", "OutputError", "check_output", "inside", "mark", "owned", "pop_overwrite", "remove_owned"]

MARKER = ".dirl-owned"


class OutputError(UserError):
    """An output path dirl must not write: it holds something, or it is (part of) an input."""


def mark(directory: Path) -> None:
    """Claim ``directory`` (which dirl just made) as dirl's own."""
    (Path(directory) / MARKER).write_text("written by dirl; dirl may replace or delete this directory\n")


def owned(path: Path) -> bool:
    """Whether ``path`` is a real directory (not a symlink) that dirl marked as its own."""
    path = Path(path)
    marker = path / MARKER
    return (not path.is_symlink() and path.is_dir() and not marker.is_symlink() and marker.is_file())


def remove_owned(path: Path) -> bool:
    """Delete ``path`` if dirl owns it (see :func:`owned`); returns whether it did. ``rmtree``
    does not follow symlinks inside the tree, so nothing outside ``path`` is touched."""
    if not owned(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def _nested(a: Path, b: Path) -> bool:
    """``a`` equals ``b`` or lies inside it."""
    return a == b or b in a.parents


def check_output(out: str | Path | None, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                 key: str = "--out") -> Path:
    """Check an output directory before any work: not empty-named, not a file, not overlapping an
    input, and empty or absent unless ``overwrite``. Returns it as a ``Path``."""
    if out is None or not str(out).strip():
        raise OutputError(f"{key} is empty; name the directory to write")
    path = Path(out).expanduser()
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{key}={echo(str(out))}: a dangling symlink; name a real directory")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{key}={echo(str(out))}: exists and is not a directory")
    target = _resolved(path)
    for source in inputs:
        if source is None or not str(source).strip() or str(source).startswith(("init:", "task:")):
            continue
        source_path = _resolved(source)
        if _nested(target, source_path) or _nested(source_path, target):
            raise OutputError(f"{key}={echo(str(out))} overlaps the input {echo(str(source))}: writing "
                              "there would destroy it; choose another directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"{key}={echo(str(out))} exists and is not empty; choose a new directory, "
                          "or pass overwrite=true to replace it")
    return path


def inside(path: str | Path, directory: str | Path, what: str) -> Path:
    """``path`` resolved, which must lie inside ``directory`` (a ``..`` or a symlink out of it
    is a :class:`UserError` naming ``what``)."""
    resolved, root = _resolved(path), _resolved(directory)
    if not _nested(resolved, root) or resolved == root:
        raise UserError(f"{what}: {echo(str(path))} points outside {root}; refusing to follow it")
    return resolved


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def pop_overwrite(overrides: list[str]) -> tuple[list[str], bool]:
    """Split an ``overwrite=true|false`` item off a command's ``key=value`` overrides (the
    commands whose config has no such field: init, convert, eval)."""
    rest, overwrite = [], False
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "overwrite":
            if value.strip().lower() not in _TRUE + _FALSE:
                raise OutputError(f"overwrite: expected true or false, got {echo(value)}")
            overwrite = value.strip().lower() in _TRUE
        else:
            rest.append(item)
    return rest, overwrite
