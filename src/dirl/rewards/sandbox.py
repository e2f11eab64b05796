"""A sandboxed executor for model-written Python programs (a leaf: it imports nothing from dirl).

Every program runs in a fresh ``python3 -I`` process with an emptied environment (no API keys,
tracker keys or ``HOME``), reading its source from the head of its stdin, so the source never
appears in an argv or a file. Isolation comes in three tiers, best first:

* ``bwrap`` -- bubblewrap: only the system's read-only ``/usr`` (and the interpreter's prefix)
  is visible, a private size-capped ``/tmp`` is the only writable place, and the program gets
  new user, PID, network, IPC, UTS and cgroup namespaces, no capabilities and no nested user
  namespaces. When the outer ``bwrap`` dies, everything inside dies with it.
* ``unshare`` -- ``unshare --net --pid --fork --kill-child --mount-proc`` in a new user
  namespace (mapped to the caller's own uid): no network, a ``/proc`` showing only the run's
  processes (no other process's environment or fds), and killing the run kills its PID
  namespace. The file system is the host's, reduced only by the uid below.
* ``rlimits`` -- resource limits alone.

The tier is probed once per :class:`Sandbox` (a run of ``print(6*7)``); each automatic step
down logs ONE warning line naming what is missing. On every tier, when dirl runs as root each
run gets an unprivileged uid of its own (never a real account), and after the run every
process of that uid is killed and every file it left in ``/tmp``, ``/var/tmp``
and ``/dev/shm`` is removed; the fallback tiers also get a private working directory as
``HOME``/``TMPDIR``. Not as root, the fallback tiers cannot reap a child that left the process
group (``setsid``) unless the PID namespace exists (``unshare``); the warning says so.

Limits (set by the trusted boot code before the program's first line, soft = hard so the
program cannot raise them): CPU seconds, address space, process count (``RLIMIT_NPROC`` counts
the run uid's processes, so a fork bomb stops at ``nproc``), file size, open files. A wall
deadline kills the whole process group; output beyond ``output_bytes`` is cut off and kills
the run too. :meth:`Sandbox.map` runs many programs on a bounded pool (``workers``, default
the core count).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from dirl.rewards.processes import (
    communicate,
    kill_group,
    process_count,
    reap_uid,
    remove_tree,
)

__all__ = ["ISOLATIONS", "RunResult", "Sandbox", "SandboxConfig", "default_sandbox"]

logger = logging.getLogger(__name__)
ISOLATIONS = ("bwrap", "unshare", "rlimits")
ENV_ISOLATION = "DIRL_SANDBOX"  # forces a tier for isolation="auto" (e.g. DIRL_SANDBOX=rlimits)
_T = TypeVar("_T")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ANNOUNCED: set[str] = set()
_ANNOUNCE_LOCK = threading.Lock()

# The trusted first lines of every sandboxed process: lower the limits (hard = soft), then read
# "<n>\n" and n bytes of source from fd 0 and run it as __main__; the rest of stdin is the
# program's. Reading with os.read leaves nothing buffered in sys.stdin.
_BOOT = """\
import os, resource
for _n, _v in {limits!r}:
    resource.setrlimit(getattr(resource, _n), (_v, _v))
def _read(n):
    b = bytearray()
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            raise SystemExit(97)
        b += c
    return bytes(b)
_h = b""
while not _h.endswith(b"\\n"):
    _h += _read(1)
