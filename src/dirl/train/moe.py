"""Mixture-of-experts settings of a training run, and the router's load-balance metrics.

Family-agnostic: a model with experts offers ``router_parameters()`` (the router weights) and
``take_expert_counts()`` (layer -> tokens routed to each expert by its no-grad forwards since the
last call); a dense model offers neither and everything here is a no-op.

``freeze_router`` (default on): the router weights get no gradient. The routing bias
(``expert_bias``, auxiliary-loss-free balancing) is a buffer and never trained by SGD either.
Why frozen by default in RL: (1) the top-k choice is not differentiable, so the router's gradient
only flows through the weights of the experts it already picked -- a partial, biased signal at RL's
few samples per prompt; (2) a router step moves tokens between experts discontinuously, so token
log-probs jump in ways PPO's ratio clipping does not bound (the MoE-RL instability that routing
replay / GSPO work around); (3) the expert bias was tuned against the pretrained router, and
without its update rule a drifting router loses the load balance. With it frozen the routing is
still recomputed from the current hidden states, so trainer = engine log-probs holds exactly.
SFT shares the setting and its default (``moe.freeze_router=false`` trains the router there).
The utilisation metrics are logged by RL, over each step's rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dirl.train import dist as dist_lib


@dataclass
class MoEConfig:
    """``moe.*`` of every trainer (``TrainerConfig``: SFT and RL; ignored by dense models)."""

    freeze_router: bool = True        # no gradient to the router weights (the expert bias is never trained)
    log_utilisation: bool = True      # per-layer expert load metrics of each step's rollouts


def apply_moe_settings(model: torch.nn.Module, cfg: MoEConfig) -> int:
    """Freeze the routers when asked (before the optimizer is built); -> router weights frozen."""
    params = getattr(model, "router_parameters", lambda: [])()
    if cfg.freeze_router:
        for param in params:
            param.requires_grad_(False)
    return len(params) if cfg.freeze_router else 0


def reset_utilisation(model: torch.nn.Module) -> None:
    """Forget the expert counts so far (no collective): the next metrics cover what runs after."""
    getattr(model, "take_expert_counts", dict)()


def utilisation_metrics(model: torch.nn.Module) -> dict[str, float]:
    """Per-layer load of the experts since the last call, summed over the ranks (every rank calls it).

    ``moe/max_load/layer{i}``: the busiest expert's tokens over the mean (1 = perfectly balanced,
    E = everything on one expert); ``moe/used/layer{i}``: the fraction of experts that got any token;
    ``moe/max_load``: the worst layer's max_load."""
    take = getattr(model, "take_expert_counts", None)
    if take is None:
        return {}
    counts = take()
    if not counts:
        return {}
    layers = sorted(counts)
    flat = dist_lib.all_reduce_sum(torch.cat([counts[i].double().cpu() for i in layers]).tolist())
    per_layer = torch.tensor(flat).view(len(layers), -1)  # (L, E)
    metrics = {}
    for layer, row in zip(layers, per_layer):
        mean = row.mean().item()
        metrics[f"moe/max_load/layer{layer}"] = row.max().item() / mean if mean else 0.0
        metrics[f"moe/used/layer{layer}"] = (row > 0).double().mean().item()
    metrics["moe/max_load"] = max(metrics[f"moe/max_load/layer{i}"] for i in layers)
    return metrics
