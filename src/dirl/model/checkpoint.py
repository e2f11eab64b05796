"""Hugging Face checkpoint directories: ``config.json`` + safetensors + tokenizer.

Safetensors only (no pickle). Above ``max_shard_bytes`` the weights are split
into ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``
(the layout of the real SDAR-8B-Chat directory). Directories are written under a
temporary name and renamed, so a crash never leaves a half-written checkpoint
where a good one was.

A save is faithful to the directory the model was loaded from, so transformers
(``trust_remote_code``), LMDeploy and SGLang load it as they load the source:
the remote-code files named by ``auto_map`` (and their relative imports) and
``generation_config.json`` are kept (:func:`companion_files`), config fields are
written back as read, tokenizer files and the chat template are kept
(:mod:`dirl.model.tokenizer`), and the weights are written in the source's
``torch_dtype`` -- a bf16 checkpoint trained in fp32 is saved in bf16 again --
unless the caller asks for another dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dirl import ownership
from dirl.errors import FieldError, UserError
from dirl.model.families import family_for_config, get_family
from dirl.model.tokenizer import Tokenizer, load_tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(UserError):
    """A checkpoint directory is missing a file or a tensor, or a tensor is mis-shaped."""


def atomic_directory(final: Path, write) -> Path:
    """Run ``write(tmp_dir)`` then rename tmp_dir to ``final`` (replacing it).

    Every file and the directory are fsynced before the rename, and the parent after it, so a
    power loss leaves the old directory or the complete new one, never a renamed, empty one.
    Half-written siblings of earlier, killed writers (``.NAME.tmp-PID``) are removed first, and
    only those dirl marked as its own (:mod:`dirl.ownership`); so is the directory written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(final.parent, final.name)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    ownership.remove_owned(tmp)
    tmp.mkdir()
    ownership.mark(tmp)  # first: a crash leaves a directory dirl knows as its own
    write(tmp)
    fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)  # keep the old one until the new one is in place
    tmp.rename(final)
    fsync_path(final.parent)
    ownership.remove_owned(old)  # one dirl did not write stays, under its .old-PID name
    return final


def fsync_enabled() -> bool:
    """``DIRL_FSYNC=0`` skips the fsyncs (the test suite sets it: ~1,300 of them cost ~9 s on a
    busy disk). The renames stay, so a killed process still leaves the old checkpoint or the new
    one; only a power loss or kernel crash could then leave a renamed, incomplete directory."""
    return os.environ.get("DIRL_FSYNC", "1") != "0"


def fsync_path(path: Path) -> None:
    """Flush one file or directory entry to disk."""
    if not fsync_enabled():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then the directories (deepest first)."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(Path(here))
        for name in files:
            fsync_path(Path(here) / name)
    for directory in reversed(dirs):
        fsync_path(directory)


_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def _other_writer_alive(pid: int) -> bool:
    """Whether ``pid`` is another live process (this process writes one directory at a time and
    cleans up only between writes, so its own leftovers are stale)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    return True


def remove_stale_tmp(directory: Path, name: str | None = None) -> list[Path]:
    """Delete ``.NAME.tmp-PID`` / ``.NAME.old-PID`` entries of finished writers in ``directory``
    (only those of ``name`` when given); returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for child in directory.iterdir():
        match = _TMP_NAME.match(child.name)
        if not match or (name is not None and match["name"] != name) or _other_writer_alive(int(match["pid"])):
            continue
        if ownership.remove_owned(child):  # a user's own file of the same name is left alone
            removed.append(child)
    return removed


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return shards + [current]


