"""Registry of image backbones.

A :class:`BackboneSpec` says how a named model is built (a builder function), how big its embedding is, which
mean/std its input expects and how the embedding is read out of its tokens. :func:`create_backbone` builds a
:class:`Backbone`: an ``nn.Module`` mapping normalised images (B, 3, H, W) to embeddings (B, D).

Plain timm ViTs are registered here; the pathology foundation models (UNI, Virchow2, H-optimus-0, ...) are
registered in :mod:`spfm.models.backbones.pathology`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spfm.atomic import atomic_path
from spfm.errors import SpfmError
from spfm.models.backbones.weights import hub_access, load_weights, read_state_dict, resolve_checkpoint, save_checkpoint

#: ImageNet statistics, the default normalisation of most ViTs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone.

    Attributes:
        name: registry name (``"uni"``, ``"vit_tiny_patch16_224"``).
        builder: ``builder(pretrained: bool, checkpoint: str | None, **kwargs) -> nn.Module`` returning the trunk;
            the trunk's ``forward_features`` (timm) or ``forward`` returns tokens (B, T, D_tok).
        embed_dim: size D of the embedding the readout produces.
        mean, std: input normalisation (per channel, images in [0, 1]).
        readout: ``"cls"`` (token 0), ``"mean"`` (mean of patch tokens), ``"cls+mean"`` (concatenated), or a
            callable ``(tokens (B, T, D_tok), num_prefix_tokens) -> (B, D)``.
        input_size: expected image side in pixels.
        source: where the weights come from (``"hf-hub:MahmoodLab/uni"``, ``"timm"``, ``"random"``).
        gated: the weights need an accepted licence on the Hub.
        license: the weights' licence, for model cards (``"cc-by-nc-nd-4.0"``).
        no_derivatives: the licence forbids redistributing fine-tuned weights (spfm then never uploads them).
        extras: anything else a builder or a later stage needs.
    """

    name: str
    builder: Callable[..., nn.Module]
    embed_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    readout: str | Callable[[torch.Tensor, int], torch.Tensor] = "cls"
    input_size: int = 224
    source: str = "random"
    gated: bool = False
    license: str | None = None
    no_derivatives: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Add a spec to the registry (names are unique unless ``overwrite``)."""
    if spec.name in _REGISTRY and not overwrite:
        raise SpfmError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; a clear error listing the known names otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        raise SpfmError(f"unknown backbone {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


class Backbone(nn.Module):
    """A trunk plus its readout: normalised images (B, 3, H, W) -> embeddings (B, embed_dim).

    Attributes:
        spec: the registry entry it was built from.
        trunk: the underlying model (a timm ``VisionTransformer`` or a transformers model).
        embed_dim: D.
        mean, std: the input normalisation the trunk expects (apply it in the data pipeline or with
            :meth:`normalize`).
    """

    def __init__(self, spec: BackboneSpec, trunk: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.embed_dim = spec.embed_dim
        #: architecture overrides it was built with (set by create_backbone; save_backbone writes them).
        self.build_kwargs: dict[str, Any] = {}
        #: fine-tuning mode and trainable/total parameter counts (set by spfm.models.finetune).
        self.finetune: dict[str, Any] | None = None
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.spec.std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised as the trunk expects."""
        return (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> tokens (B, T, D_tok), prefix tokens (CLS, registers) first."""
        if hasattr(self.trunk, "forward_features"):
            return self.trunk.forward_features(images)
        out = self.trunk(pixel_values=images)
        return out.last_hidden_state

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> embeddings (B, embed_dim)."""
        tokens = self.tokens(images)
        prefix = int(getattr(self.trunk, "num_prefix_tokens", 1))
        readout = self.spec.readout
        if callable(readout):
            return readout(tokens, prefix)
        if readout == "cls":
            return tokens[:, 0]
        if readout == "mean":
            return tokens[:, prefix:].mean(dim=1)
        if readout == "cls+mean":
            return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)
        raise SpfmError(f"backbone {self.spec.name!r}: unknown readout {readout!r}")


