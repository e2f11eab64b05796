"""The memory plan against measured peaks at a real shape (``python -m benchmarks.memory_plan``).

A Qwen3-0.6B-shaped SDAR checkpoint (d 1024, 28 layers, 16 / 8 heads of 128, MLP 3072, tied
embeddings, V = 151,936: 596M parameters; random weights, SDAR-8B's tokenizer) is trained by
the real trainers (``train_sft`` / ``train_rl``, bf16-mixed, checkpointed layers, CPU) in a
fresh subprocess per case. The peak is the steady state: the process's peak RSS (``VmHWM``) is
reset after the first optimizer step (``/proc/self/clear_refs``) and read after the second, so
AdamW's moments exist throughout. ``measured`` is that peak minus the RSS before the model
was loaded (Python, torch, the tokenizer: not the run's); ``plan`` is
:func:`dirl.memory_plan.plan` of the same config (``train_peak``, and for RL the larger of it and
``rollout_peak``), with the rollouts' measured prompt and response lengths. Prints one line per
case and ``memory_plan_ratio[<case>]=measured/plan``.

    python -m benchmarks.memory_plan [--cases sft-full,sft-lora,rl-full,rl-lora] [--length 256] [--workdir DIR]

Needs ~12 GB free for ``sft-full`` / ``rl-full`` (16 B / param of states), ~4 GB for the LoRA
cases; a case takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = next((p / "shared" / "sdar-8b-chat" for p in REPO.parents if (p / "shared" / "sdar-8b-chat").is_dir()),
                 REPO.parent / "shared" / "sdar-8b-chat")  # ../shared beside the checkout (or higher up)
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_theta=1_000_000.0,
                  max_position_embeddings=40_960)
CASES = ("sft-full", "sft-lora", "rl-full", "rl-lora")


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_checkpoint(workdir: Path, tokenizer: Path = TOKENIZER) -> Path:
    """The random Qwen3-0.6B-shaped checkpoint (bf16 on disk), made once per workdir."""
    out = workdir / "qwen3-0.6b-shape"
    if not (out / "config.json").exists():
        from dirl.model.factory import InitConfig, init_checkpoint
        init_checkpoint(InitConfig(preset="sdar-8b", tokenizer=str(tokenizer), param_dtype="bfloat16",
                                   model=dict(QWEN3_0_6B)), out)
    return out


def _rows(n: int, words: int) -> list[dict]:
    return [{"question": f"Repeat the list {i}.", "answer": " ".join(f"w{(i * 7 + j) % 97}" for j in range(words))}
            for i in range(n)]


def _config(case: str, ckpt: Path, out: Path, length: int):
    from dirl.model.lora import LoraConfig
    from dirl.rollout import SamplingSpec
    from dirl.train.precision import ComputeConfig
    from dirl.train.rl.config import AlgoConfig, RLConfig, RolloutConfig
    from dirl.train.sft.config import SFTConfig, SFTDataConfig
    common = dict(model=str(ckpt), out=str(out), device="cpu", max_steps=2, save_every=0, progress=False,
                  report_to=["jsonl"], lora=LoraConfig(r=16 if case.endswith("lora") else 0),
                  compute=ComputeConfig(precision="bf16-mixed", activation_checkpointing=True))
    if case.startswith("sft"):
        return SFTConfig(data=SFTDataConfig(source=str(out.parent / "sft.jsonl"), max_length=length),
                         batch_size=1, pack=True, **common)
    sampling = SamplingSpec(max_new_tokens=length // 8, unmasking="sequential", temperature=1.0)
    return RLConfig(data=str(out.parent / "rl.jsonl"), rollout=RolloutConfig(num_prompts=2, group_size=4,
                    sampling=sampling), algo=AlgoConfig(beta=0.01), **common)


def child(case: str, ckpt: Path, length: int) -> None:
    """Run two steps of ``case``; print the measured and planned peaks (MB) as one JSON line."""
    import torch

    from dirl.memory_plan import plan, rl_workload, sft_workload
    from dirl.model.tokenizer import load_tokenizer
    from dirl.commands.plan import model_config
    from dirl.train.callbacks import TrainerCallback
    from dirl.train.models import RunInputs
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tmp = Path(tempfile.mkdtemp(prefix="dirl-memplan-"))
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(8, length // 4)))
    (tmp / "rl.jsonl").write_text("".join(json.dumps({"question": r["question"], "answer": "1"}) + "\n"
                                          for r in _rows(8, 1)))
    tok = load_tokenizer(ckpt)  # the tokenizer's memory belongs to the baseline
    prompt_len = len(tok.encode(_rows(1, 1)[0]["question"])) + 16  # + the prompt template's tokens
    cfg = _config(case, ckpt, tmp / "run", length)
    before = _rss_mb()
    seen: dict = {}

    class Peak(TrainerCallback):
        def on_step_end(self, step, metrics):
            if step == 1:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: measure step 2 alone
                return
            seen.update(metrics)
            measured = _rss_mb("VmHWM") - before
            model_cfg, adapters = model_config(str(ckpt), cfg.lora)
            if case.startswith("sft"):
                work = sft_workload(cfg, 1, lora_params=adapters, foreach=False)
            else:
                work = rl_workload(cfg, 1, response_tokens=metrics["completions/mean_length"],
                                   prompt_tokens=prompt_len, lora_params=adapters, foreach=False)
            planned = plan(model_cfg, work)
            peak = max(planned["train_peak"], planned["rollout_peak"])
            print(json.dumps({"case": case, "measured_mb": round(measured, 1), "plan_mb": round(peak * 1024, 1),
                              "ratio": round(measured / (peak * 1024), 3), "before_mb": round(before, 1),
                              "tokens": work.tokens, "terms_mb": {k: round(v * 1024, 1) for k, v in planned.items()
                                                                  if not k.endswith("_b")}}), flush=True)
            os._exit(0)  # skip the final save (not part of a step)

    if case.startswith("sft"):
        from dirl.train.sft.loop import train_sft
        train_sft(cfg, inputs=RunInputs(callbacks=_callbacks(Peak())))
    else:
        from dirl.train.rl.loop import train_rl
        reward = {lambda completions, **kw: [float(len(c) % 3) for c in completions]: 1.0}
        train_rl(cfg, inputs=RunInputs(reward_funcs=reward, callbacks=_callbacks(Peak())))
    raise SystemExit("the run ended before step 2")


def _callbacks(callback):
    from dirl.train.callbacks import CallbackList
    return CallbackList([callback])


def run_case(case: str, ckpt: Path, length: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--ckpt", str(ckpt),
           "--length", str(length)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--length", type=int, default=256, help="SFT row length; RL responses are length / 8")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true", help="sft-lora alone at length 128 (~4 GB, minutes)")
    parser.add_argument("--child", default=None)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Path(args.ckpt), args.length)
        return 0
    if args.quick:
        args.cases, args.length = "sft-lora", 128
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dirl-memplan-"))
    ckpt = make_checkpoint(workdir)
    for case in args.cases.split(","):
        result = run_case(case, ckpt, args.length)
        print(f"{case:9s} measured {result['measured_mb']:8.1f} MB  plan {result['plan_mb']:8.1f} MB  "
              f"tokens {result['tokens']}", flush=True)
        print(f"memory_plan_ratio[{case}]={result['ratio']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
