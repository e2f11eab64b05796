"""Training checkpoints and resume (DESIGN §10).

Layout of a run directory::

    run_dir/checkpoints/step-000100/   an HF model directory (config.json,
                                        model.safetensors, tokenizer files) that
                                        ``load_pretrained`` reads as is, plus
        trainer_state.pt                optimizer, scheduler, step, RNG states,
                                        ``extra`` (data cursor, counters ...)
        config.yaml                     the resolved run config
    run_dir/checkpoints/latest          text file naming the newest checkpoint

A LoRA run (``lora.r > 0``) writes the adapters instead of the model weights:
``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format, the base
named in ``base_model_name_or_path``) beside the tokenizer files; resuming loads
the base from the run's ``model`` and the adapters from the checkpoint. Model
weights are saved in the training dtype here (exact resume); ``final/`` in the
source's ``torch_dtype`` (:func:`dirl.model.checkpoint.save_pretrained`).

A checkpoint directory is written under a temporary name and renamed
(:func:`dirl.model.checkpoint.atomic_directory`); ``latest`` is replaced with
``os.replace`` only after the directory is in place. A kill at any moment thus
leaves the previous good checkpoint and a ``latest`` that names a complete one.
``trainer_state.pt`` holds tensors, primitives and containers only and is read
with ``torch.load(weights_only=True)``: no pickled code is ever executed.

Under torchrun, saving is a collective (a sharded model's full weights and
optimizer state are gathered to rank 0) and only rank 0 writes; the files are
the same as a single-process run's -- full tensors, the optimizer in the plain
``optimizer.state_dict()`` layout -- so a checkpoint resumes on any world size.
Every rank reads the checkpoint when resuming (a filesystem shared by the nodes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import yaml

from dirl import config as config_lib
from dirl import ownership
from dirl.model import lora as lora_lib
from dirl.model.checkpoint import (CheckpointError, atomic_directory, fsync_path, load_state_into, param_dtype,
                                   remove_stale_tmp, save_pretrained)
from dirl.train import dist as dist_lib

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary ``.step-*`` dirs are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _config_text(config_obj) -> str:
    if config_obj is None:
        return ""
    if dataclasses.is_dataclass(config_obj):
        return config_lib.dump(config_obj)
    return yaml.safe_dump(config_obj, sort_keys=False)


class _FullWeights:
    """What :func:`save_pretrained` / :func:`load_state_into` read from a model (``config``,
    ``state_dict()``, ``parameters()``), over a full state dict of a sharded model."""

    def __init__(self, config, tensors: dict[str, torch.Tensor]):
        self.config, self.tensors = config, tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)  # a copy: the readers pop tied weights from it

    def parameters(self):
        return iter(self.tensors.values())


def _weights_to_save(model):
    """A plain model to save as is, or (sharded) its gathered full weights; a collective when
    sharded, and None on ranks other than 0."""
    if not dist_lib.is_sharded(model):
        return dist_lib.unwrap(model)
    full = dist_lib.gather_full_state(model)
    return _FullWeights(model.config, full) if full is not None else None


def _write_model(weights, tokenizer, directory: Path, dtype=None) -> None:
    """A model directory, or for a LoRA model its adapters in PEFT's format (the frozen base
    stays where ``adapter_config.json`` says) with the tokenizer."""
    if not lora_lib.has_adapters(weights):
        save_pretrained(weights, tokenizer, directory, dtype=dtype)
        return
    lora_lib.save_adapter(weights, directory)
    if tokenizer is not None:
        tokenizer.save(directory)


def save_model_dir(model, tokenizer, directory: str | Path) -> Path:
    """:func:`save_pretrained` for any world size: gathered if sharded, written by rank 0 only."""
    weights = _weights_to_save(model)
    if dist_lib.is_main():
        atomic_directory(Path(directory), lambda tmp: _write_model(weights, tokenizer, tmp))
    dist_lib.barrier()
    return Path(directory)


@dataclasses.dataclass
class Trainable:
    """What a checkpoint holds besides the run's own state: the (wrapped) model, its tokenizer,
    the optimizer and the schedule (either may be None)."""

    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer | None
    scheduler: object | None


def save_checkpoint(run_dir: str | Path, step: int, trainable: Trainable, extra: dict | None, config_obj,
                    keep_last: int | None = 3) -> Path:
    """Atomically write checkpoint ``step``, point ``latest`` at it, prune old ones.

    ``extra`` must hold only tensors / primitives / containers (it is loaded with
    ``weights_only=True``). ``keep_last=None`` keeps every checkpoint. Under
    torchrun every rank calls it; rank 0 writes.
    """
    model, tokenizer, optimizer, scheduler = (trainable.model, trainable.tokenizer, trainable.optimizer,
                                              trainable.scheduler)
    weights = _weights_to_save(model)
    optimizer_state = dist_lib.gather_full_optim_state(model, optimizer) if optimizer is not None else None
    final = checkpoint_dir(run_dir, step)
    if dist_lib.is_main():
        trainer_state = {
            "step": int(step),
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": get_rng_state(),
            "extra": dict(extra or {}),
        }
        config_text = _config_text(config_obj)

        def write(tmp: Path) -> None:
            # The training dtype, not the source's: resume continues bit for bit.
            _write_model(weights, tokenizer, tmp, dtype=param_dtype(weights))
            torch.save(trainer_state, tmp / TRAINER_STATE)
            if config_text:
                (tmp / CONFIG_FILE).write_text(config_text)

        final = atomic_directory(final, write)
        _write_latest(final)
        if keep_last is not None:
            prune_checkpoints(run_dir, keep_last, protect=final)
    dist_lib.barrier()  # nobody reads the checkpoint before it is complete
    return final


def _write_latest(final: Path) -> None:
    latest = final.parent / LATEST
    tmp = latest.with_name(f".{LATEST}.tmp-{os.getpid()}")
    tmp.write_text(final.name + "\n")
    fsync_path(tmp)
    os.replace(tmp, latest)
    fsync_path(latest.parent)


def prune_checkpoints(run_dir: str | Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (never ``protect``)."""
    checkpoints = list_checkpoints(run_dir)
    doomed = [path for _, path in checkpoints[: max(0, len(checkpoints) - max(1, keep_last))]]
    doomed = [p for p in doomed if protect is None or p.resolve() != Path(protect).resolve()]
    for path in doomed:
        ownership.remove_owned(path)  # a checkpoint dirl wrote (marked), never through a symlink
    remove_stale_tmp(Path(run_dir) / CHECKPOINTS)  # half-written dirs of earlier, killed saves
    return doomed


