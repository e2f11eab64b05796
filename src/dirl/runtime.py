"""Process-level choices every layer shares: the device, the CPU allocator, and every seed formula.

A leaf module. Each seed the project derives from a user's ``seed`` is computed here, so
that "which generator drew this" has one answer and two places can never disagree (the
HTTP backend and the server must seed a prompt exactly as the native engine does).
"""

from __future__ import annotations

MAX_SEED = 2**63 - 1
CPU_MMAP_THRESHOLD = 1 << 20  # bytes: glibc serves allocations from this size up by mmap
_M_MMAP_THRESHOLD = -3        # glibc's mallopt parameter number


def resolve_device(device: str):
    """``"auto"`` -> cuda when available, else cpu; anything else as given (a ``torch.device``),
    checked to exist on this machine (a :class:`~dirl.errors.UserError` naming ``device`` if not:
    ``device=cuda`` on a CPU machine fails here, not deep inside the first ``.to``)."""
    import torch

    from dirl.errors import UserError, echo

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device={echo(device)}: not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device={device}: no CUDA device on this machine; use device=cpu or auto")
        if resolved.index is not None and resolved.index >= count:
            raise UserError(f"device={device}: this machine has {count} CUDA device(s)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={device}: MPS is not available on this machine")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device={device}: unsupported device type; use auto, cpu or cuda")
    return resolved


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at ``CPU_MMAP_THRESHOLD`` for this process (CPU training).

    glibc raises its threshold to the size of each freed mmap'd block (up to 32 MB), after
    which tensors below it come from the heap, whose freed pages stay resident around live
    ones: a step that frees and allocates many 1-32 MB tensors (the attention mask chunks,
    activations recomputed by checkpointing) grew the process by hundreds of MB of freed
    memory (BENCHMARKS.md "Memory"). A fixed threshold keeps every tensor from 1 MiB up in
    its own mapping, returned to the OS when freed. -> whether it was set (False off glibc)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


# ---------------------------------------------------------------- seeds


def prompt_seed(seed: int, index: int) -> int:
    """Seed of prompt ``index`` of a request / eval set: ``seed + index``, so a prompt decodes
    the same whatever batch it lands in (engine, server, ``dirl eval``)."""
    return (seed + index) % (MAX_SEED + 1)


def prompt_seeds(seed: int, count: int, start: int = 0) -> list[int]:
    """:func:`prompt_seed` of prompts ``start .. start + count - 1``."""
    return [prompt_seed(seed, start + i) for i in range(count)]


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the data permutation of epoch ``epoch`` (SFT loader, RL prompt sampler)."""
    return seed + epoch


def row_seed(seed: int, sample_index: int) -> int:
    """Seed of one sequence's generator (sample ``sample_index`` of a prompt seeded ``seed``)."""
    return (seed * 1_000_003 + sample_index * 7919 + 12345) % MAX_SEED


def rollout_seed(run_seed: int, step: int, prompt_index: int) -> int:
    """RL: seed of dataset prompt ``prompt_index`` in step ``step``; it does not depend on the
    rank that decodes it, so a prompt gets the same rollouts under any world size."""
    return run_seed * 1_000_003 + step * 9973 + prompt_index


def update_seed(run_seed: int, step: int, rank: int) -> int:
    """RL: seed of the random estimators' generator in step ``step`` (rank 0 draws what a
    single process draws; other ranks their own stream)."""
    return run_seed * 7919 + step + 1_000_003 * rank


def derived_seed(seed: int, purpose: str) -> int:
    """A second stream from a run's seed: ``"noise"`` (SFT masks) and ``"held_out"`` (the
    generated held-out rows) use ``seed + 1``, disjoint from the data seed itself."""
    offsets = {"noise": 1, "held_out": 1}
    return seed + offsets[purpose]
