"""Data-parallel SFT and RL under ``torchrun`` (gloo, 2 CPU processes) against a single process.

Tolerances (fp32; the ranks' gradients are summed in a different order):

* logged ``loss`` / ``grad_norm``: rtol 1e-5 (the pre-clip norm would show any
  error of scale, which AdamW and clipping would otherwise hide);
* parameters: atol 1e-5 = 1% of one lr=1e-3 Adam step. Measured max 1.2e-6 after
  3 steps: Adam divides by sqrt(v), which magnifies the ~1e-7 reduction noise of a
  few near-zero gradient coordinates; almost every element agrees within 1e-7.

The batches are split unevenly on purpose (7 examples: 4 + 3; 3 prompts: 2 + 1),
so normalising by a local count instead of the global one would fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dirl import config as config_lib
from dirl.cli import main as cli_main
from dirl.model.checkpoint import load_pretrained
from dirl.train.rl.config import RLConfig
from dirl.train.rl.loop import train_rl
from dirl.train.sft.config import SFTConfig
from dirl.train.sft.loop import train_sft

pytestmark = pytest.mark.integration  # processes: deselected by default, CI runs them

TESTS = Path(__file__).resolve().parent
SFT_ARGS = ["model=init:tiny", "data.source=task:arithmetic", "data.limit=200", "data.max_length=64",
            "batch_size=7", "optim.lr=1e-3", "complementary_masks=true", "progress=false", "log_every=1",
            "save_every=2", "max_steps=3", "compute.activation_checkpointing=true", "compute.head_chunk_size=7"]
# 3 prompts x 4 samples; 3 mini-batches of 4 rollouts, so in each mini-batch one rank has
# nothing to score (the idle forward/backward path); dynamic sampling refills with 1 prompt.
# Micro-batches of one trace row each (ranks then run different numbers of them), checkpointed
# layers and a chunked head: all must compose with FSDP2.
RL_ARGS = ["model=init:tiny", "rewards.rl_rewards:digit_fraction=1.0", "rollout.num_prompts=3",
           "rollout.group_size=4", "rollout.sampling.max_new_tokens=8", "algo.beta=0.01", "algo.num_minibatches=3",
           "algo.dynamic_sampling=true", "optim.lr=1e-3", "optim.schedule=constant", "save_every=1", "max_steps=2",
           "algo.micro_batch_tokens=16", "compute.activation_checkpointing=true", "compute.head_chunk_size=5"]
WEIGHT_ATOL, METRIC_RTOL = 1e-5, 1e-5


def _torchrun(*args: str) -> str:
    """``torchrun --standalone --nproc_per_node 2 -m dirl.cli ARGS``; returns stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dirl.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _cli_rank(rank: int, port: int, args: tuple[str, ...], stdout_dir: str | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if stdout_dir is not None:  # this rank's stdout into a file, as torchrun collects it
        sys.stdout = open(Path(stdout_dir) / f"rank{rank}.out", "w", buffering=1)  # noqa: SIM115
    try:
        assert cli_main(list(args)) == 0
    finally:
        sys.stdout.flush()


def _forked(*args: str, stdout_dir: Path | None = None) -> str:
    """``dirl ARGS`` on 2 ranks set up like torchrun does (its env), in processes forked from this
    one: the imports are already done, which saves ~10 s per launch on 2 cores. Returns the
    ranks' stdout (with ``stdout_dir``). The launcher itself is :func:`test_torchrun_launch`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_cli_rank, args=(port, args, None if stdout_dir is None else str(stdout_dir)), nprocs=2,
                       start_method="fork")
    return "".join((stdout_dir / f"rank{r}.out").read_text() for r in range(2)) if stdout_dir else ""


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa = load_pretrained(a, with_tokenizer=False)[0].state_dict()
    wb = load_pretrained(b, with_tokenizer=False)[0].state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=WEIGHT_ATOL, rtol=0, msg=name)


def _assert_same_metrics(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in keys:
            assert y[key] == pytest.approx(x[key], rel=METRIC_RTOL, abs=1e-6), (x["step"], key)


def _copy_checkpoint(run_dir: Path, step: int, new_run: Path) -> Path:
    name = f"step-{step:06d}"
    return Path(shutil.copytree(run_dir / "checkpoints" / name, new_run / "checkpoints" / name))


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """(1 process, 2 FSDP2 ranks + their stdout): 3 steps each, checkpoints at 2 and 3."""
    base = tmp_path_factory.mktemp("sft")
    one = train_sft(config_lib.load(SFTConfig, None, [*SFT_ARGS, f"out={base / 'one'}"]))
    stdout = _forked("sft", *SFT_ARGS, f"out={base / 'two'}", "dist.strategy=fsdp", stdout_dir=base)
    return one, base / "two", stdout


@pytest.fixture(scope="module")
def rl_runs(tmp_path_factory):
    """(1 process, 2 FSDP2 ranks): 2 RL steps each, a checkpoint after every step."""
    base = tmp_path_factory.mktemp("rl")
    one = train_rl(config_lib.load(RLConfig, None, [*RL_ARGS, f"out={base / 'one'}"]), progress=False)
    _forked("rl", *RL_ARGS, f"out={base / 'two'}", "--no-progress")
    return one, base / "two"


def test_sft_two_fsdp_ranks_match_one_process(sft_runs):
    one, two, _ = sft_runs
    _assert_same_metrics(_metrics(one), _metrics(two), ("loss", "grad_norm", "learning_rate"))
    _assert_same_weights(one / "final", two / "final")


def test_only_rank_zero_writes(sft_runs):
    _, two, stdout = sft_runs
    assert [m["step"] for m in _metrics(two)] == [1, 2, 3]  # one line per step, not one per rank
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "config.yaml", "curves.png", "final", "metrics.jsonl",
                                                     "tensorboard"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000003"]
    assert len(list((two / "tensorboard").iterdir())) == 1  # a writer per rank would leave one file each
    assert stdout.count("step 1/3 ") == 1


def test_sft_checkpoints_resume_across_world_sizes(sft_runs, tmp_path):
    one, two, _ = sft_runs
    # Written by 2 ranks, finished by 1 process.
    checkpoint = _copy_checkpoint(two, 2, tmp_path / "two_to_one")
    resumed = train_sft(config_lib.load(SFTConfig, None, [*SFT_ARGS, f"out={tmp_path}/unused"]), resume=checkpoint)
    _assert_same_weights(one / "final", resumed / "final")
    # Written by 1 process, finished by 2 DDP ranks (config from the checkpoint's config.yaml).
    _copy_checkpoint(one, 2, tmp_path / "one_to_two")
    _forked("sft", "--resume", str(tmp_path / "one_to_two"), "dist.strategy=ddp")
    _assert_same_metrics(_metrics(one)[2:], _metrics(tmp_path / "one_to_two"), ("loss", "grad_norm"))
    _assert_same_weights(one / "final", tmp_path / "one_to_two" / "final")


def test_rl_two_fsdp_ranks_match_one_process(rl_runs):
    one, two = rl_runs
    a, b = _metrics(one), _metrics(two)
    for x, y in zip(a, b):  # same prompts, same rollouts, whichever rank decoded them
        assert (x["reward"], x["reward_std"], x["completions/mean_length"]) == \
               (y["reward"], y["reward_std"], y["completions/mean_length"])
        assert x["optimizer_steps"] == y["optimizer_steps"] == 3
    _assert_same_metrics(a, b, ("loss", "grad_norm", "kl", "entropy", "frac_reward_zero_std"))
    _assert_same_weights(one / "final", two / "final")


def test_rl_checkpoint_of_two_ranks_resumes_in_one_process(rl_runs, tmp_path):
    one, two = rl_runs
    _copy_checkpoint(two, 1, tmp_path / "resumed")
    resumed = train_rl(config_lib.load(RLConfig, None, [*RL_ARGS, f"out={tmp_path / 'resumed'}"]),
                       resume=str(tmp_path / "resumed"), progress=False)
    _assert_same_metrics(_metrics(one)[1:], _metrics(resumed), ("reward", "loss", "grad_norm"))
    _assert_same_weights(one / "final", resumed / "final")


@pytest.mark.slow
def test_torchrun_launch(tmp_path):
    """The real launcher (``torchrun -m dirl.cli``; ~15 s of imports on 2 cores): both ranks exit 0
    (:func:`dirl.cli.entry`) and rank 0 alone logs. The fork launches above share its env."""
    stdout = _torchrun("sft", *SFT_ARGS, "max_steps=1", "save_every=0", f"out={tmp_path / 'run'}")
    assert stdout.count("step 1/1 ") == 1
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [1]
