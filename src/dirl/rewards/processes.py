"""Process plumbing of the sandbox (:mod:`dirl.rewards.sandbox`): feeding and draining a run's
pipes under a deadline and an output cap, killing its process group, and reaping every process
and scratch file of a run's uid. A leaf: nothing here knows about tiers or programs."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import stat
import subprocess
import time

__all__ = ["communicate", "kill_group", "pids_of", "process_count", "reap_uid", "remove_tree"]

SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def communicate(proc: subprocess.Popen, payload: bytes, deadline: float,
                 cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin, collect stdout/stderr up to ``cap`` each; stop at the deadline, when the
    output overflows, or shortly after the process exits (a grandchild may hold the pipes)."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    selector = selectors.DefaultSelector()
    for stream in buffers:
        selector.register(stream, selectors.EVENT_READ)
    pending = memoryview(payload)
    os.set_blocking(proc.stdin.fileno(), False)
    selector.register(proc.stdin, selectors.EVENT_WRITE)
    timed_out = exceeded = False
    exit_grace: float | None = None
    try:
        while len(selector.get_map()) > 0 and not exceeded:
            now = time.monotonic()
            if exit_grace is None and proc.poll() is not None:
                exit_grace = now + 0.2
            stop = deadline if exit_grace is None else min(deadline, exit_grace)
            if now >= stop:
                timed_out = exit_grace is None or now >= deadline
                break
            for key, _ in selector.select(min(stop - now, 0.05)):
                stream = key.fileobj
                if stream is proc.stdin:
                    try:
                        pending = pending[os.write(stream.fileno(), pending[:1 << 16]):]
                    except (BrokenPipeError, BlockingIOError, OSError):
                        pending = pending[len(pending):]
                    if not pending:
                        selector.unregister(stream)
                        stream.close()
                    continue
                chunk = os.read(stream.fileno(), 1 << 16)
                if not chunk:
                    selector.unregister(stream)
                    continue
                buffer = buffers[stream]
                room = max(cap - len(buffer), 0)
                buffer += chunk[:room]
                exceeded = exceeded or len(chunk) > room
    finally:
        selector.close()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
    if exit_grace is None and not timed_out and not exceeded:
        try:
            proc.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            timed_out = True
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), timed_out, exceeded


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def pids_of(uid: int) -> list[int]:
    """Live (not zombie) processes of ``uid``. A zombie holds nothing but its pid; it waits for
    the host's init, which this process does not control, to reap it."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    if fh.read().rpartition(b")")[2].split()[0] != b"Z":
                        pids.append(int(entry))
            except (OSError, IndexError):
                pass
    return pids


def process_count(uid: int) -> int:
    return len(pids_of(uid))


def reap_uid(uid: int) -> None:
    """Kill every process of ``uid`` (until none is left) and delete what it left in the
    scratch directories."""
    for _ in range(200):
        pids = pids_of(uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)
    for scratch in SCRATCH_DIRS:
        try:
            entries = os.listdir(scratch)
        except OSError:
            continue
        for name in entries:
            path = os.path.join(scratch, name)
            try:
                if os.lstat(path).st_uid == uid:
                    remove_tree(path)
            except OSError:
                pass


def remove_tree(path: str) -> None:
    """Remove a file or a tree the program may have made unreadable (chmod 000)."""
    if os.path.islink(path) or not os.path.isdir(path):
        try:
            os.unlink(path)
        except OSError:
            pass
        return

    def retry(function, failed, _info) -> None:
        try:
            os.chmod(os.path.dirname(failed), stat.S_IRWXU)
            os.chmod(failed, stat.S_IRWXU)
            function(failed)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)
