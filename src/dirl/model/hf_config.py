"""Faithful ``config.json`` round trips for families that keep their own field names.

A family config is a dataclass of the fields dirl reads, spelled as the family's
``config.json`` spells them (LLaDA's OLMo names, Dream's Qwen2 names). Everything else
is kept in ``extra``; a field dirl did not change is written back exactly as it was read
(``loaded`` remembers the raw value), and the keys keep their original order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

_ABSENT = object()
_NOT_HF_FIELDS = ("extra", "companion_files", "loaded", "key_order")


@dataclass
class FaithfulConfig:
    """Base of the family configs (no fields of its own in ``config.json``)."""

    MODEL_TYPE: ClassVar[str] = ""
    ARCHITECTURES: ClassVar[tuple[str, ...]] = ()
    DERIVED: ClassVar[tuple[str, ...]] = ()   # filled in on load when absent: not added on save

    extra: dict[str, Any] = field(default_factory=dict)
    companion_files: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    loaded: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False, compare=False)
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def hf_field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_HF_FIELDS]

    @classmethod
    def normalise(cls, known: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Family hook: check unsupported settings of ``data``, fill derived fields of ``known``."""
        return known

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]):
        names = cls.hf_field_names()
        known = cls.normalise({k: v for k, v in data.items() if k in names}, data)
        cfg = cls(**known, extra={k: v for k, v in data.items() if k not in names})
        record_loaded(cfg, data, names)
        cfg.key_order = tuple(data)
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """The family's own ``config.json``; unchanged fields exactly as they were read."""
        out = dict(self.extra)
        write_fields(self, out, self.hf_field_names(), self.DERIVED)
        out.setdefault("model_type", self.MODEL_TYPE)
        out.setdefault("architectures", list(self.ARCHITECTURES))
        first = [k for k in self.key_order if k in out]
        return {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}


def require(data: dict[str, Any], key: str, allowed: tuple, default: Any) -> None:
    """``config.json: <key> <value> is not supported`` unless ``data[key]`` (or its default) is allowed."""
    value = data.get(key, default)
    if value not in allowed:
        raise ValueError(f"config.json: {key} {value!r} is not supported (supported: {list(allowed)})")


def record_loaded(cfg, data: dict[str, Any], names: list[str]) -> None:
    """Remember each field's raw ``config.json`` value (or its absence) and its parsed value on ``cfg.loaded``."""
    cfg.loaded = {name: (data.get(name, _ABSENT), getattr(cfg, name)) for name in names}


def write_fields(cfg, out: dict[str, Any], names: list[str], derived: tuple[str, ...]) -> None:
    """Into ``out``: each field of ``names``, exactly as it was read when unchanged since; a changed or
    new field as it is now; a field that was absent and is ``derived`` (filled in on load) not at all."""
    for name in names:
        value = getattr(cfg, name)
        raw, parsed = cfg.loaded.get(name, (_ABSENT, _ABSENT))
        if parsed is _ABSENT or parsed != value:
            out[name] = value
        elif raw is not _ABSENT:
            out[name] = raw
        elif name not in derived:  # absent, so a default: other loaders may default otherwise
            out[name] = value


def read_ids_and_dtype(known: dict[str, Any], data: dict[str, Any], default_pad: int) -> None:
    """The fields families read alike, in ``known``: the first of a listed ``eos_token_id``; a missing or
    null ``pad_token_id`` is the EOS id (else ``default_pad``); ``torch_dtype`` from a ``dtype`` string
    (transformers >= 5's spelling) when only that is given."""
    if isinstance(known.get("eos_token_id"), list):  # some HF configs list several EOS ids
        known["eos_token_id"] = known["eos_token_id"][0]
    if known.get("pad_token_id") is None:
        known["pad_token_id"] = known.get("eos_token_id", default_pad)
    if "torch_dtype" not in known and isinstance(data.get("dtype"), str):
        known["torch_dtype"] = data["dtype"]
