"""Every benchmark that has a seconds-long ``--quick`` mode runs end to end as
``python -m benchmarks.NAME --quick`` and prints its result line (a benchmark nobody runs between
measurements breaks silently: ``serve_limits`` did, when ``Batcher`` began taking its ``ServeConfig``).

Integration tier: each runs in its own interpreter, and the serve benches start servers.
``engine`` and ``estimator_bias`` run in the default tier (test_benchmarks.py,
test_estimator_bias.py); ``memory`` and ``lora`` (~150 s and ~35 s quick) are measured by hand.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
# This checkout's ``src`` and root on the child's path: it imports ``dirl`` and ``benchmarks`` from here
# while running in a scratch folder.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}

# bench name -> the result key it must print as ``key=<number>``
RESULT_KEYS = {
    "rl": "rl_step_speedup",
    "critic": "critic_step_ratio",
    "serve": "update_speedup_vs_reload",
    "serve_limits": "steps_after_cancel_max",
}


@pytest.mark.parametrize("name", sorted(RESULT_KEYS))
def test_quick_bench_prints_its_result(name, tmp_path):
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(rf"^{re.escape(RESULT_KEYS[name])}=(\S+)$", proc.stdout, re.MULTILINE)
    assert match, proc.stdout[-2000:]
    value = float(match[1])
    assert math.isfinite(value) and value >= 0
