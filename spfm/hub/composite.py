"""A backbone and a head saved as one Hub model (``model_type="spfm-composite"``).

``model.backbone`` is an :class:`~spfm.hub.modeling_spfm.SpfmBackboneModel` (images -> embeddings) and
``model.head_model`` a head's Hub model (``model.head`` the AnnData-facing head); ``model.safetensors`` holds
``backbone.trunk.*`` and ``head_model.module.*``. A no-derivatives backbone (UNI, Virchow2) is pushed without its
weights unless asked; loading then fetches them from the backbone's own repository.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from spfm.errors import DataError
from spfm.hub.configs import SpfmCompositeConfig, head_kinds
from spfm.hub.configuration_spfm import SpfmBackboneConfig
from spfm.hub.modeling_spfm import SpfmBackboneModel, SpfmHubMixin


class SpfmCompositeModel(SpfmHubMixin, PreTrainedModel):
    """Backbone + head. ``forward(pixel_values)`` runs the backbone; the head is used through ``model.head``."""

    config_class = SpfmCompositeConfig
    base_model_prefix = "spfm_composite"
    main_input_name = "pixel_values"

    def __init__(self, config: SpfmCompositeConfig, backbone: SpfmBackboneModel | None = None,
                 head_model: Any = None) -> None:
        super().__init__(config)
        if backbone is None:
            backbone = SpfmBackboneModel(SpfmBackboneConfig.from_dict(config.backbone_config))
        if head_model is None:
            model_type = config.head.get("model_type")
            kind = head_kinds().get(model_type)
            if kind is None:
                raise DataError(f"unknown head kind {model_type!r}; spfm knows {sorted(head_kinds())}",
                                field="head.model_type")
            head_model = kind.model_class(kind.config_class.from_dict(config.head))
        self.backbone = backbone
        self.head_model = head_model
        self.post_init()

    @property
    def head(self) -> Any:
        """The AnnData-facing head."""
        return self.head_model.head

    def _init_weights(self, module: nn.Module) -> None:
        """Keep the parts' own initialisation."""

    def _sync_config(self) -> None:
        self.head_model._sync_config()
        self.config.backbone_config = self.backbone.config.to_dict()
        self.config.head = self.head_model.config.to_dict()

    def _restricted_prefixes(self) -> tuple[str, ...]:
        return ("backbone.trunk.",) if self.backbone.config.no_derivatives else ()

    def _external_prefixes(self) -> tuple[str, ...]:
        return ("backbone.trunk.",) if self.backbone._external_prefixes() else ()

    def _weights_mode(self) -> str:
        return self.backbone.config.backbone_weights

    def _set_backbone_weights(self, mode: str) -> None:
        self.backbone.config.backbone_weights = mode
        self.config.backbone_config["backbone_weights"] = mode

    def _load_external(self) -> None:
        self.backbone._load_external()

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> embeddings (B, D)."""
        return self.backbone.embed(pixel_values)

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        return self.backbone(pixel_values, **kwargs)
