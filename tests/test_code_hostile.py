"""The hostile-program matrix (tests/code_hostile.py) under bubblewrap and the fallbacks.

Each case must score 0 with a reason, and nothing may be left behind: no process of the
sandbox's slot uids (as root) or carrying a case's marker, no file at any target path, no
working directory. The default tier runs the fast cases under the best executor and the
rlimits fallback; the integration tier runs every case under every tier and prints the counts
(``n tried / n scored 0 / n left a process or file``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading

import pytest

from dirl.rewards.code_harness import run_check
from dirl.rewards.processes import pids_of as _pids_of
from dirl.rewards.sandbox import Sandbox, SandboxConfig
from tests.code_hostile import SLEEP_MARKS, cases, targets

TIERS = ["bwrap", "unshare", "rlimits"]


def _listener():
    """A TCP listener on 127.0.0.1 recording whether anything connected."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                seen.append(conn.recv(16) or b"connected")
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return server, seen, stop, thread


def _marked_processes() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        for case, mark in SLEEP_MARKS.items():
            if mark.encode() in argv:
                found.setdefault(case, []).append(int(pid))
    return found


def _live_uids() -> set[int]:
    uids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uids.add(os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            pass
    return {uid for uid in uids if _pids_of(uid)}  # zombies (init reaps them) do not count


def _workdirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("dirl-sandbox-")}


def run_matrix(isolation: str, selected: list[str] | None = None, timeout_s: float = 1.0) -> dict:
    """Run the matrix under one tier; return counts and the offending cases."""
    if isolation == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed")
    if isolation == "rlimits" and os.geteuid() != 0:
        pytest.skip("rlimits alone, not as root, gives a run no uid of its own: its programs "
                    "could signal this test process")
    sandbox = Sandbox(SandboxConfig(isolation=isolation, cpu_s=2, nproc=12, memory_mb=512, file_mb=8))
    assert sandbox.isolation == isolation
    os.environ["DIRL_TEST_SECRET"] = "SECRET-" + secrets.token_hex(4)  # must not reach programs
    server, seen, stop, thread = _listener()
    before = _workdirs()
    try:
        matrix = [c for c in cases(server.getsockname()[1]) if selected is None or c.name in selected]
        secret = secrets.randbelow(10**12) + 2
        verdicts = sandbox.map(lambda c: run_check(sandbox, c.source(isolation), c.test(secret), "f",
                                                   timeout_s=timeout_s), matrix)
    finally:
        stop.set()
        thread.join()
        server.close()
        del os.environ["DIRL_TEST_SECRET"]
    left = {name for name, pids in _marked_processes().items() if pids}
    left |= {f"file {t}" for t in targets() if os.path.lexists(t)}
    left |= {f"workdir {d}" for d in _workdirs() - before}
    if os.geteuid() == 0:  # every run had its own uid, from [_uid_base, _uid_base + 2**20)
        left |= {f"uid {uid}" for uid in _live_uids() if 0 <= uid - sandbox._uid_base < 1 << 20}
    scored = {c.name: v for c, v in zip(matrix, verdicts)}
    print(f"\nhostile matrix [{isolation}]: {len(matrix)} tried / "
          f"{sum(not v.passed for v in verdicts)} scored 0 / {len(left)} left a process or file")
    for name, verdict in scored.items():
        print(f"  {name:28s} {verdict.kind:10s} {verdict.reason[:70]}")
    return {"scored": scored, "left": left, "traffic": list(seen)}


def _assert_clean(result: dict, isolation: str) -> None:
    passed = [name for name, v in result["scored"].items() if v.passed]
    assert passed == [], f"{isolation}: these hostile programs scored 1: {passed}"
    assert all(v.reason for v in result["scored"].values())
    assert result["left"] == set(), f"{isolation}: left behind {sorted(result['left'])}"
    if isolation != "rlimits":
        assert result["traffic"] == []


# The default tier's cases: none runs into a time limit (those are in the integration tier).
FAST = ["memory_bomb", "write_outside_tmp", "read_etc_shadow", "read_env_secret", "detached_child",
        "daemon_double_fork", "kill_parent", "sys_exit_0", "os_exit_0", "exit_in_f",
        "fake_success_print", "fake_verdict_to_ancestors", "monkeypatch_check", "atexit_raise",
        "lying_eq", "read_harness_memory", "open_harness_stdout", "socket_localhost"]


@pytest.mark.parametrize("isolation", ["bwrap", "rlimits"])
def test_hostile_fast_cases_score_zero_and_leave_nothing(isolation):
    result = run_matrix(isolation, FAST)
    assert len(result["scored"]) == len(FAST)
    _assert_clean(result, isolation)
    kinds = {name: v.kind for name, v in result["scored"].items()}
    # The verdict tricks are reported as what they are, not as test failures.
    assert kinds["sys_exit_0"] == kinds["os_exit_0"] == kinds["exit_in_f"] == "error"
    assert kinds["kill_parent"] == "no_verdict"
    assert kinds["lying_eq"] == "failed"  # a Yes() object cannot leave the sandbox


@pytest.mark.integration
@pytest.mark.parametrize("isolation", TIERS)
def test_hostile_matrix_every_case(isolation):
    result = run_matrix(isolation)
    assert len(result["scored"]) >= 30
    _assert_clean(result, isolation)
    kinds = {name: v.kind for name, v in result["scored"].items()}
    for name in ("infinite_loop", "infinite_loop_in_f", "sleep_past_limit"):
        assert kinds[name] in ("timeout", "no_verdict"), (name, kinds[name])