def save_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 2 << 30) -> None:
    """Write a state dict as safetensors (sharded with an index above the limit)."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                    "weight_map": weight_map}, indent=2))


def param_dtype(model) -> torch.dtype:
    """The dtype the model's parameters are held in."""
    return next(model.parameters()).dtype


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of ``model`` in ``dtype`` (eval mode; cast weights need no grad), sharing its config.

    Each weight is cast straight into the copy (deepcopy's memo), so no transient copy in the
    source precision is made, and a weight already in ``dtype`` is shared, not copied: an fp32
    model costs 2 B / param more in bf16, a bf16 model nothing. The bf16 decode copy of RL's
    native backend and the full-FT reference are such copies."""
    import copy

    memo = {id(p): p if p.dtype == dtype else torch.nn.Parameter(p.detach().to(dtype), False)
            for p in model.parameters()}
    frozen = copy.deepcopy(model, memo).to(dtype).eval()  # .to: float buffers; shared weights keep their flags
    frozen.config = model.config  # one config: a block-size change reaches the copy
    return frozen


def save_dtype(model, dtype: str | torch.dtype | None) -> torch.dtype:
    """``dtype`` if given, else the source's ``torch_dtype`` (else the parameters' dtype)."""
    if dtype is None:
        return DTYPES.get(model.config.torch_dtype, param_dtype(model))
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def save_pretrained(model: torch.nn.Module, tokenizer: Tokenizer | None, directory: str | Path,
                    max_shard_bytes: int = 2 << 30, dtype: str | torch.dtype | None = None) -> Path:
    """Atomically write a self-contained, faithful checkpoint directory (module docstring).

    ``dtype``: of the saved weights; None = the source's ``torch_dtype``. Pass the
    parameters' dtype (:func:`param_dtype`) where the weights must round-trip exactly.
    """
    return atomic_directory(Path(directory), lambda tmp: write_checkpoint(model, tokenizer, tmp, max_shard_bytes,
                                                                          dtype))


def write_checkpoint(model: torch.nn.Module, tokenizer: Tokenizer | None, directory: Path,
                     max_shard_bytes: int = 2 << 30, dtype: str | torch.dtype | None = None) -> None:
    """Write the checkpoint files into the existing ``directory`` (:func:`save_pretrained` without
    the atomic rename; the Hugging Face class's ``save_pretrained`` uses it as is)."""
    target = save_dtype(model, dtype)
    state = {name: tensor.to(target) if tensor.is_floating_point() else tensor
             for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, content in model.config.companion_files.items():
        (directory / name).write_bytes(content)
    cfg = dataclasses.replace(model.config, torch_dtype=str(target).removeprefix("torch.")).to_hf_dict()
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_weights(state, directory, max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save(directory)


GENERATION_CONFIG = "generation_config.json"


def _auto_map_modules(auto_map: dict) -> set[str]:
    """Module names of local remote code in an ``auto_map`` (``"modeling_sdar.SDARModel"``,
    or a list of such for tokenizers); references into another repo (``"org/repo--m.C"``) are skipped."""
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    return {ref.rsplit(".", 1)[0] for ref in refs if "--" not in ref and "." in ref}


def companion_files(directory: Path, config: dict) -> dict[str, bytes]:
    """The files of a checkpoint directory that dirl does not own but must keep: the remote-code
    files named by ``auto_map`` in ``config.json`` / ``tokenizer_config.json`` with their relative
    imports, and ``generation_config.json``. Named files that are absent are skipped."""
    from transformers.dynamic_module_utils import get_relative_import_files

    auto_map = dict(config.get("auto_map") or {})
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.exists():
        auto_map.update({f"tokenizer:{k}": v for k, v in
                         (json.loads(tokenizer_config.read_text()).get("auto_map") or {}).items()})
    paths = [directory / GENERATION_CONFIG]
    for module in sorted(_auto_map_modules(auto_map)):
        code = directory / f"{module}.py"
        if code.exists():
            paths += [code, *map(Path, get_relative_import_files(str(code)))]
    return {p.name: p.read_bytes() for p in paths if p.exists()}


def load_config(directory: str | Path):
    """The config of a checkpoint directory -- its family's config record, the family picked
    from ``config.json`` (:func:`~dirl.model.families.family_for_config`) -- carrying its
    :func:`companion_files`."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.exists() and (directory / "adapter_config.json").exists():
        raise CheckpointError(f"{directory}: holds LoRA adapters, not a model; `dirl merge {directory} --out DIR` "
                              "writes the full checkpoint")
    if not path.exists():
        raise CheckpointError(f"{path}: not found (is {directory} a checkpoint directory?)")
    try:
        data = json.loads(path.read_text())
        cfg = family_for_config(data).config_cls.from_hf_dict(data)
    except FieldError as err:  # an unknown model_type: one line naming it
        raise CheckpointError(f"{path}: {err}") from err
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as err:  # incl. UnicodeDecodeError
        raise CheckpointError(f"{path}: {err!r}") from err
    cfg.companion_files = companion_files(directory, data)
    return cfg


def weight_files(directory: Path) -> dict[str, str]:
    """tensor name -> file name, from the index or the single file."""
    if (directory / INDEX_FILE).exists():
        try:
            return json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{directory / INDEX_FILE}: not a safetensors index ({err!r})") from err
    single = directory / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with _open_safetensors(single) as f:
        return {name: SINGLE_FILE for name in f.keys()}


@contextlib.contextmanager
def _open_safetensors(path: Path):
    """``safe_open`` whose errors (a truncated or corrupt file) name the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err}); is it truncated?") from err


def load_state_into(model: torch.nn.Module, directory: Path) -> None:
    """Copy every tensor of the directory into ``model``, validating names and shapes first."""
    expected = model.state_dict()
    if getattr(model, "config", None) is not None and model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    files = weight_files(directory)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor(s) {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    for fname in sorted(set(files.values())):
        path = directory / fname
        try:
            ownership.inside(path, directory, f"{directory / INDEX_FILE}")
        except UserError as err:
            raise CheckpointError(str(err)) from None
        if not path.exists():
            raise CheckpointError(f"{path}: shard listed in the index is missing")
        with _open_safetensors(path) as f:
            names = list(f.keys())
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name].shape):
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, "
                                          f"the model expects {tuple(expected[name].shape)}")
        for name in names:
            # One mapping per tensor: the file's pages read so far leave the RSS on close. A shard
            # mapped for the whole loop held its size again (~1x the weights) at the load's peak.
            with _open_safetensors(path) as f, torch.no_grad():
                expected[name].copy_(f.get_tensor(name))


