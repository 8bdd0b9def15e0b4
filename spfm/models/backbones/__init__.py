"""The backbone registry: one name -> how the model is built, its embedding size, input normalisation and readout.

``create_backbone(name, ...)`` is the only door, as ``timm.create_model`` is for timm. See
:mod:`spfm.models.backbones.registry`.
"""

from spfm.models.backbones.registry import (
    Backbone,
    BackboneSpec,
    create_backbone,
    describe_backbones,
    get_spec,
    list_backbones,
    register_backbone,
    save_backbone,
)
from spfm.models.backbones.weights import HubAccessError

__all__ = [
    "Backbone",
    "BackboneSpec",
    "HubAccessError",
    "create_backbone",
    "describe_backbones",
    "get_spec",
    "list_backbones",
    "register_backbone",
    "save_backbone",
]
