"""torch.distributed for the trainers: process group, FSDP2 / DDP wrapping, collectives, full state.

Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the env), a
trainer calls :func:`init_from_env` first; a plain ``python``/``dirl`` run (no
env, or ``WORLD_SIZE=1``) never creates a process group and every helper here
is then the identity -- which is what keeps single-process training
bit-for-bit unchanged.

Strategies (``dist.strategy``):

* ``fsdp`` (default) -- FSDP2 ``fully_shard`` on every decoder layer and on the
  root: parameters, gradients and AdamW moments are sharded over the ranks.
  Works on CPU with gloo in torch 2.13 (forward, backward, reduce-scatter,
  ``clip_grad_norm_`` over DTensors, full state dicts -- tested).
* ``ddp`` -- ``DistributedDataParallel`` (every rank holds the whole model).
* ``none`` -- single process only.

Gradient convention: DDP and FSDP2 *average* gradients over the ranks. The
trainers normalise every loss by a *global* count (samples, tokens or
sequences of the whole global batch) and scale each rank's loss by the world
size, so the average is the gradient of the global-batch loss: 2 ranks × half
a batch give the same update as 1 rank × the whole batch.

Decoding on sharded weights: the engine runs many forwards whose number
differs from rank to rank, so per-layer all-gathers would deadlock.
:func:`full_params` all-gathers every layer once (a collective all ranks enter
together), keeps the full weights while the local forwards run, and reshards on
exit; the memory cost is one full copy of the weights per rank for that time.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("fsdp", "ddp", "none")


@dataclass
class DistConfig:
    """Used only when launched by torchrun with more than one process."""

    strategy: str = "fsdp"            # fsdp (FSDP2 fully_shard) | ddp | none (single process only)
    backend: str = "auto"             # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800             # collective timeout (rank 0 evaluates alone while the others wait)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"dist.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"dist.backend must be auto, nccl or gloo, got {self.backend!r}")


# ---------------------------------------------------------------- process group


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's global rank (the torchrun env's before init / after teardown)."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if _env_world() > 1 else 0


def is_main() -> bool:
    """Rank 0: the only rank that logs and writes files."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA means this process's GPU (``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and _env_world() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_from_env(cfg: DistConfig, device: torch.device) -> bool:
    """Create the process group from the torchrun env; True if this call created it.

    No-op (False) for single-process runs and when a group already exists.
    """
    if _env_world() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if cfg.strategy == "none":
        raise ValueError(f"dist.strategy=none cannot run on {_env_world()} processes; use fsdp or ddp")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def teardown() -> None:
    """Release what holds the process group, wait for every rank, then destroy the group.

    Order matters for a clean exit (the flaky "terminate called without an active
    exception" at shutdown): FSDP2 / DDP modules keep references to the group, so the
    caller's run objects must already be out of scope; ``gc.collect()`` frees their
    reference cycles here, while the interpreter and every peer are alive. The barrier
    keeps any rank from closing its connections while another still runs a collective.
    ``destroy_process_group`` then drops the last reference and the gloo/NCCL backend
    joins its worker threads now, in this thread, instead of during interpreter
    finalization (where a worker's pending work can no longer take the GIL).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


@contextlib.contextmanager
def process_group(cfg: DistConfig, device: torch.device):
    """The process group of a run launched by torchrun: created on entry (a no-op for a single
    process or when a group exists already) and torn down on exit by :func:`teardown` if this
    call created it. The body must keep no model / optimizer reference past its end."""
    created = init_from_env(cfg, local_device(device))
    try:
        yield
    except BaseException:
        # A failing rank must not wait at a barrier the others never reach: torchrun ends them.
        if created:
            dist.destroy_process_group()
        raise
    if created:
        teardown()


# ---------------------------------------------------------------- collectives (identity on one rank)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the ranks (fp64); the list itself on one rank."""
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` on one rank). For small metadata only."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_positions(count: int) -> list[int]:
    """This rank's share of ``count`` items, interleaved (item j goes to rank j % world)."""
    return list(range(rank(), count, world_size()))


# ---------------------------------------------------------------- wrapping


class _DDP(DistributedDataParallel):
    """DDP that forwards unknown attributes (``config``, ``attn_impl`` ...) to the wrapped model,
    so loss code reads ``model.config`` whatever the wrapper."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def wrap(model: torch.nn.Module, strategy: str, device: torch.device, trainable: bool = True,
         mp_policy=None) -> torch.nn.Module:
    """The model as trained under ``strategy``; unchanged on one rank.

    ``trainable=False`` (a frozen reference): sharded under fsdp, left whole under ddp.
    ``mp_policy``: FSDP2's ``MixedPrecisionPolicy`` (bf16-mixed, :mod:`dirl.train.precision`);
    ignored by ddp, whose forwards run under autocast instead.
    """
    if not is_distributed() or strategy == "none":
        return model
    if strategy == "ddp":
        if not trainable:
            return model
        # The model has no buffers to sync, and every DDP forward is matched across the ranks
        # (no-grad forwards -- decoding, scoring -- go to the unwrapped module).
        return _DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    policy = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in model.decoder_layers():
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, **policy)
    # The root's own weights (embeddings, final norm, lm_head) are needed again at
    # once by backward: keep them gathered after forward (FSDP2's usual choice) --
    # which is also what lets the chunked head read the full lm_head weight after
    # the forward (dirl.model.lm_head.head_logprobs).
    return fully_shard(model, mesh=mesh, reshard_after_forward=False, **policy)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model module itself (DDP's ``.module``; an FSDP2 module is its own)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _fsdp_modules(model: torch.nn.Module | None) -> list:
    if model is None or not is_distributed():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(_fsdp_modules(model))


@contextlib.contextmanager
def full_params(model: torch.nn.Module | None):
    """Hold the full (unsharded) weights of an FSDP2 ``model`` inside the block.

    Every rank must enter together (one all-gather per layer); inside, each rank
    may run any number of local forwards (decoding, no-grad scoring, eval). A
    no-op for DDP and single-process models.
    """
    modules = _fsdp_modules(model)
    layers = [m for m in modules if m is not model]  # the root never reshards after forward (see wrap)
    for module in modules:
        module.unshard()
    for layer in layers:  # forwards must not reshard (and so re-gather) inside the block
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
        for module in modules:
            module.reshard()


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-batches."""
    if enabled or not is_distributed():
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ---------------------------------------------------------------- full (unsharded) state


def _full_options(cpu_offload: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def gather_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full model state dict of a sharded model on rank 0 (None elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    return state if is_main() else None


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes it) into a sharded model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options(cpu_offload=False))


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (its plain state-dict ids)."""
    name_of = {id(p): name for name, p in unwrap(model).named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_full_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer state in the plain ``optimizer.state_dict()`` layout (integer ids, full tensors),
    so a checkpoint loads on any world size. Rank 0 gets it (None elsewhere); a collective when sharded."""
    if not is_sharded(model):
        return optimizer.state_dict() if is_main() else None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not is_main():
        return None
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {"state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                             for group in full["param_groups"]]}


def load_full_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`gather_full_optim_state` (every rank passes the plain state)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    full = {"state": {names[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                             for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=_full_options(cpu_offload=False))
