"""Fetching a no-derivatives backbone from its own repository through spfm's registry.

A model pushed without the weights of a gated, no-derivatives backbone (UNI, Virchow2) records the backbone's id;
loading rebuilds it with ``create_backbone(name, pretrained=True, **build options)``, which runs the model card's
own loading code and turns gated/offline failures into a :class:`~spfm.models.backbones.HubAccessError` that says
how to get access. Importing this module installs the loader into :mod:`spfm.hub.modeling_spfm`.
"""

from __future__ import annotations

from torch import nn

from spfm.hub import modeling_spfm
from spfm.hub.configuration_spfm import SpfmBackboneConfig


def load_external_trunk(config: SpfmBackboneConfig) -> nn.Module:
    """The published trunk of ``config.backbone`` (registry) or, for a name spfm does not know, of ``hub_repo``."""
    from spfm.errors import SpfmError
    from spfm.models.backbones import create_backbone, list_backbones
    from spfm.models.backbones.weights import hub_access

    if config.backbone in list_backbones():
        kwargs = modeling_spfm._resolve_classes(dict(config.build_kwargs))
        return create_backbone(config.backbone, pretrained=True, **kwargs).trunk
    if not config.hub_repo:
        raise SpfmError(f"backbone {config.backbone!r} is external but unknown to spfm and records no hub_repo")
    with hub_access(config.hub_repo):
        return modeling_spfm.build_trunk(config, pretrained=True)


modeling_spfm.external_trunk_loader = load_external_trunk
