"""Training: recipes (a validated YAML schema), the Accelerate loop, checkpoints and resuming.

``train(recipe, resume=..., overrides=...)`` is what ``spfm train RECIPE.yaml`` runs; under
``accelerate launch ... -m spfm.train RECIPE.yaml`` the same code runs on every process. Names load on first use
(PEP 562) so ``spfm --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "spfm.train.loop": ["NonFiniteLossError", "TrainModule", "latest_checkpoint", "train"],
    "spfm.train.recipe": ["Recipe", "apply_overrides", "load_recipe"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'spfm.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
