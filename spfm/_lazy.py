"""Lazy package exports (PEP 562): names resolve to their modules on first use.

``spfm --help`` and ``import spfm.data`` must not import torch, transformers or one head's dependencies for
another's; each package lists what it exports and where, and :func:`lazy_exports` does the rest.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` exporting ``{module: [names]}``.

    Use at the end of a package's ``__init__``::

        __getattr__, __dir__, __all__ = lazy_exports(__name__, {"spfm.data.hest": ["read_sample"]})

    A resolved name is cached in the package's namespace, so the module-level ``__getattr__`` runs once per name.
    """
    where = {name: module for module, names in exports.items() for name in names}
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__, sorted(where)