def build_model(cfg) -> torch.nn.Module:
    """The family's model for config ``cfg`` (weights uninitialised unless the caller does so)."""
    return get_family(cfg.arch.family).model_cls(cfg)


def load_model(cfg, directory: Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """A model of config ``cfg`` (its family's class) holding the weights of ``directory`` (validated)."""
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = build_model(cfg)
    if dtype is not None:
        model = model.to(dtype)  # on meta: allocated once, in dtype, by to_empty
    model = model.to_empty(device=device)
    load_state_into(model, directory)
    model.tie_weights()  # to_empty untied a tied lm_head
    return model


def load_pretrained(directory: str | Path, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu", with_tokenizer: bool = True):
    """Load ``(model, tokenizer)`` from a checkpoint directory (tokenizer None if absent)."""
    directory = Path(directory)
    model = load_model(load_config(directory), directory, dtype, device)
    tokenizer = None
    if with_tokenizer and any((directory / f).exists() for f in ("tokenizer.json", "vocab.json")):
        try:
            tokenizer = load_tokenizer(directory)
        except Exception as err:  # noqa: BLE001 -- tokenizers/transformers raise many types for a bad file
            raise CheckpointError(f"{directory}: cannot read the tokenizer files ({err!r})") from err
        check_tokenizer(model.arch, tokenizer, directory)
    return model, tokenizer


def check_tokenizer(cfg, tokenizer: Tokenizer, directory: Path) -> None:
    """The tokenizer and ``config.json`` (``cfg``: the model's :class:`~dirl.model.arch.Arch`)
    must agree: the same mask id (SFT would mask with one and the engine decode with the other),
    and every id the tokenizer can emit (its special ids included) inside the model's vocabulary
    (else an IndexError deep in the embedding)."""
    if tokenizer.mask_token_id != cfg.mask_token_id:
        raise CheckpointError(f"{directory}: the tokenizer's mask id {tokenizer.mask_token_id} differs from "
                              f"config.json's mask_token_id {cfg.mask_token_id}")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids, more than the model's "
                              f"vocabulary of {cfg.vocab_size} (config.json vocab_size)")
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and not 0 <= value < cfg.vocab_size:
            raise CheckpointError(f"{directory}: the tokenizer's {name} {value} is outside the model's vocabulary "
                                  f"of {cfg.vocab_size}")
