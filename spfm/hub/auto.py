"""spfm's Hub kinds, and their registration with transformers' ``AutoConfig`` / ``AutoModel``.

A *kind* is one ``model_type`` with its config and model class: ``spfm-backbone``, one per head
(``spfm-histosge``, ``spfm-soscope``, ``spfm-spatialglue``, ``spfm-cellscape``, see :mod:`spfm.hub.heads`) and
``spfm-composite`` (backbone + head). :func:`spfm.hub.from_pretrained` dispatches on this table; the Auto classes
learn it through :mod:`spfm.hub._hook` when spfm is imported.
"""

from __future__ import annotations

_configs_registered: set[str] = set()
_models_registered: set[str] = set()


def kinds() -> dict[str, tuple[type, type]]:
    """``{model_type: (config class, model class)}`` of every spfm kind (imports the model classes)."""
    import spfm.hub.external  # noqa: F401  (installs the registry loader of external backbones)
    from spfm.hub.composite import SpfmCompositeConfig, SpfmCompositeModel
    from spfm.hub.configs import head_kinds
    from spfm.hub.modeling_spfm import SpfmBackboneConfig, SpfmBackboneModel

    table: dict[str, tuple[type, type]] = {
        SpfmBackboneConfig.model_type: (SpfmBackboneConfig, SpfmBackboneModel),
        SpfmCompositeConfig.model_type: (SpfmCompositeConfig, SpfmCompositeModel),
    }
    table.update({kind.model_type: (kind.config_class, kind.model_class) for kind in head_kinds().values()})
    return table


def config_classes() -> dict[str, type]:
    """``{model_type: config class}`` without importing any model class (cheap: for AutoConfig)."""
    from spfm.hub.configs import SpfmCompositeConfig, head_kinds
    from spfm.hub.configuration_spfm import SpfmBackboneConfig

    return {SpfmBackboneConfig.model_type: SpfmBackboneConfig, SpfmCompositeConfig.model_type: SpfmCompositeConfig,
            **{kind.model_type: kind.config_class for kind in head_kinds().values()}}


def register_configs() -> None:
    """``AutoConfig.register`` every spfm config class not registered yet."""
    from transformers import AutoConfig

    for model_type, config_class in config_classes().items():
        if model_type not in _configs_registered:
            AutoConfig.register(model_type, config_class, exist_ok=True)
            _configs_registered.add(model_type)


def register_models() -> None:
    """``AutoModel.register`` every spfm model class not registered yet (configs first)."""
    from transformers import AutoModel

    register_configs()
    for model_type, (config_class, model_class) in kinds().items():
        if model_type not in _models_registered:
            AutoModel.register(config_class, model_class, exist_ok=True)
            _models_registered.add(model_type)


def refresh() -> None:
    """Register kinds added after transformers' auto modules were imported (a head registered late)."""
    import sys

    if "transformers.models.auto.configuration_auto" in sys.modules:
        register_configs()
    if "transformers.models.auto.modeling_auto" in sys.modules:
        register_models()


def register_auto_classes() -> None:
    """Register configs and models now (imports transformers); a kind added later is registered on the next call."""
    register_configs()
    register_models()

