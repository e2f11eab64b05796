"""Configs: nested dataclasses, YAML recipes and dotted ``key=value`` overrides.

The dataclasses are the single source of truth (defaults live there); a YAML
recipe sets only what differs; overrides on the command line are parsed and
type-checked against the field types. An unknown key or a badly typed value is
a :class:`ConfigError` that names the key (and suggests the closest one).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dirl.errors import FieldError, UserError, echo

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override names an unknown key or gives a bad value."""


# A YAML document may hold at most this many nodes once its aliases are expanded: a 323-byte
# alias bomb expands to hundreds of millions, and every later walk (checks, echo) would pay that.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64
MAX_CONFIG_BYTES = 1 << 20


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with bounded work: the alias-expanded node count and the nesting depth
    are capped, and every parse failure (a 5000-digit int, a lone surrogate) is a ConfigError
    naming ``where``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_size(node, where)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(err).split())[:300]}") from None
    finally:
        loader.dispose()


def _check_yaml_size(root, where: str) -> None:
    """Count the nodes of the composed graph with its aliases expanded (memoised per node)."""
    sizes: dict[int, int] = {}
    stack = [(root, 0, False)]
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise ConfigError(f"{where}: YAML expands to more than {MAX_YAML_NODES:,} values "
                                  "(aliases of aliases?); refusing it")
        elif id(node) not in sizes:
            stack.append((node, depth, True))
            stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def _yaml_value(raw: str, key: str) -> Any:
    return parse_yaml(raw, f"{key}={echo(raw)}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, choices) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(choices), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {echo(key)}{hint}; valid keys here: {', '.join(sorted(choices))}")


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Check / convert ``value`` to ``typ``; strings from the command line are parsed as YAML."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {echo(value)} does not fit {typ}")
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key}: {echo(value)} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _yaml_value(value, key) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {echo(value)}")
        (inner,) = typing.get_args(typ)[:1] or (Any,)
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {echo(value)}")
        return dict(value)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {typ.__name__}, got {echo(value)}")
        return from_dict(typ, value, prefix=f"{key}.")
    return _coerce_scalar(value, typ, key)


def _coerce_scalar(value: Any, typ: type, key: str) -> Any:
    if isinstance(value, str) and typ is not str:
        value = _yaml_value(value, key)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{key}: {echo(value)} is too large for a float") from None
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"{key}: expected {typ.__name__}, got {echo(value)}")


