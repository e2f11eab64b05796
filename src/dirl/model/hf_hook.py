"""Register dirl's model families with transformers' auto classes when ``dirl`` is imported.

``import dirl`` must stay fast (the CLI), so it does not import transformers: if transformers'
auto-config / auto-model modules are loaded already, the families are registered at once;
otherwise a one-shot import hook registers them right after those modules are first executed
(:mod:`dirl.model.hf` builds the classes). This module imports only the standard library.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODELING_MODULE = "transformers.models.auto.modeling_auto"


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`dirl.model.hf.register` right after transformers' auto-config (configs only) or auto-model
    module (configs and models) is first imported."""

    def __init__(self, pending: set[str]):
        self.pending = pending

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = _find_without(self, fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        models = fullname == _MODELING_MODULE

        def exec_then_register(module):
            exec_module(module)
            _register(models)

        spec.loader.exec_module = exec_then_register
        return spec


def _find_without(finder, fullname: str):
    """The spec the other finders give ``fullname`` (its parent package is imported already)."""
    parent = sys.modules[fullname.rpartition(".")[0]]
    for other in sys.meta_path:
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec = other.find_spec(fullname, parent.__path__)
        if spec is not None:
            return spec
    return None


def _register(models: bool) -> None:
    """:func:`dirl.model.hf.register`; a failure warns instead of breaking the user's import."""
    try:
        importlib.import_module("dirl.model.hf").register(models=models)
    except Exception as err:  # noqa: BLE001 -- never break `import transformers` for a dirl problem
        warnings.warn(f"dirl: could not register its model classes with transformers ({err!r})", stacklevel=2)


def install_import_hook() -> None:
    """Register now what transformers has loaded, and the rest as soon as it is loaded."""
    if any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        return
    if _MODELING_MODULE in sys.modules:
        _register(models=True)
        return
    pending = {_MODELING_MODULE}
    if _CONFIG_MODULE in sys.modules:
        _register(models=False)
    else:
        pending.add(_CONFIG_MODULE)
    sys.meta_path.insert(0, _RegisterOnImport(pending))
