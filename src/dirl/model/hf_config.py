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
        cfg.loaded = {name: (data.get(name, _ABSENT), getattr(cfg, name)) for name in names}
        cfg.key_order = tuple(data)
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """The family's own ``config.json``; unchanged fields exactly as they were read."""
        out = dict(self.extra)
        for name in self.hf_field_names():
            value = getattr(self, name)
            raw, parsed = self.loaded.get(name, (_ABSENT, _ABSENT))
            if parsed is _ABSENT or parsed != value:
                out[name] = value
            elif raw is not _ABSENT:
                out[name] = raw
            elif name not in self.DERIVED:
                out[name] = value
        out.setdefault("model_type", self.MODEL_TYPE)
        out.setdefault("architectures", list(self.ARCHITECTURES))
        first = [k for k in self.key_order if k in out]
        return {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}


def require(data: dict[str, Any], key: str, allowed: tuple, default: Any) -> None:
    """``config.json: <key> <value> is not supported`` unless ``data[key]`` (or its default) is allowed."""
    value = data.get(key, default)
    if value not in allowed:
        raise ValueError(f"config.json: {key} {value!r} is not supported (supported: {list(allowed)})")
