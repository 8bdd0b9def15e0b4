"""Hub configs of heads and of backbone + head composites, and the table of head kinds.

A head kind is one ``model_type`` bound to one AnnData-facing head class that follows the head contract
(``to_config() -> dict``, ``from_config(dict) -> head``, ``head.module`` an ``nn.Module`` holding every tensor).
The four heads of spfm are registered here by import path; they are imported only when a model of their kind is
built, so this module is cheap and works before (or without) the head packages.

The class a downloaded config is loaded with is always the one registered for its ``model_type`` -- never a class
named inside the config -- so a config cannot make spfm import arbitrary code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from spfm.errors import SpfmError
from spfm.hub.configuration_spfm import SpfmBackboneConfig, SpfmConfig

#: head_config keys looked at, in order, for the gene panel shown on the model card.
GENE_KEYS = ("genes", "gene_panel", "var_names", "hvg_genes", "hvgs", "features")


def _gene_panel(head_config: dict[str, Any]) -> list[str]:
    """The gene panel of a head config: a top-level list under GENE_KEYS, else that of its RNA modality
    (multi-modal heads such as SpatialGlue keep one feature list per modality under ``modalities``)."""
    for key in GENE_KEYS:
        value = head_config.get(key)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return list(value)
    modalities = head_config.get("modalities")
    if isinstance(modalities, list):
        for entry in modalities:
            if isinstance(entry, dict) and str(entry.get("kind") or entry.get("name")).lower() in ("rna", "gene"):
                return _gene_panel({k: v for k, v in entry.items() if k != "modalities"})
    return []


class SpfmHeadConfig(SpfmConfig):
    """A head: its class (``"spfm.heads.spatialglue:SpatialGlue"``, informative) and ``head.to_config()``.

    Args:
        head_config: the head's ``to_config()``: hyperparameters plus the fitted JSON-able state (gene panel,
            preprocessing parameters, graph settings...). Large fitted arrays travel in the weights as buffers.
        head_class: ``module:QualName`` of the head class (defaults to the kind's).
        genes: gene panel for the card (default: the first of ``GENE_KEYS`` found in ``head_config``).
    """

    model_type = "spfm-head"
    default_head_class = ""

    def __init__(self, head_config: dict[str, Any] | None = None, head_class: str | None = None,
                 **kwargs: Any) -> None:
        self.head_config = dict(head_config or {})
        self.head_class = head_class or type(self).default_head_class
        if not kwargs.get("genes"):
            kwargs["genes"] = _gene_panel(self.head_config)
        super().__init__(**kwargs)


class SpfmCompositeConfig(SpfmConfig):
    """A backbone and a head saved together (``model_type="spfm-composite"``).

    Args:
        backbone_config: an ``SpfmBackboneConfig`` as a dict.
        head: a head kind's config as a dict (with its ``model_type``).
    """

    model_type = "spfm-composite"

    def __init__(self, backbone_config: dict[str, Any] | None = None, head: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.backbone_config = dict(backbone_config or SpfmBackboneConfig().to_dict())
        self.head = dict(head or {})
        kwargs.setdefault("base_model", self.backbone_config.get("base_model"))
        if not kwargs.get("genes"):
            kwargs["genes"] = list(self.head.get("genes") or [])
        if not kwargs.get("license"):
            kwargs["license"] = self.head.get("license") or self.backbone_config.get("license")
        super().__init__(**kwargs)


@dataclass
class HeadKind:
    """One head ``model_type``: its head class (an import path ``module:QualName``, or the class) and Hub classes."""

    model_type: str
    head_class: str | type
    config_class: type
    _model_class: type | None = None

    @property
    def class_path(self) -> str:
        if isinstance(self.head_class, str):
            return self.head_class
        return f"{self.head_class.__module__}:{self.head_class.__qualname__}"

    def load_head_class(self) -> type:
        """Import the head class; a clear error when its package is not part of this spfm installation."""
        if not isinstance(self.head_class, str):
            return self.head_class
        module_name, _, qualname = self.head_class.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)  # spfm.heads exports load their package here (PEP 562)
        except (ImportError, AttributeError) as exc:
            raise SpfmError(f"model kind {self.model_type!r} needs the head {self.head_class!r}, which this spfm "
                            f"installation does not have ({exc}); upgrade spfm") from exc
        return obj

    @property
    def model_class(self) -> type:
        if self._model_class is None:
            from spfm.hub.heads import make_head_model_class

            self._model_class = make_head_model_class(self)
        return self._model_class


_HEAD_KINDS: dict[str, HeadKind] = {}


def _camel(model_type: str) -> str:
    return "".join(part.capitalize() for part in model_type.replace("_", "-").split("-"))


def register_head_kind(model_type: str, head_class: str | type, *, overwrite: bool = False,
                       _refresh: bool = True) -> HeadKind:
    """Bind ``model_type`` (``"spfm-<head>"``) to a head class that follows the head contract.

    Args:
        model_type: the Hub ``model_type`` written to config.json; unique.
        head_class: ``"package.module:ClassName"`` (imported only when a model of this kind is built) or the class.
        overwrite: replace an existing binding.

    Returns:
        The :class:`HeadKind`, whose ``config_class`` / ``model_class`` are the Hub classes of this kind. The Auto
        classes learn it at once if transformers' auto modules are already imported.
    """
    if not model_type.startswith("spfm-"):
        raise SpfmError(f"head kind {model_type!r}: model types of spfm start with 'spfm-'")
    if model_type in _HEAD_KINDS and not overwrite:
        existing = _HEAD_KINDS[model_type]
        if existing.class_path == HeadKind(model_type, head_class, SpfmHeadConfig).class_path:
            return existing
        raise SpfmError(f"head kind {model_type!r} is already bound to {existing.class_path}")
    name = _camel(model_type)
    path = head_class if isinstance(head_class, str) else f"{head_class.__module__}:{head_class.__qualname__}"
    # The __init__ goes into the namespace so transformers' dataclass machinery keeps it (a subclass without its
    # own __init__ would get a generated one that drops SpfmHeadConfig's arguments).
    config_class = type(f"{name}Config", (SpfmHeadConfig,), {
        "model_type": model_type, "default_head_class": path, "__init__": SpfmHeadConfig.__init__,
        "__module__": __name__, "__doc__": f"Hub config of the {model_type} head ({path})."})
    kind = HeadKind(model_type, head_class, config_class)
    _HEAD_KINDS[model_type] = kind
    if _refresh:
        from spfm.hub import auto

        auto.refresh()
    return kind


def head_kinds() -> dict[str, HeadKind]:
    """``{model_type: HeadKind}``."""
    return dict(_HEAD_KINDS)


def kind_for_head(head: Any) -> HeadKind:
    """The kind whose head class ``head`` is an instance of (exact class first, then subclasses)."""
    path = f"{type(head).__module__}:{type(head).__qualname__}"
    for kind in _HEAD_KINDS.values():
        if kind.class_path == path or kind.head_class is type(head):
            return kind
    for kind in _HEAD_KINDS.values():
        if not isinstance(kind.head_class, str) and isinstance(head, kind.head_class):
            return kind
    # spfm's own heads are reached through the lazy spfm.heads exports ("spfm.heads:SpatialGlue" may be defined in
    # spfm.heads.spatialglue.head): compare the resolved classes of kinds whose packages are importable.
    for kind in _HEAD_KINDS.values():
        try:
            cls = kind.load_head_class()
        except SpfmError:
            continue
        if isinstance(head, cls):
            return kind
    raise SpfmError(f"{type(head).__name__} is not a registered head kind; register it with "
                    f"spfm.hub.register_head_kind('spfm-<name>', {path!r})")


#: The four heads of spfm (imported on first use; see COMMON head contract).
BUILTIN_HEADS = {
    "spfm-histosge": "spfm.heads:HisToSGE",
    "spfm-soscope": "spfm.heads:SoScope",
    "spfm-spatialglue": "spfm.heads:SpatialGlue",
    "spfm-cellscape": "spfm.heads:CellScape",
}
for _model_type, _path in BUILTIN_HEADS.items():
    register_head_kind(_model_type, _path, _refresh=False)