RUN_MARKERS = (CONFIG_FILE, "metrics.jsonl", CHECKPOINTS, "final")


def prepare_run_dir(run_dir: str | Path, resumed: bool, overwrite: bool, inputs=()) -> Path:
    """Before anything is loaded: refuse a fresh run in a directory holding a run or anything
    else (unless ``overwrite``, which deletes the checkpoints and final model dirl wrote there), in
    a file, or overlapping an input (``inputs``: the model, the data); refuse ``checkpoints/`` or
    ``final/`` as symlinks (writes would land outside the run); remove the temporary directories of
    killed writers. Every rank checks (so all raise alike); rank 0 deletes."""
    run_dir = Path(run_dir)
    held = [name for name in RUN_MARKERS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    if held and not resumed and not overwrite:
        raise CheckpointError(f"out={run_dir}: already holds a run ({', '.join(held)}); continue it with "
                              f"--resume {run_dir}, or pass overwrite=true to replace it")
    if not resumed:
        if str(run_dir) == ".":  # out="" would write the run into the working directory
            raise CheckpointError("out is empty (or '.'); name the run directory")
        ownership.check_output(run_dir, inputs=inputs, overwrite=overwrite, key="out")
    for name in (CHECKPOINTS, "final"):
        if (run_dir / name).is_symlink():
            raise CheckpointError(f"out={run_dir}: {name} is a symlink; dirl does not write through it")
    if dist_lib.is_main():
        if held and not resumed:
            _clear_run(run_dir)
        for directory in (run_dir, run_dir / CHECKPOINTS):
            remove_stale_tmp(directory)
    return run_dir


def _clear_run(run_dir: Path) -> None:
    """``overwrite=true``: delete the checkpoints and final model dirl wrote (marked), nothing else."""
    ownership.remove_owned(run_dir / "final")
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for child in checkpoints.iterdir():
            if child.name == LATEST and child.is_file() and not child.is_symlink():
                child.unlink()
            else:
                ownership.remove_owned(child)
        with contextlib.suppress(OSError):
            checkpoints.rmdir()  # only when nothing else is left


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint dir -> itself; a run dir (or its ``checkpoints/``) -> its newest checkpoint.

    ``latest`` is trusted when it names a complete checkpoint; otherwise (a crash
    between the rename and the ``latest`` update, or a hand-deleted dir) the newest
    complete ``step-*`` directory is used.
    """
    path = Path(path)
    if (path / TRAINER_STATE).exists():
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    if not path.exists():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    latest = run_dir / CHECKPOINTS / LATEST
    if latest.is_file():
        named = latest.parent / latest.read_text(errors="replace").strip()[:200]
        ownership.inside(named, latest.parent, str(latest))  # a crafted latest must not lead out of the run
        if (named / TRAINER_STATE).exists():
            return named
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointError(f"cannot resume: {path} is neither a checkpoint (no {TRAINER_STATE}) "
                              f"nor a run directory with complete checkpoints under {CHECKPOINTS}/")
    return checkpoints[-1][1]


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> dict:
    """Restore weights (in place), optimizer, scheduler and RNG states from a checkpoint.

    Returns the trainer state dict (``step``, ``extra``, ...). Call it after the
    model, optimizer and scheduler are built, so nothing consumes RNG afterwards.
    """
    path = resolve_resume(path)
    state_file = path / TRAINER_STATE
    try:
        # Under torchrun every rank reads the file: memory-map it, so the ranks of a node share
        # one copy of the (large) optimizer state in the page cache.
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=dist_lib.is_distributed())
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{state_file}: cannot read trainer state: {err}") from err
    _load_weights(model, path)
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"{state_file}: holds no optimizer state")
        dist_lib.load_full_optim_state(model, optimizer, state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    state["path"] = str(path)
    return state


def _load_weights(model, path: Path) -> None:
    """Checkpoint weights into a plain, DDP or sharded model (validated names and shapes)."""
    if lora_lib.has_adapters(dist_lib.unwrap(model)):
        try:
            lora_lib.load_adapter_weights(dist_lib.unwrap(model), path)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        return
    if not dist_lib.is_sharded(model):
        load_state_into(dist_lib.unwrap(model), path)
        return
    view = _FullWeights(model.config, {name: torch.empty(t.shape, dtype=t.dtype)
                                       for name, t in model.state_dict().items()})
    load_state_into(view, path)
    if model.config.tie_word_embeddings:  # not stored: it is the embedding
        view.tensors["lm_head.weight"] = view.tensors["model.embed_tokens.weight"]
    dist_lib.load_full_state(model, view.tensors)


# ---------------------------------------------------------------- RNG


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_rng_state() -> dict:
    """Every RNG the trainers touch, as tensors / primitives (``weights_only`` loadable)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_internal), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
