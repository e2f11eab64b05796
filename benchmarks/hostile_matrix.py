"""The hostile-input matrix (issue 30): bad inputs across every command and the Python API, each
run as its own process in a scratch directory with a time limit, classified by outcome.

Classes (a bad input must land in ``ok``; a valid one, marked ``valid``, must exit 0):

* ``ok`` -- exit 2 and ONE stderr line ``dirl <command>: ...`` holding the expected text (API
  cases: the expected ``UserError`` subclass, printed as one line by the harness);
* ``traceback`` -- a Python traceback; ``silent`` -- exit 0 for a bad input;
* ``destructive`` -- a file outside the case's own output changed, appeared or went away;
* ``hang`` -- still running at the time limit; ``abort`` -- killed by a signal (e.g. the
  tokenizer's Rust abort, the kernel's OOM killer);
* ``unclear`` -- exit 2 but not one line, or without the expected text; ``valid_rejected`` -- a
  valid input that did not exit 0.

    python -m benchmarks.hostile_matrix [--quick] [--jobs 2] [--only SUBSTRING] [--timeout 120]

``--quick``: the first case of every group (a smoke test of the harness).

Prints one line per case that is not ``ok``, then ``class=count`` lines and ``total=N``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIG = "9" * 5000

REWARDS_MODULE = '''
import sys, time
def one_score(completions, **_): return [1.0]
def all_none(completions, **_): return [None] * len(completions)
def nan_score(completions, **_): return [float("nan")] * len(completions)
def inf_score(completions, **_): return [float("inf")] * len(completions)
def exits(completions, **_): sys.exit(3)
def as_numpy(completions, **_):
    import numpy
    return numpy.array([len(c) % 3 for c in completions], dtype=float)
def as_tensor(completions, **_):
    import torch
    return torch.tensor([float(len(c) % 3) for c in completions])
def sleeper(completions, **_):
    time.sleep(3600)
def strings(completions, **_): return ["high"] * len(completions)
def digits(completions, **_): return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
NOT_A_FUNCTION = 3
'''

TINY_RL = ["model={good}", "rollout.num_prompts=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=8",
           "max_steps=1", "--no-progress", "report_to=[jsonl]"]
TINY_SFT = ["model={good}", "data.source=task:arithmetic", "data.max_length=64", "batch_size=2", "data.limit=8",
            "max_steps=1", "--no-progress", "report_to=[jsonl]"]
EVAL = ["eval", "--model", "{good}", "--data", "task:arithmetic", "limit=2", "sampling.max_new_tokens=8",
        "--no-progress"]


def make_fixtures(root: Path) -> dict[str, str]:
    """Checkpoints, data files and directories the cases point at (all under ``root``)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}", "OMP_NUM_THREADS": "1", "DIRL_FSYNC": "0"}
    dirl = [sys.executable, "-m", "dirl.cli"]
    subprocess.run([*dirl, "init", "--out", str(root / "good")], check=True, env=env, capture_output=True)
    f = {"root": str(root), "good": str(root / "good"), "big": BIG}
    (root / "rewards_mod.py").write_text(REWARDS_MODULE)
    data = root / "data"
    data.mkdir()
    (data / "ok.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n' * 4)
    (data / "big.jsonl").write_text('{"question": "' + "a" * (3 << 20) + '", "answer": "1"}\n')
    (data / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (data / "deep_field.jsonl").write_text('{"question": "q", "answer": ' + "[" * 60 + "1" + "]" * 60 + "}\n")
    (data / "bigint.jsonl").write_text('{"question": "q", "answer": ' + BIG + "}\n")
    (data / "surrogate.jsonl").write_text('{"question": "a\\ud800b", "answer": "1"}\n')
    (data / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (data / "sft_surrogate.jsonl").write_text('{"question": "a\\udfffb", "answer": "x\\ud800"}\n')
    (data / "not_object.jsonl").write_text("[1, 2]\n")
    (data / "null.jsonl").write_text("null\n")
    (data / "messages_bad.jsonl").write_text('{"messages": [{"role": "wizard", "content": "x"}]}\n')
    (data / "dir.jsonl").mkdir()
    cfg = root / "cfg"
    cfg.mkdir()
    (cfg / "bomb.yaml").write_text("a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))
    (cfg / "deep.yaml").write_text("max_steps: " + "[" * 5000 + "]" * 5000 + "\n")
    (cfg / "bigint.yaml").write_text(f"seed: {BIG}\n")
    (cfg / "tabs.yaml").write_text("max_steps:\t\t: :\n  - [\n")
    (cfg / "list.yaml").write_text("- 1\n- 2\n")
    (cfg / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01" * 10)
    (cfg / "a_dir").mkdir()
    # a user's own directories: must survive every case untouched
    user = root / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    (root / "user_file.txt").write_text("mine too\n")
    (root / ".out.tmp-999999").mkdir()  # a user's file that looks like a dirl temporary
    (root / ".out.tmp-999999" / "keep.txt").write_text("x\n")
    # a run whose checkpoints/ is a symlink to the user's directory
    (root / "linked_run").mkdir()
    (root / "linked_run" / "checkpoints").symlink_to(user)
    (root / "linked_run" / "config.yaml").write_text("max_steps: 1\n")
    # a run whose latest points out of it
    crafted = root / "crafted_run" / "checkpoints"
    crafted.mkdir(parents=True)
    (crafted / "latest").write_text("../../good\n")
    # a checkpoint whose index names a shard outside it
    escape = root / "escape"
    shutil.copytree(root / "good", escape)
    (escape / "model.safetensors").rename(root / "outside.safetensors")
    names = json.loads(subprocess.run([sys.executable, "-c", (
        "import json,sys; from safetensors import safe_open; f=safe_open(sys.argv[1],'pt'); "
        "print(json.dumps(list(f.keys())))"), str(root / "outside.safetensors")],
        capture_output=True, text=True, check=True, env=env).stdout)
    (escape / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "../outside.safetensors" for n in names}}))
    shutil.copytree(root / "good", root / "v_owned")
    corrupt = root / "corrupt_cfg"
    shutil.copytree(root / "good", corrupt)
    (corrupt / "config.json").write_text('{"hidden_size": ')
    return f


def cases() -> list[tuple[str, str, list[str], str]]:
    """(name, group, argv or ["py", code], expected text; "" for a valid input that must exit 0)."""
    out: list[tuple[str, str, list[str], str]] = []

    def add(name, group, argv, expected):
        out.append((name, group, argv if isinstance(argv, list) else argv.split(), expected))

    # ---- ownership: outputs
    for cmd in ("init --out {root}/user", "init --out {root}/user_file.txt", "init --out= ",
                "init --out {root}/linked_run/checkpoints"):
        add(f"own-{cmd.split()[0]}-{len(out)}", "ownership", cmd, "--out")
    add("own-init-empty-dir-ok", "valid", "init --out {root}/v_init", "")
    add("own-init-overwrite-own", "valid", "init --out {root}/v_owned overwrite=true", "")
    add("own-convert-into-source", "ownership", "convert {good} --out {good}", "overlaps the input")
    add("own-convert-inside-source", "ownership", "convert {good} --out {good}/sub", "overlaps the input")
    add("own-convert-contains-source", "ownership", "convert {good} --out {root}", "overlaps the input")
    add("own-merge-into-base", "ownership", "merge {good} --out {good} --base {good}", "")
    add("own-eval-out-run", "ownership", [*EVAL, "--out", "{root}/linked_run"], "exists and is not empty")
    add("own-eval-out-file", "ownership", [*EVAL, "--out", "{root}/user_file.txt"], "not a directory")
    add("own-eval-out-model", "ownership", [*EVAL, "--out", "{good}"], "overlaps the input")
    add("own-rl-out-empty", "ownership", ["rl", *TINY_RL, "out="], "out")
    add("own-rl-out-file", "ownership", ["rl", *TINY_RL, "out={root}/user_file.txt"], "out")
    add("own-sft-out-user", "ownership", ["sft", *TINY_SFT, "out={root}/user"], "out")
    add("own-sft-overwrite-symlink", "ownership", ["sft", *TINY_SFT, "out={root}/linked_run", "overwrite=true"],
        "symlink")
    add("own-rl-resume-crafted-latest", "ownership", "rl --resume {root}/crafted_run", "")
    add("own-index-escape", "ownership", "generate --model {root}/escape --prompt hi", "outside")
    add("own-sft-out-is-model", "ownership", ["sft", *TINY_SFT, "out={good}"], "out")
    # ---- config files and overrides
    for name, path in (("bomb", "bomb"), ("deep", "deep"), ("bigint", "bigint"), ("tabs", "tabs"),
                       ("list", "list"), ("binary", "binary")):
        for cmd in ("sft", "rl", "init --out {root}/o_" + name, "show-config --kind rl"):
            add(f"cfg-{name}-{cmd.split()[0]}", "config", f"{cmd} --config {{root}}/cfg/{path}.yaml", "cfg/")
    for cmd in ("sft", "rl", "show-config --kind sft", "serve --no-updates --model {good}"):
        add(f"cfg-dir-{cmd.split()[0]}", "config", f"{cmd} --config {{root}}/cfg/a_dir", "a_dir")
    bad_values = {"nan": "nan", "inf": "inf", "neg": "-1", "bool": "true", "text": "abc", "huge": str(2**64),
                  "digits": BIG, "yaml": "[1,2", "mapping": "{a: 1}"}
    numeric = {"sft": ["optim.lr", "max_steps", "batch_size", "seed", "data.max_length"],
               "rl": ["optim.lr", "rollout.num_prompts", "seed", "rollout.sampling.max_new_tokens", "algo.beta"]}
    for cmd, keys in numeric.items():
        for key in keys:
            for label, value in bad_values.items():
                if label in ("nan", "inf") and key in ("max_steps", "batch_size", "seed", "data.max_length",
                                                       "rollout.num_prompts", "rollout.sampling.max_new_tokens"):
                    continue
                if label == "neg" and key in ("algo.beta",):
                    continue
                if label == "huge" and key == "max_steps":  # 2**64 steps: a long run, as asked
                    continue
                add(f"val-{cmd}-{key}-{label}", "config", [cmd, *(TINY_SFT if cmd == "sft" else TINY_RL),
                                                           f"{key}={value}"], key.split(".")[-1])
    add("val-rl-rewards-bool", "config", ["rl", *TINY_RL, "rewards.math=true"], "rewards.math")
    add("val-rl-rewards-nan", "config", ["rl", *TINY_RL, "rewards.math=nan"], "rewards.math")
    add("val-rl-lora-alpha-nan", "config", ["rl", *TINY_RL, "lora.r=4", "lora.alpha=nan"], "lora.alpha")
    add("val-sft-lora-alpha-nan", "config", ["sft", *TINY_SFT, "lora.r=4", "lora.alpha=nan"], "lora.alpha")
    add("val-rl-attn-bogus", "config", ["rl", *TINY_RL, "attn_impl=bogus"], "attn_impl")
    add("val-sft-attn-bogus", "config", ["sft", *TINY_SFT, "attn_impl=bogus"], "attn_impl")
    add("val-rl-attn-auto", "valid", ["rl", *TINY_RL, "attn_impl=auto", "out={root}/v_rl_auto"], "")
    add("val-rl-device-cuda", "config", ["rl", *TINY_RL, "device=cuda"], "device")
    add("val-sft-device-cuda", "config", ["sft", *TINY_SFT, "device=cuda"], "device")
    add("val-sft-device-bogus", "config", ["sft", *TINY_SFT, "device=quantum"], "device")
    add("val-eval-device-cuda", "config", [*EVAL, "device=cuda"], "device")
    add("val-gen-device-cuda", "config", "generate --model {good} --prompt hi --device cuda", "device")
    add("val-serve-device-cuda", "config", "serve --no-updates --model {good} device=cuda", "device")
    add("val-rl-url-unreachable", "config", ["rl", *TINY_RL, "rollout.backend=http", "rollout.http.url=http://127.0.0.1:9"],
        "rollout.http.url")
    add("val-convert-block0", "config", "convert {good} --out {root}/cv0 block_size=0", "block_size")
    add("val-convert-int8", "config", "convert {good} --out {root}/cv1 dtype=int8", "dtype")
    add("val-convert-corrupt", "config", "convert {root}/corrupt_cfg --out {root}/cv2", "config.json")
    add("val-gen-corrupt", "config", "generate --model {root}/corrupt_cfg --prompt hi", "config.json")
    add("val-init-seed-huge", "config", f"init --out {{root}}/o_seed seed={2**64}", "seed")
    add("val-sft-batch-huge", "config", ["sft", *TINY_SFT, "batch_size=1000000000"], "batch_size")
    add("val-sft-maxlen-huge", "config", ["sft", *TINY_SFT, "data.max_length=1000000000000"], "max_length")
    add("val-rl-group-huge", "config", ["rl", *TINY_RL, "rollout.group_size=1000000000"], "group_size")
    # ---- context
    add("ctx-gen-max-new", "context", "generate --model {good} --prompt hi max_new_tokens=100000", "context")
    add("ctx-eval-max-new", "context", [*EVAL, "sampling.max_new_tokens=100000"], "context")
    add("ctx-rl-max-new", "context", ["rl", *TINY_RL, "rollout.sampling.max_new_tokens=100000"], "context")
    add("ctx-sft-eval-max-new", "context", ["sft", *TINY_SFT, "eval_sampling.max_new_tokens=100000", "eval.every=1"],
        "context")
    # ---- data
    for name in ("big", "deep", "deep_field", "bigint", "surrogate", "deep.json", "not_object", "null",
                 "dir"):
        file = name if name.endswith(".json") else f"{name}.jsonl"
        add(f"data-rl-{name}", "data", ["rl", *TINY_RL, f"data={{root}}/data/{file}"], file)
        add(f"data-sft-{name}", "data", ["sft", *TINY_SFT, f"data.source={{root}}/data/{file}"], file)
        add(f"data-eval-{name}", "data", ["eval", "--model", "{good}", "--data", f"{{root}}/data/{file}",
                                          "--no-progress"], file)
    add("data-sft-surrogate-answer", "data", ["sft", *TINY_SFT, "data.source={root}/data/sft_surrogate.jsonl"],
        "sft_surrogate.jsonl")
    add("data-sft-messages-role", "data", ["sft", *TINY_SFT, "data.source={root}/data/messages_bad.jsonl"],
        "messages_bad")
    for name, template in (("width", "{question:>2000000000}"), ("nested", "{question:{answer}}"),
                           ("precision", "{question:.999999999}"), ("positional", "{0}"), ("attr", "{question.__class__}")):
        add(f"tpl-rl-{name}", "data", ["rl", *TINY_RL, f"prompt_template={template}"], "template")
        add(f"tpl-eval-{name}", "data", [*EVAL, f"prompt_template={template}"], "template")
    add("tpl-sft-width", "data", ["sft", *TINY_SFT, "data.prompt_template={question:>2000000000}"], "template")
    # ---- rewards
    for fn, expected in (("one_score", "1 scores for"), ("all_none", "None"), ("nan_score", "nan"),
                         ("inf_score", "inf"), ("exits", "exits"), ("strings", "'high'"),
                         ("NOT_A_FUNCTION", "not a function"), ("missing_fn", "missing_fn")):
        add(f"rew-rl-{fn}", "rewards", ["rl", *TINY_RL, f"rewards={{rewards_mod:{fn}: 1.0}}"], expected)
        add(f"rew-eval-{fn}", "rewards", [*EVAL, "--reward", f"rewards_mod:{fn}"], expected)
    add("rew-rl-numpy", "valid", ["rl", *TINY_RL, "rewards={rewards_mod:as_numpy: 1.0}", "out={root}/v_rl_np"], "")
    add("rew-rl-tensor", "valid", ["rl", *TINY_RL, "rewards={rewards_mod:as_tensor: 1.0}", "out={root}/v_rl_t"], "")
    add("rew-eval-module", "valid", [*EVAL, "--reward", "rewards_mod:digits", "--out", "{root}/v_ev_mod"], "")
    add("rew-rl-heldout-module", "valid", ["rl", *TINY_RL, "rewards={rewards_mod:digits: 1.0}", "eval.every=1",
                                           "eval.limit=2", "out={root}/v_rl_heldout"], "")
    add("rew-rl-unknown", "rewards", ["rl", *TINY_RL, "rewards.nope=1"], "nope")
    add("rew-eval-weight-text", "rewards", [*EVAL, "--reward", "math:abc"], "abc")
    # ---- serve (refused before the server starts)
    add("serve-port-range", "serve", "serve --no-updates --model {good} --port 70000", "port")
    add("serve-stop-cap", "serve", "serve --no-updates --model {good} max_stop_strings=-1", "max_stop_strings")
    add("serve-timeout-nan", "serve", "serve --no-updates --model {good} header_timeout_s=nan", "header_timeout_s")
    add("serve-host-bogus", "serve", "serve --no-updates --model {good} --host no.such.host.invalid", "host")
    # ---- Python API
    api = {
        "api-rl-nan-weight": ("import dirl\nt = dirl.DiPOTrainer('{good}', args=dirl.RLConfig(max_steps=1, "
                              "out='{root}/api_rl'))\nt.args.rewards = {'math': float('nan')}\nt.train()", "rewards"),
        "api-rl-num-prompts-0": ("import dirl\ncfg = dirl.RLConfig(max_steps=1, out='{root}/api_rl2')\n"
                                 "cfg.rollout.num_prompts = 0\ndirl.DiPOTrainer('{good}', args=cfg).train()",
                                 "num_prompts"),
        "api-sft-lr-nan": ("import dirl\nt = dirl.SFTTrainer('{good}', train_dataset='task:arithmetic', "
                           "args=dirl.SFTConfig(max_steps=1, out='{root}/api_sft'))\nt.args.optim.lr = float('nan')\n"
                           "t.train()", "lr"),
        "api-sft-batch-0": ("import dirl\nt = dirl.SFTTrainer('{good}', train_dataset='task:arithmetic', "
                            "args=dirl.SFTConfig(max_steps=1, out='{root}/api_sft2'))\nt.args.batch_size = 0\n"
                            "t.train()", "batch_size"),
        "api-rl-reward-one-score": ("import dirl\nt = dirl.DiPOTrainer('{good}', reward_funcs=lambda completions, **k:"
                                    " [1.0], args=dirl.RLConfig(max_steps=1, out='{root}/v_api_rl3'))\nt.train()",
                                    "1 scores for"),
        "api-rewards-one-score": ("from dirl.rewards import compute_rewards\ncompute_rewards([lambda completions, **k:"
                                  " [1.0]], ['a', 'b', 'c', 'd'])", "1 scores for 4"),
        "api-rewards-all-none": ("from dirl.rewards import compute_rewards\ncompute_rewards([lambda completions, **k:"
                                 " [None] * len(completions)], ['a', 'b'])", "None"),
        "api-rewards-nan": ("from dirl.rewards import compute_rewards\ncompute_rewards([lambda completions, **k:"
                            " [float('nan')] * len(completions)], ['a', 'b'])", "nan"),
        "api-load-deep": ("from dirl.data import load_prompt_rows\nload_prompt_rows('{root}/data/deep.jsonl')",
                          "deep.jsonl:1"),
        "api-load-memory-surrogate": ("from dirl.data import load_prompt_rows\nload_prompt_rows([{'question': '\\ud800', "
                                      "'answer': '1'}])", "row 0"),
        "api-config-bomb": ("import dirl\ndirl.load_config(dirl.SFTConfig, "
                            "'{root}/cfg/bomb.yaml')", "bomb.yaml"),
    }
    for name, (code, expected) in api.items():
        add(name, "api", ["py", code], expected)
    add("api-rewards-numpy", "valid", ["py", "import numpy\nfrom dirl.rewards import compute_rewards\nr = "
                                       "compute_rewards([lambda completions, **k: numpy.array([1.0, 2.0])], ['a', 'b'])\n"
                                       "assert r.total == [1.0, 2.0]"], "")
    return out


PY_HARNESS = textwrap.dedent('''
    import sys
    from dirl.errors import UserError
    try:
        exec(compile(sys.argv[1], "<case>", "exec"), {})
    except UserError as err:
        print(f"dirl api: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
''')


def snapshot(root: Path, skip: set[str]) -> dict[str, str]:
    """path -> size:hash of every file (and symlink target) under ``root`` except ``skip`` tops."""
    state = {}
    for here, dirs, files in os.walk(root, followlinks=False):
        rel_here = os.path.relpath(here, root)
        if rel_here.split(os.sep)[0] in skip:
            dirs[:] = []
            continue
        for name in files + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
            path = os.path.join(here, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                state[rel] = "link:" + os.readlink(path)
            else:
                with open(path, "rb") as fh:
                    state[rel] = hashlib.sha1(fh.read()).hexdigest()
        state.update({os.path.relpath(os.path.join(here, d), root) + "/": "dir" for d in dirs})
    return state


def fill(text: str, fixtures: dict[str, str]) -> str:
    """``{root}``, ``{good}`` ... replaced (only those: the cases hold literal braces too)."""
    for key, value in fixtures.items():
        text = text.replace("{" + key + "}", value)
    return text


def run_case(case, fixtures: dict[str, str], timeout: float) -> tuple[str, str, str]:
    name, group, argv, expected = case
    work = Path(tempfile.mkdtemp(prefix=f"case-{name[:20]}-", dir=fixtures["root"] + "/.work"))
    if argv[0] == "py":
        cmd = [sys.executable, "-c", PY_HARNESS, fill(argv[1], fixtures)]
    else:
        cmd = [sys.executable, "-m", "dirl.cli", *[fill(a, fixtures) for a in argv]]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}:{fixtures['root']}", "OMP_NUM_THREADS": "1",
           "DIRL_FSYNC": "0"}
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return name, "hang", f"> {timeout:.0f} s"
    err = proc.stderr.strip()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("WARNING", "warning"))]
    if "Traceback (most recent call last)" in err:
        return name, "traceback", err.splitlines()[-1][:200]
    if proc.returncode < 0 or proc.returncode in (134, 137, 139):
        return name, "abort", f"rc={proc.returncode} {err[-200:]}"
    if not expected and group == "valid":
        return (name, "ok", "") if proc.returncode == 0 else (name, "valid_rejected", err[-200:])
    if proc.returncode == 0:
        return name, "silent", proc.stdout.strip()[-120:]
    if proc.returncode == 2:
        last = lines[-1] if lines else ""
        one = len([ln for ln in lines if ln.startswith("dirl ")]) == 1 and last.startswith("dirl ")
        if one and expected.lower() in last.lower():
            return name, "ok", last[:200]
        return name, "unclear", " | ".join(lines[-3:])[:300]
    return name, "unclear", f"rc={proc.returncode} {err[-200:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated substrings of case names")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--json", default="", help="write the per-case results here")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dirl-hostile-") as tmp:
        root = Path(tmp)
        fixtures = make_fixtures(root)
        (root / ".work").mkdir()
        patterns = args.only.split(",")  # any of several substrings
        selected = [c for c in cases() if any(p in c[0] for p in patterns)]
        if args.quick:
            selected = [c for i, c in enumerate(selected) if c[1] not in {d[1] for d in selected[:i]}]
        before = snapshot(root, {".work"})
        results, counts = [], collections.Counter()
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for name, verdict, detail in pool.map(lambda c: run_case(c, fixtures, args.timeout), selected):
                counts[verdict] += 1
                results.append({"case": name, "class": verdict, "detail": detail})
                if verdict != "ok":
                    print(f"{verdict:15s} {name}: {detail}", flush=True)
        after = snapshot(root, {".work"})
        # the outputs of the valid cases (v_*) may change; anything else is a destructive or partial write
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                         and not k.startswith("v_"))
        for path in changed:
            print(f"destructive     {path}: changed outside the outputs")
        counts["destructive"] += len(changed)
        for verdict in ("ok", "traceback", "silent", "destructive", "hang", "abort", "unclear", "valid_rejected"):
            print(f"{verdict}={counts[verdict]}")
        print(f"total={len(selected)}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
