"""Packed trace vs one forward per step on an LLaDA2-shaped MoE at B = 32 (``python -m benchmarks.llada2_trace``).

DiPO scores every token of a rollout under the exact state it was committed in with ONE packed
forward (the trace: clean prefix + one noisy copy per denoising step, block-causal; the copies of a
block attend to the clean blocks before it, never to each other). CJ-GRPO (DARE) replays the
trajectory with one forward per denoising step instead: each step re-runs the clean prefix and the
block as it was. Both give the same log-probs (checked here, <= 1e-4); this measures their cost.

Setup: a random llada2 model (``--hidden``, ``--layers``, 16 experts top-4 in 4 groups of which 2
are kept, a shared expert, the char vocabulary), G rollouts of ``--new`` tokens after a ``--prompt``-token prompt, decoded with
LLaDA2's rule (blocks of 32, threshold 0.95, else 1 token per step over 32 steps: a random model
rarely passes the threshold, so nearly every step commits one token -- the trace's worst case,
32 copies a block; ``--steps``). Both methods run forward + backward of the summed log-probs (a training step's
work), the per-step baseline batched over the G rollouts at each step index. Each is timed
``--repeats`` times after a warm-up; the minimum is reported.

``--steps 32 8``: LLaDA2's 32 steps a block (1 token a step on a random model) and 8 (4 tokens a
step, the parallel decoding a trained model reaches at threshold 0.95), one measurement each.

Prints ``name[steps=S]=value`` lines: ``trace_s``, ``per_step_s``, ``speedup`` (per_step / trace),
the tokens per step, the trace's packed tokens, the per-step forwards and the max log-prob difference.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dirl.algo.likelihood import EstimatorArgs, plan_estimator, score_plan
from dirl.engine.engine import Engine
from dirl.model.checkpoint import build_model
from dirl.model.families import get_family
from dirl.model.forward import Readout
from dirl.model.masks import TokenMeta
from dirl.model.policy import policy_logprobs
from dirl.model.tokenizer import char_tokenizer
from dirl.rollout import SamplingParams

B = 32


def random_model(hidden: int, layers: int) -> torch.nn.Module:
    """A random llada2 model of width ``hidden``, built through the family registry."""
    tok = char_tokenizer()
    heads = max(2, hidden // 64)
    family = get_family("llada2")
    cfg = family.config_cls.for_init(family.presets["tiny"], vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=hidden // 2,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=max(1, heads // 4), head_dim=64, num_experts=16,
                                num_experts_per_tok=4, n_group=4, topk_group=2)
    model = build_model(cfg)
    model.init_weights(0)
    return model


def _pad_meta(metas: list[TokenMeta], width: int) -> TokenMeta:
    fill = (-1, 0, False, -1)  # an invisible padding token
    return TokenMeta(*(torch.cat([F.pad(f, (0, width - f.shape[1]), value=v) for m in metas
                                  for f, v in [(m.fields()[k], fill[k])]]) for k in range(4)))


def per_step_logps(model, rollouts, mask_id: int, policy) -> tuple[torch.Tensor, int]:
    """One forward per denoising step (batched over rollouts at the same step index); backward of
    each step's summed log-probs right after it (the replay's memory profile). -> (logps, forwards)."""
    out, forwards = [], 0
    for step in range(_num_steps(rollouts)):
        ids, pos, metas, index, targets = [], [], [], [], []
        for r in rollouts:
            committed = [i for i in range(r.num_tokens) if r.steps[i] == step]
            if not committed:
                continue
            prompt, seq = r.prompt_ids, r.prompt_ids + r.token_ids
            start = (len(prompt) + committed[0]) // B * B
            block = [mask_id if p >= len(prompt) and r.steps[p - len(prompt)] >= step else seq[p]
                     for p in range(start, start + B)]
            row = torch.arange(start + B)
            ids.append(torch.tensor(seq[:start] + block))
            pos.append(row)
            metas.append(TokenMeta.clean(row[None, :start], B).cat(
                TokenMeta.noisy_copy(row[None, start:], B, torch.zeros(1, B, dtype=torch.long))))
            index.append([(len(ids) - 1, len(prompt) + i) for i in committed])
            targets += [r.token_ids[i] for i in committed]
        if not ids:
            continue
        width = max(len(x) for x in ids)
        input_ids = torch.stack([F.pad(x, (0, width - len(x))) for x in ids])
        position_ids = torch.stack([F.pad(x, (0, width - len(x))) for x in pos])
        flat = torch.tensor([row * width + col for rows in index for row, col in rows])
        logits = model(input_ids, position_ids, _pad_meta(metas, width), readout=Readout(flat)).logits
        logp = policy_logprobs(logits, policy.temperature, policy.top_k, policy.top_p, mask_id)
        chosen = logp.gather(-1, torch.tensor(targets)[:, None]).squeeze(-1)
        chosen.sum().backward()
        out.append(chosen.detach())
        forwards += 1
    return torch.cat(out), forwards


def _num_steps(rollouts) -> int:
    """Denoising steps that committed a scored token (the last block may decode past num_tokens)."""
    return 1 + max(max(r.steps[:r.num_tokens]) for r in rollouts)


def trace_logps(model, rollouts, policy) -> tuple[torch.Tensor, object]:
    plan = plan_estimator("trace", EstimatorArgs.for_model(model, rollouts, torch.Generator()))
    logp = score_plan(model, plan, policy)
    logp.sum().backward()
    return logp.detach(), plan


def _timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--group", type=int, default=4, help="rollouts (G)")
    parser.add_argument("--new", type=int, default=56, help="generated tokens per rollout (24 + 32 k: whole blocks)")
    parser.add_argument("--prompt", type=int, default=104, help="prompt tokens (104 = 3 blocks + 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[32, 8], help="forwards per block, one run each")
    parser.add_argument("--quick", action="store_true", help="d 128, 2 layers, G 2, 24 tokens, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.group, args.new, args.repeats, args.steps = 128, 2, 2, 24, 1, [32]
    torch.manual_seed(0)
    model = random_model(args.hidden, args.layers)
    print(f"model_params={sum(p.numel() for p in model.parameters())} hidden={args.hidden} layers={args.layers} "
          f"group={args.group} prompt={args.prompt} new_tokens={args.new} block={B} threads={torch.get_num_threads()}")
    for steps in args.steps:
        measure(model, args, steps)
    return 0


def measure(model, args, steps: int) -> None:
    """One decoding setting: ``steps`` forwards a block (32: LLaDA2's reference, 1 token a step here)."""
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, unmasking="threshold_schedule",
                            threshold=0.95, steps_per_block=steps, n=args.group, seed=0)
    prompt = [[4 + i % 90 for i in range(args.prompt)]]  # the first generated block shares the prompt's last
    with torch.no_grad():
        rollouts = Engine(model.eval()).generate(prompt, params)
    model.train()
    mask_id = model.config.mask_token_id
    t_trace, (trace, plan) = _timed(lambda: trace_logps(model, rollouts, params), args.repeats)
    t_loop, (loop, forwards) = _timed(lambda: per_step_logps(model, rollouts, mask_id, params), args.repeats)
    model.zero_grad(set_to_none=True)
    order = {(s, t): j for j, (s, t) in enumerate(zip(plan.pack.seq_index.tolist(), plan.pack.token_index.tolist()))}
    expected = torch.stack([trace[order[(s, i)]] for step in range(_num_steps(rollouts))
                            for s, r in enumerate(rollouts) for i in range(r.num_tokens) if r.steps[i] == step])
    tag = f"[steps={steps}]"
    per_step = sum(r.num_tokens for r in rollouts) / (len(rollouts) * _num_steps(rollouts))
    print(f"tokens_per_step{tag}={per_step:.2f} trace_tokens{tag}={plan.pack.input_ids.numel()} "
          f"per_step_forwards{tag}={forwards} max_logp_diff{tag}={(expected - loop).abs().max().item():.2e}")
    print(f"trace_s{tag}={t_trace:.3f} per_step_s{tag}={t_loop:.3f} speedup{tag}={t_loop / t_trace:.2f}")

if __name__ == "__main__":
    raise SystemExit(main())
