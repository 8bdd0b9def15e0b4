"""Training: recipes (a validated YAML schema), the Accelerate loop, checkpoints and resuming.

``train(recipe, resume=..., overrides=...)`` is what ``spfm train RECIPE.yaml`` runs; under
``accelerate launch ... -m spfm.train RECIPE.yaml`` the same code runs on every process. Names load on first use
(PEP 562) so ``spfm --help`` does not import torch.
"""

from __future__ import annotations

from spfm._lazy import lazy_exports

_EXPORTS = {
    "spfm.train.loop": ["NonFiniteLossError", "TrainModule", "latest_checkpoint", "train"],
    "spfm.train.recipe": ["Recipe", "apply_overrides", "load_recipe"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
