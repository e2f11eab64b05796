"""Live weight updates: parse a safetensors body, validate it, swap it in.

An update is a full or partial state dict with the model's own (SDAR) names.
Everything is checked -- every name known, every shape and dtype equal to the
live tensor's, every value finite -- before a single byte of the live model
changes, so a bad update leaves the served weights exactly as they were. The
copy itself runs on the batcher's thread between two engine calls (see
:mod:`dirl.serve.batcher`), which is what makes the swap atomic for requests.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors


class WeightUpdateError(ValueError):
    """An update that cannot be applied; ``tensor`` names the offending tensor, if any."""

    def __init__(self, message: str, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor


def live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict tensors: detached views that share storage with its parameters.

    Copying into these writes the parameters in place, so the engine (which reads
    the same parameters) sees the update with no rebuild.
    """
    return model.state_dict(keep_vars=False)


def state_dict_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Payload size of a state dict (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in tensors.values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def parse_update(body: bytes) -> dict[str, torch.Tensor]:
    """Deserialize a safetensors body (``safetensors.torch.save`` output) on the CPU."""
    if not body:
        raise WeightUpdateError("empty body: expected safetensors bytes of a state dict")
    try:
        tensors = load_safetensors(bytes(body))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise WeightUpdateError(f"body is not a valid safetensors file: {err}") from err
    if not tensors:
        raise WeightUpdateError("the safetensors file holds no tensors")
    return tensors


def validate_update(live: dict[str, torch.Tensor], update: dict[str, torch.Tensor], max_scale: float = 0.0) -> None:
    """Raise :class:`WeightUpdateError` naming the first tensor that does not fit ``live``: an
    unknown name, another shape or dtype, a NaN/inf, or (``max_scale`` > 0) a largest magnitude
    above ``max_scale`` x that of the live tensor (at least ``max_scale``): finite but absurd
    weights (3e38) turn every completion into garbage while /health says ok."""
    for name in sorted(update):
        tensor = update[name]
        if name not in live:
            raise WeightUpdateError(f"unknown tensor {name!r}: the model has no parameter of that name", name)
        target = live[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightUpdateError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                    f"the model expects {tuple(target.shape)}", name)
        if tensor.dtype != target.dtype:
            raise WeightUpdateError(f"tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                    f"the model expects {str(target.dtype).removeprefix('torch.')}", name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightUpdateError(f"tensor {name!r} holds NaN or infinite values", name)
        if max_scale > 0 and tensor.is_floating_point() and tensor.numel():
            new, old = float(tensor.abs().max()), float(target.abs().max())
            if new > max_scale * max(old, 1.0):
                raise WeightUpdateError(f"tensor {name!r} has values up to {new:.3g}, over {max_scale:g}x the "
                                        f"live weights' largest ({old:.3g}); refusing it (max_update_scale)", name)


def prepare_update(live: dict[str, torch.Tensor], body: bytes, max_scale: float = 0.0) -> dict[str, torch.Tensor]:
    """Parse + validate + move to the model's device; the result is ready to :func:`apply_update`.

    Runs on a request thread: the slow parts (parsing, checks, host-to-device
    copies) happen here, so the batcher pauses only for device-side copies.
    """
    update = parse_update(body)
    validate_update(live, update, max_scale)
    return {name: tensor.to(live[name].device) for name, tensor in update.items()}


@torch.no_grad()
def apply_update(live: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy a validated update into the live tensors (in place); returns the values it replaced
    (for :func:`restore` when the probe on the new weights fails)."""
    previous = {name: live[name].detach().clone() for name in update}
    for name, tensor in update.items():
        live[name].copy_(tensor)
    return previous


@torch.no_grad()
def restore(live: dict[str, torch.Tensor], previous: dict[str, torch.Tensor]) -> None:
    """Put back the values :func:`apply_update` replaced."""
    for name, tensor in previous.items():
        live[name].copy_(tensor)
