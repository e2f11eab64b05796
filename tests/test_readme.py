"""The README runs as written: its ``bash`` blocks, command by command, in order, in a fresh copy.

A line is a command unless it is a comment. It is **not run** when it carries the marker
``# readme: skip`` (long, or needs what a test machine lacks: a fresh ``.venv``, 8 GPUs) or
when it is a template with placeholders for the reader (``DIR``, ``RUN/final``,
``/path/to/...``, ``[a|b]`` alternatives). Every other command runs with ``bash -e`` from the
copy's root, with this interpreter's ``dirl`` and ``../shared`` beside it; the test prints and
checks the counts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = "# readme: skip"
PLACEHOLDER = re.compile(r"\b(DIR|RUN_DIR|QWEN3_DIR)\b|RUN/final|/path/to/|\[[^\]]*\||\[-|node0\.example|/shared/SDAR|"
                         r"runs/x/final|\[key=value|=\.\.\.")


def readme_commands(text: str) -> list[tuple[str, str]]:
    """``(command, status)`` for every command line of the README's bash blocks, in order;
    status: ``run``, ``skip`` (marked) or ``template`` (placeholders)."""
    out, block = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            block = [] if line.strip() == "```bash" and block is None else None
            continue
        if block is None or not line.strip() or line.lstrip().startswith("#"):
            continue
        if out and out[-1][0].endswith("\\"):
            out[-1] = (out[-1][0][:-1] + " " + line.strip(), "skip" if SKIP in line else out[-1][1])
            continue
        status = "skip" if SKIP in line else "template" if PLACEHOLDER.search(line.split(" #")[0]) else "run"
        out.append((line.strip(), status))
    return [(cmd, "template" if status == "run" and PLACEHOLDER.search(cmd.split(" #")[0]) else status)
            for cmd, status in out]


def test_readme_commands_are_parsed_by_hand():
    text = "x\n```bash\ndirl init --out a   # note\n# comment\nmake demo  # readme: skip\n" \
           "dirl eval --model DIR\ntorchrun a \\\n  b\n```\n```python\nprint(1)\n```\n"
    assert readme_commands(text) == [("dirl init --out a   # note", "run"), ("make demo  # readme: skip", "skip"),
                                     ("dirl eval --model DIR", "template"), ("torchrun a  b", "run")]


@pytest.mark.integration
def test_the_readme_runs_as_written(tmp_path, capsys):
    commands = readme_commands((REPO / "README.md").read_text())
    root = tmp_path / "dirl"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    shared = next(p / "shared" for p in REPO.parents if (p / "shared" / "data").is_dir())
    (tmp_path / "shared").symlink_to(shared)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}", "OMP_NUM_THREADS": "1"}
    ran = 0
    for command, status in commands:
        if status != "run":
            continue
        result = subprocess.run(["bash", "-e", "-c", command], cwd=root, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"README command failed: {command}\n{result.stderr[-2000:]}"
        ran += 1
    counts = {s: sum(st == s for _, st in commands) for s in ("run", "skip", "template")}
    with capsys.disabled():
        print(f"\nreadme_commands: ran={ran} skipped={counts['skip']} templates={counts['template']}")
    assert ran == counts["run"] >= 10
