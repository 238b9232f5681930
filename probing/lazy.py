"""Lazy package namespaces (PEP 562): a package's public names are imported from their submodules on first use,
so ``import wordpos.circuit.cli`` (and ``wordpos --help``) does not pay for torch, transformers and scikit-learn,
while ``from wordpos.circuit import EdgeCircuit`` works as before."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any


def _namespace(clashes: set[str]) -> type[types.ModuleType]:
    class Namespace(types.ModuleType):
        def __setattr__(self, key: str, value: Any) -> None:
            if key in clashes and isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{key}" \
                    and hasattr(value, key):
                value = getattr(value, key)
            super().__setattr__(key, value)

    return Namespace


def lazy_exports(package: str, exports: dict[str, list[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]],
                                                                       list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``, whose public names are ``exports``: submodule (relative
    to the package) → the names it defines. A name is imported from its submodule when first asked for and then
    kept in the package's namespace."""
    where = {name: sub for sub, names in exports.items() for name in names}
    names = sorted(where)
    # a public name that is also a submodule's name (``circuit.faithfulness``, the function in ``faithfulness.py``):
    # importing the submodule sets the package attribute to the module, so the package swaps the export back in,
    # as ``from .faithfulness import faithfulness`` in an eager ``__init__`` did
    clashes = {name for name, sub in where.items() if name == sub.split(".")[0]}
    if clashes:
        sys.modules[package].__class__ = _namespace(clashes)

    def __getattr__(name: str) -> Any:
        sub = where.get(name)
        if sub is None:
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")  # a submodule, as an eager package had it
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{sub}"), name)
        setattr(importlib.import_module(package), name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(names) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__, names