def _section_default(cls: type, name: str) -> dict[str, Any] | None:
    """The default of section ``name`` of ``cls`` as a dict (None: no dataclass default). A
    section's default may differ from its class's (``RolloutConfig.sampling`` is not
    ``SamplingSpec()``), and a partial section must keep the fields it does not name."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return to_dict(default) if dataclasses.is_dataclass(default) else None


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _moved(cls: type, dotted: str, prefix: str) -> str | None:
    """The new name of a key that a release renamed (``cls.moved_keys``: old dotted -> new), after
    telling the user once on stderr; None if ``dotted`` was not renamed."""
    new = getattr(cls, "moved_keys", {}).get(dotted)
    if new is not None:
        print(f"dirl: config key {prefix}{dotted} is now {prefix}{new}; read as such", file=sys.stderr)
    return new


def _parent(data: dict[str, Any], dotted: str) -> tuple[dict | None, str]:
    """The mapping that holds dotted ``key`` in nested ``data`` (None: not there), and its last part."""
    *parents, last = dotted.split(".")
    node = data
    for name in parents:
        node = node.get(name) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) and last in node else None), last


def migrate(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``data`` with the renamed keys of ``cls.moved_keys`` (and of its sections' classes) at their
    new places, so a recipe or a saved run (``--resume``) written before a rename still loads. A
    key set under both names keeps the new one. ``data`` itself is left as it was."""
    out = data
    for old in getattr(cls, "moved_keys", {}):
        if _parent(out, old)[0] is None:
            continue
        if out is data:
            out = copy.deepcopy(data)
        node, last = _parent(out, old)
        value = node.pop(last)
        *parents, new_last = _moved(cls, old, prefix).split(".")
        target = out
        for name in parents:
            target = target.setdefault(name, {})
        target.setdefault(new_last, value)
    for key, typ in _field_types(cls).items():
        if dataclasses.is_dataclass(typ) and isinstance(out.get(key), dict):
            section = migrate(typ, out[key], f"{prefix}{key}.")
            if section is not out[key]:
                out = {**out, key: section}
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (partial) nested dict; defaults fill the rest (a partial
    section keeps its field's default values for the keys it leaves out)."""
    types_ = _field_types(cls)
    if not prefix:  # the whole tree at once (a section's renames are its class's moved_keys)
        data = migrate(cls, data)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown(prefix + key, types_)
        if dataclasses.is_dataclass(types_[key]) and isinstance(value, dict):
            base = _section_default(cls, key)
            value = _merged(base, value) if base is not None else value
        kwargs[key] = coerce(value, types_[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except FieldError as err:
        raise ConfigError(f"{prefix}{err.key} {err.message}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def to_dict(obj: Any) -> Any:
    """A dataclass as plain nested dicts (YAML / JSON ready)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_override(data: dict[str, Any], cls: type, key: str, raw: str) -> None:
    """Set dotted ``key`` to the string ``raw`` in nested ``data``, checking it exists in ``cls``."""
    parts = key.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        renamed = _moved(node_cls, ".".join(parts[i:]), ".".join(parts[:i] + [""]))
        if renamed is not None:
            parts[i:] = renamed.split(".")
            part = parts[i]
        types_ = _field_types(node_cls)
        if part not in types_:
            raise _unknown(".".join(parts[: i + 1]), types_)
        typ = types_[part]
        if i == len(parts) - 1:
            node[part] = coerce(raw, typ, key)
            if dataclasses.is_dataclass(node[part]):
                node[part] = to_dict(node[part])
            return
        if typing.get_origin(typ) is dict:  # free-form mapping: the rest of the key is a sub-key
            sub = node.setdefault(part, {})
            sub[".".join(parts[i + 1:])] = _yaml_value(raw, key)
            return
        if not dataclasses.is_dataclass(typ):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section: cannot set {key!r}")
        node = node.setdefault(part, {})
        node_cls = typ


def _read_yaml(cls: type, path: str | Path) -> dict[str, Any]:
    """A YAML recipe as a plain dict, validated against ``cls`` (naming a bad key)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} not found")
    if not path.is_file():
        raise ConfigError(f"--config {path}: not a file (a directory?); pass a YAML file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {path}: {path.stat().st_size:,} bytes, more than a config's "
                          f"{MAX_CONFIG_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config ({' '.join(str(err).split())[:200]})") from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data = migrate(cls, data)
    from_dict(cls, data, prefix="")  # validates the file, naming the bad key
    return data


def _apply_overrides(data: dict[str, Any], cls: type, overrides) -> None:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {echo(item)} must look like key=value")
        key, raw = item.split("=", 1)
        apply_override(data, cls, key.strip(), raw)


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Resolve a config: dataclass defaults <- YAML file <- ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = to_dict(from_dict(cls, _read_yaml(cls, path)))
    _apply_overrides(data, cls, overrides)
    return from_dict(cls, data)


def load_on_top(cls: type[T], base: T, path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> tuple[T, list[str]]:
    """A resumed run's config: ``base`` (the saved one) <- the YAML file's keys <- overrides.

    Returns the config and what changed, as ``key: old -> new`` lines."""
    data = to_dict(base)
    if path is not None:
        data = _merged(data, _read_yaml(cls, path))
    _apply_overrides(data, cls, overrides)
    cfg = from_dict(cls, data)
    before, after = _flatten(to_dict(base)), _flatten(to_dict(cfg))
    changes = [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
               if before.get(key) != after.get(key)]
    return cfg, changes


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def dump(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
