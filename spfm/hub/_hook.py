"""Register spfm's Hub classes with transformers' Auto classes without importing transformers at ``import spfm``.

``import spfm`` must stay light (transformers' Auto machinery takes seconds to import), yet after ``import spfm`` a
user's ``AutoConfig.from_pretrained`` / ``AutoModel.from_pretrained`` must know spfm's model types. So
:func:`install` puts a small finder on ``sys.meta_path`` that waits for transformers' own auto modules to be
imported and registers spfm's classes right after they finish loading:

* ``transformers.models.auto.configuration_auto`` -> the configs (``AutoConfig.register``),
* ``transformers.models.auto.modeling_auto`` -> the models (``AutoModel.register``).

If those modules are already imported, registration happens at once. Nothing here imports transformers itself.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"
_done: set[str] = set()


def _register(module_name: str) -> None:
    if module_name in _done:
        return
    _done.add(module_name)
    try:
        from spfm.hub import auto

        if module_name == _CONFIG_MODULE:
            auto.register_configs()
        else:
            auto.register_models()
    except Exception as exc:  # noqa: BLE001 -- never break the user's `import transformers` over spfm's classes
        import warnings

        _done.discard(module_name)  # spfm.hub.register_auto_classes() can try again

        warnings.warn(f"spfm could not register its Hub classes with transformers' Auto classes ({exc!r}); "
                      f"spfm.from_pretrained still works", RuntimeWarning, stacklevel=2)


class _Loader:
    """Runs the real loader, then registers spfm's classes (duck-typed: importlib.abc costs milliseconds)."""

    def __init__(self, wrapped: Any, name: str) -> None:
        self._wrapped = wrapped
        self._name = name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        _register(self._name)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._wrapped, name)


class _Finder:
    """Finds only transformers' two auto modules, through the other finders, and wraps their loaders."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in (_CONFIG_MODULE, _MODEL_MODULE) or fullname in _done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


_FINDER = _Finder()


def install() -> None:
    """Register now for auto modules already imported; otherwise when transformers imports them."""
    if not any(f is _FINDER for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)
    for name in (_CONFIG_MODULE, _MODEL_MODULE):
        if name in sys.modules:
            _register(name)
