"""dirl from Python: 2 SFT steps, then 2 DiPO steps, on the tiny preset (CPU, about a minute).

    python examples/python_api.py [OUT_DIR]

The RL reward is a plain function with TRL's reward signature; the script prints the metrics of
every RL step (a callback) and checks that the reward's mean is not zero.
"""

from __future__ import annotations

import sys
import tempfile

import dirl


def answer_digits(prompts, completions, completion_ids, answer, **kwargs):
    """TRL signature: 1 for the right answer, else the share of the completion that is digits
    (a dense signal an untrained model already varies on)."""
    return [1.0 if text.strip() == str(ref) else sum(ch.isdigit() for ch in text) / max(len(ids), 1)
            for text, ids, ref in zip(completions, completion_ids, answer)]


class PrintRL(dirl.TrainerCallback):
    def __init__(self):
        self.rewards = []

    def on_step_end(self, step, metrics):
        self.rewards.append(metrics["rewards/answer_digits/mean"])
        print(f"rl step {step}: reward={metrics['reward']:.4f} "
              f"rewards/answer_digits/mean={metrics['rewards/answer_digits/mean']:.4f} "
              f"completions/mean_length={metrics['completions/mean_length']:.1f}")


def main(out: str) -> float:
    sft_args = dirl.SFTConfig(out=f"{out}/sft", max_steps=2, batch_size=4, log_every=1, save_every=0,
                              progress=False, report_to=["jsonl"],
                              data=dirl.SFTDataConfig(limit=64, max_length=64))
    sft = dirl.SFTTrainer("init:tiny", train_dataset="task:arithmetic", args=sft_args)
    sft.train()

    prompts = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 5) for b in range(1, 5)]
    rl_args = dirl.RLConfig(out=f"{out}/rl", max_steps=2, seed=0, report_to=["jsonl"],
                            rollout=dirl.RolloutConfig(num_prompts=2, group_size=4),
                            algo=dirl.AlgoConfig(estimator="trace", beta=0.0))
    rl_args.rollout.sampling.max_new_tokens = 16
    printer = PrintRL()
    rl = dirl.DiPOTrainer(sft.model, tokenizer=sft.tokenizer, reward_funcs=[answer_digits],
                          train_dataset=prompts, args=rl_args, callbacks=[printer])
    run_dir = rl.train(progress=False)
    mean = sum(printer.rewards) / len(printer.rewards)
    print(f"python_api: rl run {run_dir}, mean TRL-reward {mean:.4f}")
    if not mean:
        raise SystemExit("python_api: the reward's mean is zero")
    return mean


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dirl-python-api-"))
