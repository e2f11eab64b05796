"""The sandboxed executor: environment, limits, isolation facts per tier, and the fallbacks
(what a machine without bubblewrap gets: a one-line warning, then correct scores anyway)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from dirl.rewards import sandbox as sandbox_lib
from dirl.rewards.code_harness import run_check
from dirl.rewards.sandbox import Sandbox, SandboxConfig

HAVE_BWRAP = shutil.which("bwrap") is not None
FACTS = r"""
import json, os, resource, socket
facts = {"env": sorted(os.environ), "pid": os.getpid(), "uid": os.getuid(),
         "caps": open("/proc/self/status").read().split("CapEff:")[1].split()[0]}
facts["limits"] = {n: resource.getrlimit(getattr(resource, n))[0]
                   for n in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE")}
for name, path in (("write_usr", "/usr/dirl-x"), ("write_tmp", "/tmp/dirl-x")):
    try:
        open(path, "w").write("x"); facts[name] = True
    except OSError:
        facts[name] = False
facts["see_work"] = os.path.exists("/work") or os.path.exists("/root/.pyenv/versions")
facts["ifaces"] = sorted(name for _, name in socket.if_nameindex())
facts["stdin"] = input()
print(json.dumps(facts))
"""
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


@pytest.fixture(scope="module")
def best() -> Sandbox:
    return Sandbox(SandboxConfig(nproc=20, memory_mb=768, file_mb=4, nofile=48))


def _facts(sandbox: Sandbox) -> dict:
    result = sandbox.run(FACTS, b"hello\n")
    assert result.status == "ok", result
    return json.loads(result.stdout)


def test_environment_is_emptied_and_limits_are_set(best, monkeypatch):
    monkeypatch.setenv("DIRL_API_KEY", "sk-secret")
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    facts = _facts(best)
    assert not {"DIRL_API_KEY", "WANDB_API_KEY"} & set(facts["env"])
    assert set(facts["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "PWD"}
    assert facts["stdin"] == "hello"
    limits = facts["limits"]
    assert limits["RLIMIT_CPU"] == 10 and limits["RLIMIT_AS"] == 768 << 20
    assert limits["RLIMIT_FSIZE"] == 4 << 20 and limits["RLIMIT_NOFILE"] == 48
    assert limits["RLIMIT_NPROC"] >= 20
    assert facts["uid"] != 0 and facts["caps"] == "0000000000000000"


@pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not installed")
def test_bubblewrap_isolation_facts():
    facts = _facts(Sandbox(SandboxConfig(isolation="bwrap")))
    assert facts["pid"] < 10                      # a new PID namespace
    assert facts["write_usr"] is False and facts["write_tmp"] is True  # read-only system, private /tmp
    assert facts["see_work"] is False             # the project and home trees are not there
    assert facts["ifaces"] == ["lo"]              # a new network namespace (no route out)
    assert not os.path.exists("/tmp/dirl-x")      # that /tmp was private


def test_wall_timeout_and_output_cap():
    sandbox = Sandbox(SandboxConfig(isolation="rlimits", output_bytes=1000))
    slept = sandbox.run("import time\ntime.sleep(30)", wall_s=0.5)
    assert slept.status == "timeout" and slept.wall_s < 5
    loud = sandbox.run("while True:\n    print('x' * 100)")
    assert loud.status == "output_limit" and len(loud.stdout) == 1000


@pytest.mark.integration
def test_cpu_limit_kills_a_spinning_program():
    sandbox = Sandbox(SandboxConfig(isolation="rlimits", cpu_s=1))
    spun = sandbox.run("while True:\n    pass", wall_s=30)
    assert spun.status == "exit" and spun.returncode != 0  # SIGXCPU, then SIGKILL, at 1 s of CPU


def test_map_keeps_order_on_the_bounded_pool():
    sandbox = Sandbox(SandboxConfig(isolation="rlimits", workers=2))
    outs = sandbox.map(lambda n: sandbox.run(f"print({n} * {n})").stdout, range(5))
    assert outs == [b"%d\n" % (n * n) for n in range(5)]


def test_without_bubblewrap_warns_once_and_still_scores(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_lib, "_ANNOUNCED", set())
    monkeypatch.delenv(sandbox_lib.ENV_ISOLATION, raising=False)
    caplog.set_level(logging.WARNING, logger="dirl.rewards.sandbox")
    missing = SandboxConfig(bwrap="/nonexistent/bwrap", unshare="/nonexistent/unshare")
    sandbox = Sandbox(missing)
    assert sandbox.isolation == "rlimits"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "bwrap unavailable (/nonexistent/bwrap not found)" in lines[0]
    assert "unshare unavailable" in lines[1] and "network" in lines[1]
    assert all("\n" not in line for line in lines)
    good = run_check(sandbox, "def add(a, b):\n    return a + b\n", TEST, "add")
    bad = run_check(sandbox, "def add(a, b):\n    return a - b\n", TEST, "add")
    assert (good.passed, good.kind) == (True, "passed") and (bad.passed, bad.kind) == (False, "failed")
    assert Sandbox(missing).isolation == "rlimits"  # a second sandbox: no second announcement
    assert len(caplog.records) == 2


def test_environment_variable_forces_a_tier(monkeypatch):
    monkeypatch.setenv(sandbox_lib.ENV_ISOLATION, "rlimits")
    assert Sandbox().isolation == "rlimits"
    monkeypatch.setenv(sandbox_lib.ENV_ISOLATION, "nope")
    with pytest.raises(ValueError, match="DIRL_SANDBOX"):
        _ = Sandbox().isolation
    with pytest.raises(RuntimeError, match="does not work here"):
        _ = Sandbox(SandboxConfig(isolation="bwrap", bwrap="/nonexistent/bwrap")).isolation


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="isolation"):
        SandboxConfig(isolation="docker")
    with pytest.raises(ValueError, match="cpu_s"):
        SandboxConfig(cpu_s=0)
