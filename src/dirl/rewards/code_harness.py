"""Running a model's program against tests inside the :mod:`~dirl.rewards.sandbox`, with a
verdict the program cannot forge.

Two checks:

* :func:`run_check` -- HumanEval style: ``test`` (trusted, from the dataset) calls
  ``check(candidate)`` or asserts on ``entry_point`` directly.
* :func:`run_io` -- stdin -> stdout cases (LiveCodeBench / APPS style): one sandboxed run per
  case, its stdout compared here, outside the sandbox, after whitespace normalisation.

Why the verdict of :func:`run_check` cannot be faked
----------------------------------------------------
Reference harnesses run ``prompt + completion + test + check(...)`` in ONE interpreter and read
the exit status or a printed line. The model's code runs first there, so it can exit 0, print the
success line, replace ``check`` or builtins, or raise in ``atexit``. No in-process token fixes
that: whatever the harness holds, code running earlier in the same interpreter can read.

So the model's code and the tests never share a process. Inside the sandbox:

1. The harness process H marks itself non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``) before it
   reads anything: processes of the same uid can then neither ptrace it nor open its
   ``/proc/<pid>/mem`` or ``/proc/<pid>/fd/*`` (the sandboxed processes have no capabilities).
   If that fails, H reports a failure rather than run unprotected.
2. H reads the job from its stdin: a fresh random token, the program, the tests. The token
   exists only in the host's memory and in H's.
3. H starts the program's process C with two pipes (requests in, replies out) and nothing else:
   its stdin, stdout and stderr are ``/dev/null``, it inherits no other descriptor, its argv
   holds only the fixed server code. C runs the program, then serves calls:
   ``{"fn": name, "args": ...}`` -> ``{"value": ...}`` or ``{"error": "TypeError: ..."}``.
4. H runs the tests with a proxy as the candidate. Arguments and results cross the pipe as
   tagged JSON of plain data (None, bool, int, float, str, bytes, list, tuple, set, dict); any
   other type is an error. What C sends is parsed, size-capped, and can only ever be a plain
   value: the worst a program can do is return wrong values, time out, or die. (C owns its
   pipe ends, so it may write replies before it is asked; that is no more than a function's
   power over its own return values -- it still never sees the tests or the expected values,
   which live only in H.)
5. H alone writes ``{"token", "passed", "reason"}`` to its stdout, after the tests return. The
   host accepts a verdict only with the matching token (compared in constant time).

Hence: ``sys.exit``/``os._exit`` before the tests makes C's replies end (fail); printing goes to
``/dev/null``; patching ``check`` or builtins patches C's copies, never H's; ``atexit`` runs in C
after the tests have been scored by H; killing H (same uid) leaves no verdict (fail); writing a
fake line to another process's stdout (e.g. bubblewrap's or unshare's, whose fds are reachable
through ``/proc``) lacks the token; an object with a lying ``__eq__`` cannot be sent. A result
is also a fresh copy, so the tests see exactly the data the function returned.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from dirl.rewards.sandbox import RunResult, Sandbox

__all__ = ["CaseResult", "Verdict", "normalise_output", "run_check", "run_io", "run_io_case"]

STARTUP_S = 5.0         # host-side margin over a check's own time limit (sandbox + 2 interpreters)
REPLY_CAP = 8 << 20     # largest reply H reads from the program

# Plain-data codec, defined in both H and C. ``type(v) is int`` (not isinstance) rejects
# subclasses, whose methods the program would control.
_CODEC = r'''
def _enc(v, depth=0):
    if depth > 200:
        raise ValueError("value nested too deeply")
    t = type(v)
    if v is None or t in (bool, int, float, str):
        return v
    if t is list:
        return [_enc(x, depth + 1) for x in v]
    if t in (tuple, set, frozenset):
        return {{tuple: "t", set: "s", frozenset: "f"}[t]: [_enc(x, depth + 1) for x in v]}
    if t is dict:
        return {"d": [[_enc(k, depth + 1), _enc(x, depth + 1)] for k, x in v.items()]}
    if t is bytes:
        return {"b": v.hex()}
    raise TypeError("cannot pass a %s out of the sandbox" % t.__name__)
def _dec(v):
    if type(v) is list:
        return [_dec(x) for x in v]
    if type(v) is dict:
        (tag, body), = v.items()
        if tag == "t": return tuple(_dec(x) for x in body)
        if tag == "s": return set(_dec(x) for x in body)
        if tag == "f": return frozenset(_dec(x) for x in body)
        if tag == "d": return {_dec(k): _dec(x) for k, x in body}
        if tag == "b": return bytes.fromhex(body)
        raise ValueError("bad tag %r" % tag)
    return v
'''

# C: the program's process. fds %(rfd)d / %(wfd)d are its only channel.
_CHILD = _CODEC + r'''
import json, os
def _serve(rd, wr):
    def send(obj):
        wr.write((json.dumps(obj) + "\n").encode())
    ns = {"__name__": "program", "__builtins__": __builtins__}
    try:
        exec(compile(json.loads(rd.readline()), "<program>", "exec"), ns)
    except BaseException as e:
        send({"error": "%s: %s" % (type(e).__name__, e)})
        return
    send({"ready": 1})
    for line in rd:
        req = json.loads(line)
        try:
            fn = ns.get(req["fn"])
            if not callable(fn):
                raise NameError("name %r is not defined" % req["fn"])
            send({"value": _enc(fn(*_dec(req["args"])))})
        except BaseException as e:
            send({"error": "%s: %s" % (type(e).__name__, str(e)[:200])})
_serve(os.fdopen(RFD, "rb"), os.fdopen(WFD, "wb", buffering=0))
'''

# H: the trusted harness, run by the sandbox's boot code; its stdin is the job.
_HARNESS = _CODEC + r'''
import builtins, json, os, select, sys, time
try:
    import ctypes
    _ok = ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE = 4
except Exception:
    _ok = False
JOB = json.loads(sys.stdin.buffer.read().decode("utf-8"))
TOKEN = JOB.pop("token")
DEADLINE = time.monotonic() + JOB["timeout_s"]
CHILD = None
def verdict(kind, reason):
    if CHILD is not None:
        CHILD.kill()
    line = json.dumps({"token": TOKEN, "passed": kind == "passed", "kind": kind, "reason": reason[:300]})
    os.write(1, (line + "\n").encode())
    os._exit(0)
if not _ok:
    verdict("error", "harness could not make itself non-dumpable")
class Stop(BaseException):
    pass
STICKY = []
def stop(kind, reason):
    STICKY.append((kind, reason))
    raise Stop(kind)
REQ_R, REQ_W = os.pipe()
RESP_R, RESP_W = os.pipe()
def spawn():
    # fork + exec by hand (subprocess costs an import): the child keeps only the two pipes, as
    # fds 3 and 4, and /dev/null for 0-2; exec drops every byte of this process's memory.
    pid = os.fork()
    if pid == 0:
        try:
            req, resp = os.dup(REQ_R), os.dup(RESP_W)  # above 0-4, which are all taken now
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.dup2(req, 3); os.dup2(resp, 4)
            os.closerange(5, 4096)
            os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", "RFD, WFD = 3, 4\n" + JOB["child"]])
        finally:
            os._exit(127)
    return pid
class Child:
    def __init__(self, pid):
        self.pid = pid
    def kill(self):
        try:
            os.kill(self.pid, 9)
        except OSError:
            pass
CHILD = Child(spawn())
os.close(REQ_R); os.close(RESP_W)
os.set_blocking(REQ_W, False)
BUF = bytearray()
def left():
    t = DEADLINE - time.monotonic()
    if t <= 0:
        stop("timeout", "timed out after %.3g s" % JOB["timeout_s"])
    return t
def put(obj):
    data = memoryview((json.dumps(obj) + "\n").encode())
    while data:
        if not select.select([], [REQ_W], [], left())[1]:
            continue
        try:
            data = data[os.write(REQ_W, data):]
        except OSError:
            stop("error", "the program exited before the tests finished")
def get():
    while b"\n" not in BUF:
        if not select.select([RESP_R], [], [], left())[0]:
            continue
        chunk = os.read(RESP_R, 1 << 16)
        if not chunk:
            stop("error", "the program exited before the tests finished")
        BUF.extend(chunk)
        if len(BUF) > REPLY_CAP:
            stop("error", "reply too large")
    line, _, rest = bytes(BUF).partition(b"\n")
    BUF[:] = rest
    try:
        return json.loads(line)
    except Exception:
        stop("error", "malformed reply")
def raise_error(message):
    name = message.partition(":")[0]
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception) and name != "SystemExit":
        raise kind(message)
    raise RuntimeError(message)
class Candidate:
    def __init__(self, name):
        self.__name__ = name
    def __call__(self, *args):
        put({"fn": self.__name__, "args": _enc(list(args))})
        reply = get()
        if type(reply) is not dict:
            stop("error", "malformed reply")
        if "error" in reply:
            raise_error(str(reply["error"]))
        try:
            return _dec(reply["value"])
        except Exception:
            stop("error", "malformed reply")
def main():
    put(JOB["program"])
    ready = get()
    if type(ready) is not dict or ready.get("ready") != 1:
        error = ready.get("error") if type(ready) is dict else None
        stop("error", "the program failed: %s" % error if error else "the program sent an unexpected reply")
    ns = {"__name__": "harness"}
    if JOB["setup"]:
        exec(compile(JOB["setup"], "<setup>", "exec"), ns)
    candidate = Candidate(JOB["entry_point"])
    ns[JOB["entry_point"]] = candidate
    exec(compile(JOB["test"], "<test>", "exec"), ns)
    if callable(ns.get("check")):
        ns["check"](candidate)
try:
    main()
except Stop:
    pass
except BaseException as e:
    verdict("failed", "%s: %s" % (type(e).__name__, str(e)[:200]))
if STICKY:
    verdict(*STICKY[0])
verdict("passed", "passed")
'''.replace("REPLY_CAP", str(REPLY_CAP))

KINDS = ("passed", "failed", "error", "timeout", "no_verdict")


@dataclass(frozen=True)
class Verdict:
    """``kind``: passed | failed (a test failed) | error (the program raised, exited early or
    sent junk) | timeout | no_verdict (the harness died, e.g. killed by the program)."""

    passed: bool
    kind: str
    reason: str


def run_check(sandbox: Sandbox, program: str, test: str, entry_point: str, *, setup: str = "",
              timeout_s: float = 5.0) -> Verdict:
    """Run ``test`` (plus ``check(entry_point)`` if it defines ``check``) against ``program``.

    ``setup`` is trusted code run before ``test`` in the harness (HumanEval's prompt, whose
    helpers some tests use); the program runs in its own process (module docstring).
    """
    token = secrets.token_hex(16)
    job = {"token": token, "program": program, "test": test, "entry_point": entry_point,
           "setup": setup, "timeout_s": timeout_s, "child": _CHILD}
    result = sandbox.run(_HARNESS, json.dumps(job).encode(), wall_s=timeout_s + STARTUP_S)
    return _parse_verdict(result, token)


def _parse_verdict(result: RunResult, token: str) -> Verdict:
    lines = result.stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1]) if lines else None
    except ValueError:
        found = None
    if (isinstance(found, dict) and isinstance(found.get("token"), str)
            and secrets.compare_digest(found["token"], token) and found.get("kind") in KINDS):
        kind = found["kind"]
        return Verdict(kind == "passed" and found.get("passed") is True, kind, str(found.get("reason", "")))
    if result.timed_out:
        return Verdict(False, "timeout", "the sandbox's wall limit")
    detail = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [result.status]
    return Verdict(False, "no_verdict", f"no verdict from the harness ({detail[0][:200]})")


# ---------------------------------------------------------------------- stdin -> stdout


@dataclass(frozen=True)
class CaseResult:
    """One stdin -> stdout case: ``kind`` passed | failed | error (non-zero exit) | timeout |
    output_limit."""

    passed: bool
    kind: str


def normalise_output(text: str) -> list[str]:
    """Lines with runs of whitespace collapsed, blank lines at both ends dropped."""
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def run_io_case(sandbox: Sandbox, program: str, stdin: str, expected: str, *,
                timeout_s: float = 5.0) -> CaseResult:
    """Run ``program`` with ``stdin``; pass iff it exits 0 and prints ``expected`` (normalised)."""
    result = sandbox.run(program, stdin.encode("utf-8"), wall_s=timeout_s)
    if result.status != "ok":
        return CaseResult(False, "error" if result.status == "exit" else result.status)
    ok = normalise_output(result.stdout.decode("utf-8", "replace")) == normalise_output(expected)
    return CaseResult(ok, "passed" if ok else "failed")


def run_io(sandbox: Sandbox, program: str, cases: Sequence[tuple[str, str]], *,
           timeout_s: float = 5.0) -> list[CaseResult]:
    """:func:`run_io_case` for every ``(stdin, expected stdout)`` case, on the sandbox's pool."""
    return sandbox.map(lambda case: run_io_case(sandbox, program, *case, timeout_s=timeout_s), cases)