def create_backbone(name: str, *, pretrained: bool = False, checkpoint: str | os.PathLike | None = None,
                    **kwargs: Any) -> Backbone:
    """Build a registered backbone.

    Args:
        name: a registry name (see :func:`list_backbones`).
        pretrained: load the published weights (from the Hub or the HF cache; ``HF_HUB_OFFLINE=1`` works from the
            cache). Gated or unreachable weights raise :class:`~spfm.models.backbones.weights.HubAccessError`.
        checkpoint: a local weights file (``.safetensors``; ``.bin``/``.pth`` read with ``weights_only=True``) or a
            directory with ``config.json`` and weights, instead of the published weights.
        **kwargs: architecture overrides passed to the builder (``img_size``, ``drop_path_rate``, ``depth``, ...);
            recorded on the result as ``build_kwargs`` so :func:`save_backbone` can rebuild the same shape.
    """
    spec = get_spec(name)
    if pretrained and checkpoint is not None:
        raise SpfmError(f"backbone {name!r}: pass either pretrained=True or checkpoint=, not both")
    trunk = spec.builder(pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    backbone = Backbone(spec, trunk)
    # Options a checkpoint directory restored (save_backbone's model_args) count as build options too, so saving a
    # reloaded backbone again keeps them.
    saved = {} if checkpoint is None else (resolve_checkpoint(checkpoint).config or {}).get("model_args", {})
    backbone.build_kwargs = {**saved, **kwargs}
    return backbone


def describe_backbones() -> list[dict[str, Any]]:
    """One row per registered backbone, for ``spfm backbones``: name, embed_dim, source, gated, license,
    no_derivatives, readout."""
    rows = []
    for name in list_backbones():
        spec = _REGISTRY[name]
        rows.append(dict(name=name, embed_dim=spec.embed_dim, source=spec.source, gated=spec.gated,
                         license=spec.license, no_derivatives=spec.no_derivatives,
                         readout=spec.readout if isinstance(spec.readout, str) else spec.readout.__name__))
    return rows


def save_backbone(backbone: Backbone, directory: str | os.PathLike) -> Path:
    """Write a backbone's trunk as a checkpoint directory (``config.json`` + ``model.safetensors``).

    ``create_backbone(backbone.spec.name, checkpoint=directory)`` rebuilds it with the same architecture overrides
    and identical outputs. transformers trunks are written with ``save_pretrained`` (their own config format).
    """
    trunk = backbone.trunk
    if hasattr(trunk, "peft_config"):
        raise SpfmError(f"backbone {backbone.spec.name!r} has LoRA adapters: merge_lora() it before saving")
    if hasattr(trunk, "save_pretrained") and hasattr(trunk, "config"):
        with atomic_path(directory, directory=True) as tmp:
            trunk.save_pretrained(str(tmp))
        return Path(directory)
    config = {"spfm_backbone": backbone.spec.name,
              "architecture": backbone.spec.extras.get("timm_name", backbone.spec.name),
              "model_args": backbone.build_kwargs}
    try:
        json.dumps(config)
    except TypeError as exc:
        raise SpfmError(f"backbone {backbone.spec.name!r}: build options {backbone.build_kwargs!r} cannot be "
                        f"written to config.json ({exc})") from exc
    return save_checkpoint(trunk, directory, config)


def timm_builder(arch: str, *, hub_repo: str | None = None, arch_kwargs: dict[str, Any] | None = None,
                 card_kwargs: dict[str, Any] | None = None) -> Callable[..., nn.Module]:
    """A builder for a timm model.

    Args:
        arch: the timm architecture that random init and local checkpoints are built with.
        hub_repo: ``owner/name`` on the Hub; ``pretrained=True`` then calls ``timm.create_model("hf-hub:<repo>",
            pretrained=True, **card_kwargs)`` exactly as the model card does (the Hub's ``config.json`` supplies the
            architecture). Without it, timm's own pretrained tag for ``arch`` is used.
        arch_kwargs: the architecture as published (JSON-like values), for random init and local checkpoints.
        card_kwargs: what the model card passes to ``create_model`` (layer classes such as ``SwiGLUPacked``).
    """
    arch_kwargs = dict(arch_kwargs or {})
    card_kwargs = dict(card_kwargs or {})

    def build(pretrained: bool = False, checkpoint: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
        import timm

        if checkpoint is not None:
            ckpt = resolve_checkpoint(checkpoint)
            # A timm config.json (the Hub's, or save_backbone's) carries the build options of those weights.
            saved_args = (ckpt.config or {}).get("model_args", {})
            model = timm.create_model(arch, pretrained=False,
                                      **{**arch_kwargs, **saved_args, **card_kwargs, **overrides})
            load_weights(model, read_state_dict(ckpt.weights), source=ckpt.weights)
            return model
        if pretrained:
            repo = hub_repo or f"timm/{arch}"
            with hub_access(repo):
                if hub_repo is not None:
                    return timm.create_model(f"hf-hub:{hub_repo}", pretrained=True, **card_kwargs, **overrides)
                return timm.create_model(arch, pretrained=True, **{**arch_kwargs, **card_kwargs, **overrides})
        return timm.create_model(arch, pretrained=False, **{**arch_kwargs, **card_kwargs, **overrides})

    return build


_TIMM_VITS = {
    # name: embed_dim (timm's augreg weights for these use mean = std = 0.5)
    "vit_tiny_patch16_224": 192,
    "vit_small_patch16_224": 384,
    "vit_base_patch16_224": 768,
    "vit_large_patch16_224": 1024,
}


def _load_builtin() -> None:
    """Register the built-in backbones once (timm ViTs here, pathology models in their own module)."""
    if _REGISTRY.get("vit_tiny_patch16_224") is not None:
        return
    for model_name, dim in _TIMM_VITS.items():
        builder = timm_builder(model_name, arch_kwargs={"num_classes": 0})
        register_backbone(BackboneSpec(name=model_name, builder=builder, embed_dim=dim, mean=(0.5, 0.5, 0.5),
                                       std=(0.5, 0.5, 0.5), readout="cls", source="timm", license="apache-2.0",
                                       extras={"timm_name": model_name}),
                          overwrite=True)
    import spfm.models.backbones.pathology  # noqa: F401  (registers UNI, Virchow2, ... on import)
