"""The hostile-program matrix (tests/test_code_hostile.py runs it under every executor).

Every case is a program for the task "``f()`` returns 1" whose ``f`` returns 1 only if its
attack SUCCEEDED (``leak`` cases, for attacks every tier must stop) and 0 otherwise, or which
attacks the harness itself (exit early, fake output, patch ``check`` ...). So a case that scores
1 is an attack that got through. After each case nothing may be left: no process (by the
sandbox's slot uids, and by the marker ``sleep`` durations the spawning cases use) and none of
the files the writing cases aim at.

A case whose ``f`` would be asked to return a per-run secret (``leak=False``) can only pass
through a forged verdict; a ``leak`` case passes iff its attack worked where ``blocked_in`` says
it must not.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = "def check(candidate):\n    assert candidate() == 1\n"
MARK = "dirl-hostile-7f3a"          # in every path a writing case aims at
SLEEP_MARKS = {"detached_child": "987.61", "daemon_double_fork": "987.62"}  # sleeper durations


@dataclass(frozen=True)
class Case:
    name: str
    program: str
    slow: bool = False               # runs into a time limit: integration tier only
    blocked_in: tuple = ("bwrap", "unshare", "rlimits")  # tiers where a success would be a leak
    leak: bool = False               # True: f returns 1 iff the attack worked (test: == 1);
    #                                  False: the test wants a per-run secret no program can know

    def test(self, secret: int) -> str:
        return TEST if self.leak else f"def check(candidate):\n    assert candidate() == {secret}\n"

    def source(self, isolation: str) -> str:
        return self.program.replace("{LEAK}", str(isolation in self.blocked_in))


def _leak(name: str, attempt: str, **kw) -> Case:
    """``f`` returns 1 iff ``attempt`` (code setting ``ok``) succeeds."""
    body = "\n".join("        " + line for line in attempt.strip().splitlines())
    program = (f"import os, sys, socket, time\nLEAK = {{LEAK}}\ndef f():\n    ok = False\n"
               f"    try:\n{body}\n    except BaseException:\n        ok = False\n"
               f"    return 1 if (ok and LEAK) else 0\n")
    return Case(name, program, leak=True, **kw)


def _plain(name: str, program: str, **kw) -> Case:
    return Case(name, program + "\ndef f():\n    return 0\n" if "def f(" not in program else program, **kw)


def targets() -> list[str]:
    """Paths the writing cases aim at (must not exist after a run)."""
    return [str(REPO / f"{MARK}.txt"), f"/tmp/{MARK}", f"/dev/shm/{MARK}", f"/var/tmp/{MARK}",
            f"/root/{MARK}", f"/etc/{MARK}", os.path.join(tempfile.gettempdir(), f"{MARK}-dir"),
            os.path.expanduser(f"~/{MARK}")]


def cases(port: int) -> list[Case]:
    """The matrix; ``port`` is a TCP port on 127.0.0.1 the test listens on."""
    write = "\n".join(f"    try:\n        open({t!r}, 'w').write('x')\n    except Exception:\n        pass"
                      for t in targets())
    return [
        # --- resources
        _plain("fork_bomb", "import os\nfor _ in range(10000):\n    try:\n        os.fork()\n    except OSError:\n        pass"),
        _plain("fork_bomb_in_f", "import os\ndef f():\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass", slow=True),
        _plain("memory_bomb", "x = bytearray(8 << 30)"),
        _plain("memory_growth", "x = []\nwhile True:\n    x.append(bytearray(1 << 24))"),
        _plain("infinite_loop", "while True:\n    pass", slow=True),
        _plain("infinite_loop_in_f", "def f():\n    while True:\n        pass", slow=True),
        _plain("sleep_past_limit", "import time\ntime.sleep(100)", slow=True),
        _plain("deep_recursion", "import sys\nsys.setrecursionlimit(10**7)\ndef r(n):\n    return r(n + 1) + 1\nr(0)"),
        _plain("file_size_bomb", "import tempfile, os\nwith open(os.path.join(tempfile.gettempdir(), 'big'), 'wb') as fh:\n"
               "    for _ in range(4096):\n        fh.write(b'0' * (1 << 20))"),
        _plain("open_files_bomb", "import os\nfds = [os.open('/dev/null', os.O_RDONLY) for _ in range(100000)]"),
        _plain("huge_output", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", slow=True),
        _plain("non_utf8_output", "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\x80' * 1000)\nsys.stdout.flush()"),
        # --- file system
        _plain("write_outside_tmp", "def f():\n" + write + "\n    return 0"),
        _plain("chmod_000_tree", "import os, tempfile\nd = os.path.join(tempfile.gettempdir(), 'a', 'b')\n"
               "os.makedirs(d)\nopen(os.path.join(d, 'x'), 'w').write('x')\nos.chmod(os.path.dirname(d), 0)"),
        _leak("read_etc_shadow", "ok = len(open('/etc/shadow').read()) > 0"),
        _leak("read_project_tree", f"ok = 'dirl' in open({str(REPO / 'pyproject.toml')!r}).read()",
              blocked_in=("bwrap",)),
        _leak("read_env_secret", "ok = any('SECRET' in v for v in os.environ.values())"),
        _leak("read_proc_1_environ", "ok = b'SECRET' in open('/proc/1/environ', 'rb').read()"),
        _leak("read_host_environ", "ok = any(b'SECRET' in open(f'/proc/{p}/environ', 'rb').read()\n"
              "         for p in os.listdir('/proc') if p.isdigit() and os.access(f'/proc/{p}/environ', os.R_OK))"),
        # --- network
        _leak("socket_localhost", f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
              "s.sendall(b'leak')\nok = True", blocked_in=("bwrap", "unshare")),
        _leak("socket_outside", "s = socket.create_connection(('1.1.1.1', 53), timeout=1)\nok = True",
              blocked_in=("bwrap", "unshare")),
        _leak("udp_outside", "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "ok = s.sendto(b'leak', ('8.8.8.8', 53)) > 0", blocked_in=("bwrap", "unshare")),
        # --- processes
        _plain("detached_child", f"import os, time\nif os.fork() == 0:\n    os.setsid()\n"
               f"    os.execv('/bin/sleep', ['sleep', '{SLEEP_MARKS['detached_child']}'])"),
        _plain("daemon_double_fork", f"import os, subprocess\nsubprocess.Popen(['/bin/sleep', '{SLEEP_MARKS['daemon_double_fork']}'], "
               "start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"),
        _plain("kill_parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"),
        _plain("kill_everything", "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass"),
        _plain("stop_parent", "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)", slow=True),
        _leak("read_harness_memory", "p = os.getppid()\nok = len(open(f'/proc/{p}/mem', 'rb').read(1)) >= 0"),
        _leak("open_harness_stdout", "p = os.getppid()\nfd = os.open(f'/proc/{p}/fd/1', os.O_WRONLY)\nok = True"),
        # --- faking the verdict
        _plain("sys_exit_0", "import sys\nsys.exit(0)"),
        _plain("os_exit_0", "import os\nos._exit(0)"),
        _plain("exit_in_f", "import os\ndef f():\n    os._exit(0)"),
        _plain("fake_success_print", "import json\nprint(json.dumps({'token': '0' * 32, 'passed': True, "
               "'kind': 'passed', 'reason': 'passed'}))\nprint('PASSED')\nimport sys\nsys.exit(0)"),
        _plain("fake_verdict_to_ancestors", "import os, json\nline = json.dumps({'token': '0' * 32, 'passed': True, "
               "'kind': 'passed', 'reason': 'passed'}) + '\\n'\nfor p in os.listdir('/proc'):\n    try:\n"
               "        fd = os.open(f'/proc/{p}/fd/1', os.O_WRONLY)\n        os.write(fd, line.encode())\n"
               "    except Exception:\n        pass"),
        _plain("monkeypatch_check", "import builtins\ndef check(candidate):\n    return True\n"
               "builtins.check = check\nbuiltins.AssertionError = type('A', (Exception,), {})\n"
               "builtins.__import__ = lambda *a, **k: None"),
        _plain("atexit_raise", "import atexit, os\natexit.register(lambda: os._exit(0))\n"
               "def boom():\n    raise SystemExit(0)\natexit.register(boom)"),
        _plain("lying_eq", "class Yes:\n    def __eq__(self, other):\n        return True\n"
               "def f():\n    return Yes()"),
        _plain("int_subclass", "class One(int):\n    def __eq__(self, other):\n        return True\n"
               "def f():\n    return One(0)"),
        _plain("flood_replies", "import os\nfor fd in range(3, 64):\n    try:\n"
               "        os.write(fd, b'{\"value\": 1}\\n' * 100)\n    except OSError:\n        pass"),
    ]