_src = _read(int(_h)).decode("utf-8")
del _n, _v, _h, _read, os, resource
exec(compile(_src, "<program>", "exec"), {{"__name__": "__main__", "__builtins__": __builtins__}})
"""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of one :class:`Sandbox` (all per program run)."""

    isolation: str = "auto"      # auto (best available; $DIRL_SANDBOX forces one) | bwrap | unshare | rlimits
    cpu_s: int = 10              # RLIMIT_CPU
    wall_s: float = 10.0         # default wall deadline of a run (run() may pass its own)
    memory_mb: int = 1024        # RLIMIT_AS
    nproc: int = 16              # RLIMIT_NPROC (plus the processes a non-root user already has)
    file_mb: int = 16            # RLIMIT_FSIZE
    nofile: int = 64             # RLIMIT_NOFILE
    tmp_mb: int = 64             # size of bwrap's private /tmp
    output_bytes: int = 1 << 16  # stdout and stderr are each cut here (and the run killed)
    workers: int = 0             # parallel runs in map(); 0 = os.cpu_count()
    python: str = ""             # interpreter; "" = /usr/bin/python3 if present, else this one's base
    bwrap: str = "bwrap"         # bubblewrap executable (a missing path simulates a host without it)
    unshare: str = "unshare"

    def __post_init__(self) -> None:
        if self.isolation not in ("auto", *ISOLATIONS):
            raise ValueError(f"sandbox isolation must be auto or one of {ISOLATIONS}, got {self.isolation!r}")
        for name in ("cpu_s", "wall_s", "memory_mb", "nproc", "file_mb", "nofile", "tmp_mb", "output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox {name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class RunResult:
    """What one run did. ``status``: ok | exit (non-zero code) | timeout | output_limit."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    output_exceeded: bool = False
    wall_s: float = 0.0
    isolation: str = ""

    @property
    def status(self) -> str:
        if self.timed_out:
            return "timeout"
        if self.output_exceeded:
            return "output_limit"
        return "ok" if self.returncode == 0 else "exit"


@dataclass
class Sandbox:
    """Runs Python sources under :class:`SandboxConfig`; thread-safe, ``workers`` at a time."""

    config: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._isolation: str | None = None
        self._workers = self.config.workers or os.cpu_count() or 1
        self._slots: list[int] = list(range(self._workers))
        self._slot_free = threading.Condition(threading.Lock())
        self._pool: ThreadPoolExecutor | None = None
        self._root = os.geteuid() == 0
        # As root, every run gets a uid of its own, far above real accounts, from a range drawn
        # per instance: two sandboxes (or processes) never reap each other's programs, and the
        # zombies a run may leave for the host's init to reap never count against the next
        # run's RLIMIT_NPROC.
        self._uid_base = 1_000_000 + (1 << 20) * secrets.randbelow(2**11)
        self._uid_count = itertools.count()
        self.python = self.config.python or _default_python()

    # ------------------------------------------------------------------ public

    @property
    def isolation(self) -> str:
        """The tier in use (probed on first use)."""
        with self._lock:
            if self._isolation is None:
                self._isolation = self._probe()
            return self._isolation

    @property
    def workers(self) -> int:
        return self._workers

    def run(self, source: str, stdin: bytes = b"", wall_s: float | None = None) -> RunResult:
        """Run ``source`` with ``stdin`` under the limits; never raises for the program's sake."""
        return self._run(self.isolation, source, stdin, wall_s or self.config.wall_s)

    def map(self, fn: Callable[[_T], Any], items: Iterable[_T]) -> list:
        """``[fn(item) ...]`` on the bounded pool (``fn`` typically calls :meth:`run`)."""
        items = list(items)
        if len(items) <= 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="dirl-sandbox")
        return list(self._pool.map(fn, items))

    # ------------------------------------------------------------------ one run

    def _run(self, isolation: str, source: str, stdin: bytes, wall_s: float) -> RunResult:
        slot = self._acquire()
        uid = self._uid_base + next(self._uid_count) % (1 << 20) if self._root else None
        workdir = None
        started = time.monotonic()
        proc = None
        try:
            if isolation != "bwrap":  # bwrap has its own private /tmp
                workdir = tempfile.mkdtemp(prefix="dirl-sandbox-")
                if uid is not None:
                    os.chown(workdir, uid, uid)
            argv = self._argv(isolation, uid)
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
            if workdir:
                env.update(HOME=workdir, TMPDIR=workdir)
            encoded = source.encode("utf-8")
            payload = b"%d\n" % len(encoded) + encoded + stdin
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=workdir or "/", env=env, close_fds=True, start_new_session=True,
                user=uid, group=uid, extra_groups=[] if uid is not None else None)
            out, err, timed_out, exceeded = communicate(proc, payload, started + wall_s,
                                                         self.config.output_bytes)
            kill_group(proc)
            returncode = proc.wait()
            return RunResult(returncode, out, err, timed_out, exceeded,
                             time.monotonic() - started, isolation)
        except OSError as error:  # the tool itself failed to start: a run that did nothing
            return RunResult(None, b"", str(error).encode(), wall_s=time.monotonic() - started,
                             isolation=isolation)
        finally:
            if proc is not None:
                kill_group(proc)
                proc.wait()
            if uid is not None:
                reap_uid(uid)
            if workdir:
                remove_tree(workdir)
            self._release(slot)

    def _argv(self, isolation: str, uid: int | None) -> list[str]:
        cfg = self.config
        nproc = cfg.nproc + (0 if uid is not None else process_count(os.getuid()))
        limits = [("RLIMIT_CPU", cfg.cpu_s), ("RLIMIT_AS", cfg.memory_mb << 20),
                  ("RLIMIT_NPROC", nproc), ("RLIMIT_FSIZE", cfg.file_mb << 20),
                  ("RLIMIT_NOFILE", cfg.nofile), ("RLIMIT_CORE", 0)]
        python = [self.python, "-I", "-c", _BOOT.format(limits=limits)]
        if isolation == "rlimits":
            return python
        if isolation == "unshare":
            return [cfg.unshare, "--map-current-user", "--net", "--pid", "--fork", "--kill-child",
                    "--mount-proc", "--", *python]
        return [cfg.bwrap, *self._bwrap_mounts(), "--unshare-all", "--unshare-user", "--disable-userns",
                "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox",
                "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
                "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8", "--chdir", "/tmp",
                "--", *python]

    def _bwrap_mounts(self) -> list[str]:
        mounts: list[str] = []
        for path in _SYSTEM_DIRS:
            if os.path.islink(path):
                mounts += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                mounts += ["--ro-bind", path, path]
        prefix = str(Path(os.path.realpath(self.python)).parents[1])
        if not any(prefix == d or prefix.startswith(d + "/") for d in _SYSTEM_DIRS):
            mounts += ["--ro-bind", prefix, prefix]
        return mounts + ["--proc", "/proc", "--dev", "/dev",
                         "--size", str(self.config.tmp_mb << 20), "--tmpfs", "/tmp"]

    # ------------------------------------------------------------------ tiers

    def _probe(self) -> str:
        """The best tier that runs ``print(6*7)``, announcing every automatic step down."""
        wanted = self.config.isolation
        if wanted == "auto":
            wanted = os.environ.get(ENV_ISOLATION, "").strip() or "auto"
            if wanted not in ("auto", *ISOLATIONS):
                raise ValueError(f"${ENV_ISOLATION}={wanted!r}: use one of {ISOLATIONS}")
        if wanted != "auto":
            reason = self._failure(wanted)
            if reason:
                raise RuntimeError(f"sandbox isolation {wanted!r} does not work here: {reason}")
            return wanted
        for tier, lost in (("bwrap", "a private read-only file system"),
                           ("unshare", "the network and PID namespaces")):
            reason = self._failure(tier)
            if not reason:
                return tier
            _announce(f"dirl sandbox: {tier} unavailable ({reason}); programs run without {lost}"
                      + ("" if self._root else "; not root: no per-run uid, so a program can signal"
                         " this user's processes and a setsid child may outlive its run"))
        return "rlimits"

    def _failure(self, tier: str) -> str:
        """Why ``tier`` does not work here ('' if it does)."""
        tool = {"bwrap": self.config.bwrap, "unshare": self.config.unshare}.get(tier)
        if tool and not shutil.which(tool):
            return f"{tool} not found"
        result = self._run(tier, "print(6*7)", b"", 30.0)
        if result.returncode == 0 and result.stdout == b"42\n":
            return ""
        detail = (result.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1]
        return f"{tool or 'python'} failed: {detail[:200]}"

    # ------------------------------------------------------------------ slots

    def _acquire(self) -> int:
        with self._slot_free:
            while not self._slots:
                self._slot_free.wait()
            return self._slots.pop()

    def _release(self, slot: int) -> None:
        with self._slot_free:
            self._slots.append(slot)
            self._slot_free.notify()


# ---------------------------------------------------------------------- helpers


def _announce(message: str) -> None:
    """Log ``message`` as a warning once per process."""
    with _ANNOUNCE_LOCK:
        if message in _ANNOUNCED:
            return
        _ANNOUNCED.add(message)
    logger.warning(message)


def _default_python() -> str:
    if os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3"
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return str(base) if base.exists() else os.path.realpath(sys.executable)


_DEFAULT: Sandbox | None = None
_DEFAULT_LOCK = threading.Lock()


def default_sandbox(**overrides: Any) -> Sandbox:
    """The process-wide sandbox (created on first use); ``overrides`` replace it with a new one."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None or overrides:
            base = _DEFAULT.config if _DEFAULT is not None else SandboxConfig()
            _DEFAULT = Sandbox(replace(base, **overrides))
        return _DEFAULT
