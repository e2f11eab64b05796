"""The hostile-input regression matrix (issue 30): one case (at least) per class of failure.

Classes: ownership (never destroy what dirl did not write), bounds (no unbounded work from a
small input), validate-before-work (one line, exit 2, nothing created), rewards (contract
errors name the reward; TRL's return types accepted; failures isolated; one time budget per
batch) and live updates (checked, probed, rolled back). Command cases run in-process through
:func:`dirl.cli.main` in a scratch directory and assert the exit code, the ONE error line and
that nothing outside ``out`` was written or deleted. The full matrix (225 inputs, one process
each) is ``benchmarks/hostile_matrix.py``; the server's slow-loris / port cases are here in the
integration tier.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from dirl.cli import main
from dirl.data import DataError, load_prompt_rows
from dirl.data.templates import render_prompt
from dirl.errors import UserError
from dirl.model.checkpoint import remove_stale_tmp
from dirl.model.factory import InitConfig, init_checkpoint
from dirl.ownership import MARKER
from dirl.rewards import compute_rewards, parse_reward_spec
from dirl.rewards.registry import RewardError

BIG_INT = "9" * 5000


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    good = init_checkpoint(InitConfig(preset="tiny"), root / "good")
    user = root / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    (root / "user_file.txt").write_text("mine too\n")
    data = root / "data"
    data.mkdir()
    (data / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (data / "bigint.jsonl").write_text('{"question": "q", "answer": ' + BIG_INT + "}\n")
    (data / "surrogate.jsonl").write_text('{"question": "a\\ud800b", "answer": "1"}\n')
    (data / "long.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n{"question": "' + "a" * 5000
                                     + '", "answer": "1"}\n')
    cfg = root / "cfg"
    cfg.mkdir()
    (cfg / "bomb.yaml").write_text("a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))
    (cfg / "a_dir").mkdir()
    linked = root / "linked_run"
    linked.mkdir()
    (linked / "checkpoints").symlink_to(user)
    (linked / "config.yaml").write_text("max_steps: 1\n")
    crafted = root / "crafted_run" / "checkpoints"
    crafted.mkdir(parents=True)
    (crafted / "latest").write_text("../../good\n")
    return {"root": root, "good": good, "user": user}


def _tree(root: Path, skip: str = "") -> dict[str, str]:
    """Every file / link under ``root`` (but ``skip``) -> a hash of its content or target."""
    out = {}
    for here, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
            path = Path(here) / name
            rel = str(path.relative_to(root))
            if skip and rel.startswith(skip):
                continue
            out[rel] = os.readlink(path) if path.is_symlink() else hashlib.sha1(path.read_bytes()).hexdigest()
    return out


# (command with {good} {root} placeholders, text the one error line must hold)
CASES = {
    # ownership: outputs that exist, overlap an input, or lead out of the run
    "init-out-not-empty": ("init --out {root}/user", "exists and is not empty"),
    "init-out-a-file": ("init --out {root}/user_file.txt", "not a directory"),
    "convert-out-is-source": ("convert {good} --out {good}", "overlaps the input"),
    "convert-out-inside-source": ("convert {good} --out {good}/sub", "overlaps the input"),
    "merge-out-is-base": ("merge {root}/user --out {good} --base {good}", "overlaps the input"),
    "eval-out-holds-files": ("eval --model {good} --data task:arithmetic --out {root}/user", "exists and is not empty"),
    "eval-out-is-model": ("eval --model {good} --data task:arithmetic --out {good} overwrite=true", "overlaps the input"),
    "sft-out-not-empty": ("sft model={good} out={root}/user", "exists and is not empty"),
    "sft-out-empty-string": ("sft model={good} out=", "out is empty"),
    "rl-out-a-file": ("rl model={good} out={root}/user_file.txt", "not a directory"),
    "sft-overwrite-symlinked-checkpoints": ("sft model={good} out={root}/linked_run overwrite=true",
                                            "checkpoints is a symlink"),
    "rl-resume-crafted-latest": ("rl --resume {root}/crafted_run", "points outside"),
    # bounds and validate-before-work: config files and overrides
    "config-alias-bomb": ("show-config --kind sft --config {root}/cfg/bomb.yaml", "aliases of aliases"),
    "config-a-directory": ("sft --config {root}/cfg/a_dir", "not a file"),
    "override-malformed-yaml": ("show-config --kind rl optim.betas=[1,2", "optim.betas='[1,2': invalid YAML"),
    "override-5000-digits": (f"show-config --kind rl seed={BIG_INT}", "4300 digits"),
    "override-mapping-malformed": ("show-config --kind rl rewards.math={{a:[b", "invalid YAML"),
    # data: deep JSON, a 5000-digit int, a lone surrogate, a template that pads to 2 GB
    "data-deep-json": ("eval --model {good} --data {root}/data/deep.jsonl", "deep.jsonl:1: JSON nested too deeply"),
    "data-5000-digit-int": ("eval --model {good} --data {root}/data/bigint.jsonl", "bigint.jsonl:1: invalid JSON"),
    "data-lone-surrogate": ("eval --model {good} --data {root}/data/surrogate.jsonl", "surrogate.jsonl:1: text holds "
                                                                                      "a lone surrogate"),
    "template-width": ("eval --model {good} --data task:arithmetic prompt_template={{question:>2000000000}}",
                       "pads to more than"),
    # sizes against the context, devices
    "generate-past-context": ("generate --model {good} --prompt hi max_new_tokens=100000", "model's context"),
    "eval-past-context": ("eval --model {good} --data task:arithmetic limit=1 sampling.max_new_tokens=100000",
                          "model's context"),
    "eval-device-bogus": ("eval --model {good} --data task:arithmetic device=quantum", "device='quantum'"),
    "reward-spec-weight": ("eval --model {good} --data task:arithmetic --reward math:abc", "cannot import reward"),
    # trainers: every value checked before work, sizes against the data and the context
    "rl-reward-weight-bool": ("rl rewards.math=true", "rewards.math must be a finite number"),
    "rl-seed-2-64": (f"rl seed={2**64}", "seed must be a seed in [0, 2**32 - 1]"),
    "sft-lr-absurd": ("sft optim.lr=1e19", "optim.lr must be a finite number in (0, 1]"),
    "rl-rollouts-per-step": ("rl rollout.group_size=1000000000", "rollouts per step"),
    "rl-device-bogus": ("rl device=quantum", "device='quantum'"),
    "rl-http-unreachable": ("rl rollout.backend=http rollout.http.url=http://127.0.0.1:9", "cannot reach the server"),
    "sft-max-length-past-context": ("sft model={good} data.max_length=1000000000000 pack=true",
                                    "exceeds the model's context"),
    "sft-batch-over-examples": ("sft model={good} data.source=task:arithmetic data.limit=4 batch_size=1000000000",
                                "more than the 4 training examples"),
    "rl-max-new-tokens-past-context": ("rl model={good} rollout.sampling.max_new_tokens=100000",
                                       "exceeds the model's context"),
    "sft-block-size-full-attention": ("sft model=init:llada/tiny block_size=8", "a full-attention model has no "
                                                                               "block size"),
    "sft-autoregressive-unshifted": ("sft model=init:llada/tiny objective=autoregressive",
                                     "objective=autoregressive needs a shifted-logit model"),
    "sft-autoregressive-packed": ("sft model=init:dream/tiny objective=autoregressive pack=true",
                                  "pack must be false with objective=autoregressive"),
    "sft-objective-bogus": ("sft objective=ar", "objective must be one of"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(name, files, tmp_path, monkeypatch, capsys):
    command, expected = CASES[name]
    argv = command.format(**files).split(" ")
    before = _tree(files["root"])
    monkeypatch.setattr(sys, "argv", ["dirl"])  # main() rewrites sys.argv
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"dirl {argv[0]}: "), err
    assert expected in lines[0], lines[0]
    assert _tree(files["root"]) == before  # nothing outside (or inside) written or deleted
    assert not any(tmp_path.iterdir())  # no default out either


def test_configs_changed_after_construction_are_checked_when_train_starts(files, tmp_path):
    import dirl

    trainer = dirl.DiPOTrainer(str(files["good"]), args=dirl.RLConfig(max_steps=1, out=str(tmp_path / "rl")))
    trainer.args.rewards = {"math": float("nan")}
    with pytest.raises(UserError, match="rewards.math must be a finite number"):
        trainer.train()
    args = dirl.SFTConfig(max_steps=1, out=str(tmp_path / "sft"))
    args.optim.lr = float("nan")
    with pytest.raises(ValueError, match="optim.lr"):
        dirl.SFTTrainer(str(files["good"]), train_dataset="task:arithmetic", args=args).train()
    assert not any(tmp_path.iterdir())  # nothing made


def test_device_cuda_without_one_is_refused_before_work(files, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.setattr(sys, "argv", ["dirl"])
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", str(files["good"]), "--data", "task:arithmetic", "device=cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_overwrite_replaces_only_what_dirl_wrote(files, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dirl"])
    out = tmp_path / "ckpt"
    assert main(["init", "--out", str(out)]) == 0
    assert (out / MARKER).is_file()
    assert main(["init", "--out", str(out), "seed=3"]) == 2  # exists: refused
    assert main(["init", "--out", str(out), "seed=3", "overwrite=true"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .old / .tmp left behind


def test_stale_temporaries_are_removed_only_when_marked(tmp_path):
    ours, theirs, linked = tmp_path / ".ckpt.tmp-999999999", tmp_path / ".notes.tmp-999999999", tmp_path / ".x.old-1"
    ours.mkdir()
    (ours / MARKER).write_text("")
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / MARKER).write_text("")
    linked.symlink_to(target)  # marked, but through a symlink: never followed
    assert remove_stale_tmp(tmp_path) == [ours]
    assert (theirs / "keep.txt").read_text() == "mine" and target.is_dir() and linked.is_symlink()


def test_weight_index_naming_a_file_outside_is_refused(files, tmp_path, monkeypatch, capsys):
    escape = tmp_path / "escape"
    escape.mkdir()
    for item in files["good"].iterdir():
        if item.name != "model.safetensors":
            (escape / item.name).write_bytes(item.read_bytes())
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((files["good"] / "model.safetensors").read_bytes())
    from safetensors import safe_open

    with safe_open(str(outside), "pt") as f:
        names = list(f.keys())
    (escape / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../outside.safetensors" for n in names}}))
    monkeypatch.setattr(sys, "argv", ["dirl"])
    assert main(["generate", "--model", str(escape), "--prompt", "hi"]) == 2
    assert "points outside" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data bounds


def test_a_line_over_the_cap_is_refused_before_parsing(files, tmp_path, monkeypatch):
    monkeypatch.setenv("DIRL_MAX_LINE_BYTES", "1000")
    with pytest.raises(DataError, match=r"long.jsonl:2: the row is over the size cap of 1,000 bytes"):
        load_prompt_rows(files["root"] / "data" / "long.jsonl")
    monkeypatch.setenv("DIRL_MAX_LINE_BYTES", "100000")
    assert len(load_prompt_rows(files["root"] / "data" / "long.jsonl")) == 2
    monkeypatch.setenv("DIRL_MAX_LINE_BYTES", "1000")
    with pytest.raises(DataError, match=r"row 0: the row is over the size cap"):  # in memory too
        load_prompt_rows([{"question": "x" * 2000, "answer": "1"}])
    with pytest.raises(DataError, match="row 0: text holds a lone surrogate"):
        load_prompt_rows([{"question": "a\ud800", "answer": "1"}])


def test_template_widths_are_bounded():
    assert render_prompt("{question:>5}", {"question": "ab"}) == "   ab"
    for template in ("{question:>2000000000}", "{question:.9999999}", "{question:{answer}}", "{question.__class__}",
                     "{question[0]}"):
        with pytest.raises(DataError, match="literal template"):
            render_prompt(template, {"question": "q", "answer": "9"})


# ----------------------------------------------------------------------------- rewards


def _one_score(completions, **_):
    return [1.0]


def _all_none(completions, **_):
    return [None] * len(completions)


def _nan(completions, **_):
    return [float("nan")] * len(completions)


def _exits(completions, **_):
    if len(completions) > 1 or completions[0] == "b":
        sys.exit(3)
    return [0.5]


def test_reward_contract_errors_name_the_reward():
    with pytest.raises(RewardError, match="reward '_one_score' returned 1 scores for 4 completions"):
        compute_rewards([_one_score], ["a", "b", "c", "d"])
    with pytest.raises(RewardError, match="reward '_all_none' returned None .* for all 2 completions"):
        compute_rewards([_all_none], ["a", "b"])
    with pytest.raises(RewardError, match="reward '_nan' returned an invalid score nan"):
        compute_rewards([_nan], ["a", "b"])


def test_rewards_accept_arrays_and_tensors_and_isolate_system_exit():
    import numpy as np

    def as_array(completions, **_):
        return np.array([1.0, 2.0])

    def as_tensor(completions, **_):
        return torch.tensor([0.5, 0.25])

    arrays = compute_rewards({as_array: 1.0, as_tensor: 2.0}, ["a", "b"])
    assert arrays.total == [2.0, 2.5]
    exits = compute_rewards([_exits], ["a", "b"])  # the batch call exits: retried row by row
    assert exits.per_reward["_exits"] == [0.5, 0.0] and exits.metrics["rewards/_exits/errors"] == 1.0


def test_a_sleeping_reward_costs_one_batch_budget():
    def sleeper(completions, **_):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # interruptible busy wait
            pass

    started = time.monotonic()
    result = compute_rewards([sleeper], ["a"] * 16, time_limit_s=0.02)  # budget: 16 x 0.02 s
    # The batch budget (2 x 16 x 0.02 s) plus room for a loaded CPU; a per-row retry would add 16 x 0.32 s.
    assert time.monotonic() - started < 0.64 + 2.0
    assert result.failures and result.metrics["rewards/sleeper/errors"] == 16.0


def test_module_function_reward_specs_parse():
    assert parse_reward_spec("rl_rewards:digit_fraction") == {"rl_rewards:digit_fraction": 1.0}
    assert parse_reward_spec("math:2,rl_rewards:digit_fraction:0.5") == {"math": 2.0, "rl_rewards:digit_fraction": 0.5}
    with pytest.raises(ValueError, match="not a finite number"):
        parse_reward_spec("math:nan")


# ----------------------------------------------------------------------------- live updates


def test_live_updates_are_checked_probed_and_rolled_back(files):
    from fastapi.testclient import TestClient
    from safetensors.torch import save

    from dirl.model.checkpoint import load_pretrained
    from dirl.serve import ServeConfig
    from dirl.serve.app import create_app

    model, tokenizer = load_pretrained(files["good"])
    before = model.model.norm.weight.detach().clone()
    auth = {"Authorization": "Bearer k"}
    absurd = save({"model.norm.weight": torch.full_like(before, 3e38)})
    with TestClient(create_app(model.eval(), tokenizer, ServeConfig(model="x"), "k")) as client:
        refused = client.post("/update_weights", content=absurd, headers=auth)
        assert refused.status_code == 400 and "max_update_scale" in refused.json()["error"]["message"]
        health = client.get("/health").json()
        assert health["last_update"]["status"] == "rejected" and health["model_state"] == "serving"
        stops = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stop": ["x"] * 17})
        assert stops.status_code == 400 and "at most 16 stop strings" in stops.text
    assert torch.equal(model.model.norm.weight, before)
    # with the magnitude check off, the probe forward on the new weights catches them
    with TestClient(create_app(model, tokenizer, ServeConfig(model="x", max_update_scale=0), "k")) as client:
        rolled = client.post("/update_weights", content=absurd, headers=auth)
        assert rolled.status_code == 400 and "rolled back" in rolled.json()["error"]["message"]
        health = client.get("/health").json()
        assert health["last_update"]["status"] == "rolled_back" and health["weight_version"] == 0
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "return_token_ids": True})
        assert ok.status_code == 200
    assert torch.equal(model.model.norm.weight, before)


# ----------------------------------------------------------------------------- server processes


@pytest.mark.integration
def test_serve_on_a_used_port_exits_2_with_one_line(files):
    import subprocess

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "dirl.cli", "serve", "--no-updates", "--model",
                               str(files["good"]), "--port", str(port)], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot listen on" in lines[0], proc.stderr


@pytest.mark.integration
def test_slow_loris_connections_are_cut(files):
    """A client that never finishes its request head is disconnected after header_timeout_s, and
    connections over max_connections are closed at once; /health still answers."""
    import httpx

    from serve_procs import free_port, start_server, stop_server, wait_healthy

    proc, url = start_server(files["good"], "--no-updates", "header_timeout_s=1", "max_connections=8")
    try:
        wait_healthy(proc, url)
        port = int(url.rsplit(":", 1)[1])
        socks = []
        for _ in range(12):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
            socks.append(sock)
        time.sleep(2.5)
        closed = 0
        for sock in socks:
            sock.settimeout(1)
            try:
                closed += sock.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                closed += 1
            sock.close()
        assert closed == 12
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert free_port() != port
    finally:
        stop_server(proc)
