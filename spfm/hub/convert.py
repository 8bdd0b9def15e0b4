"""Turn spfm objects into Hub models and back.

* :func:`backbone_to_hub` -- a registry :class:`~spfm.models.backbones.Backbone` -> ``SpfmBackboneModel`` whose
  config rebuilds the trunk with timm/transformers alone (checked on the meta device: same modules, same shapes);
* :func:`hub_to_backbone` -- back to a registry ``Backbone`` (``spfm embed`` and the training loop use those);
* :func:`training_output_to_hub` -- an ``spfm train`` output folder (``final/`` + ``metrics.json``);
* :func:`to_hub_model` -- any of these, a head that follows the head contract, or ``(backbone, head)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spfm.errors import DataError, SpfmError
from spfm.hub.configuration_spfm import WEIGHTS_INCLUDED, SpfmBackboneConfig

#: Card fields accepted by every conversion.
CARD_FIELDS = ("license", "datasets", "metrics", "genes", "base_model", "tags")


def _card(card: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(card) - set(CARD_FIELDS))
    if unknown:
        raise SpfmError(f"unknown model-card fields {unknown}; known: {list(CARD_FIELDS)}")
    return {k: v for k, v in card.items() if v is not None}


def _dotted(value: Any) -> dict[str, str]:
    """A layer class (or timm's ``SwiGLUPacked`` partial) as ``{"__class__": "timm.layers.SwiGLUPacked"}``."""
    import timm.layers

    for namespace, prefix in ((timm.layers, "timm.layers"), (nn, "torch.nn")):
        for name, obj in vars(namespace).items():
            if obj is value:
                return {"__class__": f"{prefix}.{name}"}
    module = getattr(value, "__module__", "")
    if isinstance(value, type) and module.startswith(("timm.", "torch.nn")):
        return {"__class__": f"{module}.{value.__qualname__}"}
    raise SpfmError(f"build option {value!r} cannot be written to a Hub config (only timm.* / torch.nn.* classes)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _dotted(value)


def _signature(module: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, module class, parameter/buffer shapes) of every submodule: equal signatures = same architecture."""
    rows = []
    for name, sub in module.named_modules():
        shapes = tuple(tuple(t.shape) for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)])
        rows.append((name, type(sub).__name__, shapes))
    return rows


def _timm_model_args(backbone: Any) -> dict[str, Any]:
    """The ``create_model`` arguments that rebuild ``backbone.trunk`` (verified on the meta device)."""
    import timm
    from timm.layers import SwiGLUPacked

    from spfm.hub.modeling_spfm import _resolve_classes

    spec = backbone.spec
    arch = spec.extras.get("timm_name", spec.name)
    base = dict(spec.extras.get("arch_kwargs", {"num_classes": 0}))
    # Builders of SwiGLU models pass these layer classes on top of the architecture (see pathology.py).
    candidates = [base, {**base, "mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}]
    target = _signature(backbone.trunk)
    for candidate in candidates:
        args = _jsonable({**candidate, **backbone.build_kwargs})
        with torch.device("meta"):
            probe = timm.create_model(arch, pretrained=False, **_resolve_classes(args))
        if _signature(probe) == target:
            return args
    raise SpfmError(f"backbone {spec.name!r}: cannot describe its trunk as timm {arch!r} with its build options "
                    f"{backbone.build_kwargs!r}; save it with save_backbone() instead")


def backbone_config(backbone: Any, **card: Any) -> SpfmBackboneConfig:
    """The Hub config of a registry backbone (architecture, readout, normalisation, licence flags)."""
    import spfm

    spec = backbone.spec
    if not isinstance(spec.readout, str):
        raise SpfmError(f"backbone {spec.name!r} has a custom readout function, which a Hub config cannot hold")
    if hasattr(backbone.trunk, "peft_config"):
        raise SpfmError(f"backbone {spec.name!r} has LoRA adapters: merge_lora() it before saving")
    trunk = backbone.trunk
    built = backbone.build_kwargs
    img_size = int(built.get("img_size") or built.get("image_size") or spec.input_size)
    common = dict(backbone=spec.name, embed_dim=int(backbone.embed_dim), readout=spec.readout,
                  num_prefix_tokens=int(getattr(trunk, "num_prefix_tokens", 1)), mean=list(spec.mean),
                  std=list(spec.std), img_size=img_size,
                  hub_repo=spec.extras.get("hub_repo"), gated=spec.gated, no_derivatives=spec.no_derivatives,
                  backbone_weights=WEIGHTS_INCLUDED, build_kwargs=_jsonable(backbone.build_kwargs),
                  spfm_version=spfm.__version__)
    card = _card(card)
    card.setdefault("license", spec.license)
    if hasattr(trunk, "save_pretrained") and hasattr(trunk, "config"):
        kwargs = {"add_pooling_layer": False} if getattr(trunk, "pooler", object()) is None else {}
        return SpfmBackboneConfig(library="transformers", architecture=type(trunk).__name__,
                                  trunk_config=trunk.config.to_dict(), trunk_kwargs=kwargs, **common, **card)
    return SpfmBackboneConfig(library="timm", architecture=spec.extras.get("timm_name", spec.name),
                              model_args=_timm_model_args(backbone), **common, **card)


def backbone_to_hub(backbone: Any, **card: Any) -> Any:
    """A registry ``Backbone`` as an ``SpfmBackboneModel`` sharing its trunk (no copy of the weights)."""
    from spfm.hub.modeling_spfm import SpfmBackboneModel

    return SpfmBackboneModel(backbone_config(backbone, **card), trunk=backbone.trunk)


def hub_to_backbone(model: Any) -> Any:
    """An ``SpfmBackboneModel`` as a registry ``Backbone`` sharing its trunk (for ``spfm embed``, fine-tuning)."""
    from spfm.models.backbones import Backbone, get_spec

    backbone = Backbone(get_spec(model.config.backbone), model.trunk)
    backbone.build_kwargs = dict(getattr(model.config, "build_kwargs", {}) or {})
    return backbone


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def training_output_to_hub(folder: str | os.PathLike, **card: Any) -> Any:
    """An ``spfm train`` output folder (or its ``final/``) as an ``SpfmBackboneModel``.

    The card gets the gene panel and recipe dataset from ``final/config.json`` and the last metrics from
    ``metrics.json`` unless given.
    """
    from spfm.atomic import read_json_object
    from spfm.models.backbones import create_backbone

    folder = Path(folder)
    final = folder / "final" if (folder / "final" / "config.json").is_file() else folder
    config = read_json_object(final / "config.json", "training output config")
    name = config.get("backbone") or config.get("spfm_backbone")
    if not name:
        raise DataError("not an spfm training output (no 'backbone' key)", path=final / "config.json",
                        field="backbone")
    backbone = create_backbone(name, checkpoint=final)
    card = dict(card)
    card.setdefault("genes", config.get("genes"))
    metrics_file = final.parent / "metrics.json"
    if "metrics" not in card and metrics_file.is_file():
        card["metrics"] = _numeric(read_json_object(metrics_file, "metrics file"))
    shards = ((config.get("recipe") or {}).get("data") or {}).get("shards")
    if "datasets" not in card and shards:
        card["datasets"] = [Path(shards).name]
    model = backbone_to_hub(backbone, **card)
    if config.get("img_size"):
        model.config.img_size = int(config["img_size"])
    return model


def _is_training_output(path: Path) -> bool:
    for folder in (path, path / "final"):
        file = folder / "config.json"
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except (OSError, json.JSONDecodeError):
                return False
            return isinstance(data, dict) and "model_type" not in data and "backbone" in data
    return False


def to_hub_model(obj: Any, **card: Any) -> Any:
    """Any spfm model as a Hub model (``save_pretrained`` / ``push_to_hub``).

    Args:
        obj: a Hub model (returned as is, card fields applied), a registry ``Backbone``, a head following the head
            contract, a ``(backbone, head)`` pair (composite), or an ``spfm train`` output folder.
        **card: license, datasets, metrics, genes, base_model, tags.
    """
    from transformers import PreTrainedModel

    from spfm.models.backbones import Backbone

    if isinstance(obj, PreTrainedModel):
        for key, value in _card(card).items():
            setattr(obj.config, key, value)
        return obj
    if isinstance(obj, Backbone):
        return backbone_to_hub(obj, **card)
    if isinstance(obj, (str, os.PathLike)) and _is_training_output(Path(obj)):
        return training_output_to_hub(obj, **card)
    if isinstance(obj, tuple) and len(obj) == 2:
        from spfm.hub.composite import SpfmCompositeConfig, SpfmCompositeModel

        backbone = obj[0] if isinstance(obj[0], PreTrainedModel) else to_hub_model(obj[0])
        head_model = obj[1] if isinstance(obj[1], PreTrainedModel) else to_hub_model(obj[1])
        head_model._sync_config()
        config = SpfmCompositeConfig(backbone_config=backbone.config.to_dict(), head=head_model.config.to_dict(),
                                     **_card(card))
        return SpfmCompositeModel(config, backbone=backbone, head_model=head_model)
    if hasattr(obj, "to_config") and hasattr(obj, "module"):
        from spfm.hub.heads import SpfmHeadModel

        return SpfmHeadModel.from_head(obj, **_card(card))
    raise SpfmError(f"cannot make a Hub model of {type(obj).__name__}: expected a Backbone, a head (to_config + "
                    f"module), a (backbone, head) pair, an spfm train output folder, or an spfm Hub model")
