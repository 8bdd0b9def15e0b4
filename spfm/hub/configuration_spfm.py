"""Hub configurations of spfm models, and the model card written from them.

This file is copied next to the weights by ``save_pretrained`` (``register_for_auto_class``), so that
``AutoModel.from_pretrained(folder_or_repo, trust_remote_code=True)`` works where spfm is not installed. It must
therefore import only the standard library and transformers -- never spfm.

:class:`SpfmConfig` holds what every spfm model records for its model card (licence, datasets, metrics, gene panel,
base backbone id); :class:`SpfmBackboneConfig` (``model_type="spfm-backbone"``) describes an image backbone fully
enough to rebuild it with timm or transformers alone.
"""

from __future__ import annotations

import json
import re
from typing import Any

from transformers import PretrainedConfig

#: How the weights of a no-derivatives backbone travel: "included" in model.safetensors, or "external" (only the
#: backbone's id is recorded and loading fetches the published weights from the backbone's own repository).
WEIGHTS_INCLUDED = "included"
WEIGHTS_EXTERNAL = "external"


class SpfmConfig(PretrainedConfig):
    """Fields shared by every spfm Hub config (all JSON-serialisable; they feed the model card).

    Args:
        license: licence of the published weights (SPDX-like id, e.g. ``"apache-2.0"``, ``"cc-by-nc-nd-4.0"``).
        datasets: dataset ids or names the model was trained on.
        metrics: ``{name: value}`` from the last evaluation.
        genes: the gene panel the model reads or predicts (may be empty for an image backbone).
        base_model: Hub id (or registry name) of the backbone it builds on.
        tags: extra model-card tags.
        spfm_version: spfm version that wrote the config.
    """

    model_type = "spfm"

    def __init__(self, license: str | None = None, datasets: list[str] | None = None,
                 metrics: dict[str, float] | None = None, genes: list[str] | None = None,
                 base_model: str | None = None, tags: list[str] | None = None, spfm_version: str | None = None,
                 **kwargs: Any) -> None:
        self.license = license
        self.datasets = list(datasets or [])
        self.metrics = dict(metrics or {})
        self.genes = [str(g) for g in (genes or [])]
        self.base_model = base_model
        self.tags = list(tags or [])
        self.spfm_version = spfm_version
        super().__init__(**kwargs)


class SpfmBackboneConfig(SpfmConfig):
    """An image backbone: normalised images (B, 3, H, W) -> embeddings (B, embed_dim).

    Args:
        backbone: spfm registry name (``"uni"``, ``"vit_tiny_patch16_224"``).
        library: ``"timm"`` or ``"transformers"``: who builds the trunk.
        architecture: timm architecture name (library timm).
        model_args: timm ``create_model`` keyword arguments; classes are written as ``{"__class__": "timm.x.Y"}``
            and only ``timm.*`` / ``torch.nn.*`` classes are resolved.
        trunk_config: the transformers config dict of the trunk (library transformers).
        trunk_kwargs: extra ``AutoModel.from_config`` arguments (``add_pooling_layer``).
        embed_dim: D.
        readout: ``"cls"``, ``"mean"`` (patch tokens) or ``"cls+mean"``.
        num_prefix_tokens: CLS + register tokens before the patch tokens.
        mean, std: per-channel input normalisation (images in [0, 1]).
        img_size: input side in pixels.
        hub_repo: the published weights' own repository (``MahmoodLab/uni``), or None.
        gated, no_derivatives: licence flags of the published weights.
        backbone_weights: ``"included"`` or ``"external"`` (fetched from ``hub_repo`` when loading).
        build_kwargs: the architecture overrides spfm's registry was given (``img_size``...).
    """

    model_type = "spfm-backbone"

    def __init__(self, backbone: str = "vit_tiny_patch16_224", library: str = "timm",
                 architecture: str | None = None, model_args: dict[str, Any] | None = None,
                 trunk_config: dict[str, Any] | None = None, trunk_kwargs: dict[str, Any] | None = None,
                 embed_dim: int = 192, readout: str = "cls", num_prefix_tokens: int = 1,
                 mean: list[float] | None = None, std: list[float] | None = None, img_size: int = 224,
                 hub_repo: str | None = None, gated: bool = False, no_derivatives: bool = False,
                 backbone_weights: str = WEIGHTS_INCLUDED, build_kwargs: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.backbone = backbone
        self.library = library
        self.architecture = architecture or backbone
        self.model_args = dict(model_args or {})
        self.trunk_config = dict(trunk_config or {})
        self.trunk_kwargs = dict(trunk_kwargs or {})
        self.embed_dim = int(embed_dim)
        self.readout = readout
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.mean = [float(v) for v in (mean or (0.5, 0.5, 0.5))]
        self.std = [float(v) for v in (std or (0.5, 0.5, 0.5))]
        self.img_size = int(img_size)
        self.hub_repo = hub_repo
        self.gated = bool(gated)
        self.no_derivatives = bool(no_derivatives)
        self.backbone_weights = backbone_weights
        self.build_kwargs = dict(build_kwargs or {})
        kwargs.setdefault("base_model", hub_repo or backbone)
        super().__init__(**kwargs)


# --- model card -------------------------------------------------------------------------------------------------

_MAX_GENES_SHOWN = 50


def _yaml_scalar(value: Any) -> str:
    """A YAML scalar: JSON's quoting is valid YAML for strings, numbers, booleans and null."""
    return json.dumps(value)


def _yaml(meta: dict[str, Any]) -> str:
    """Block YAML for a flat mapping of scalars, lists of scalars and one level of nested mappings."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}:")
            lines.extend(f"- {_yaml_scalar(v)}" for v in value)
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {_yaml_scalar(str(k))}: {_yaml_scalar(v)}" for k, v in value.items())
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    return "\n".join(lines)


def card_metadata(config: SpfmConfig) -> dict[str, Any]:
    """The YAML front matter of the model card: library_name, tags, license, base_model, datasets, the gene panel
    (gene_panel, gene_panel_size) and the last evaluation's metrics (spfm_metrics)."""
    kind = getattr(config, "model_type", "spfm")
    tags = ["spfm", kind, "spatial-omics", "histopathology"]
    tags += [t for t in getattr(config, "tags", []) if t not in tags]
    meta: dict[str, Any] = {"library_name": "spfm", "tags": tags}
    license = getattr(config, "license", None)
    if license:
        # The Hub accepts licence ids ("apache-2.0", "cc-by-nc-nd-4.0"); anything else is "other" plus a name.
        if re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", license):
            meta["license"] = license
        else:
            meta["license"] = "other"
            meta["license_name"] = re.sub(r"[^a-z0-9]+", "-", license.lower()).strip("-")
    base = getattr(config, "base_model", None)
    if base and "/" in base:  # a Hub repo id; a bare registry name (a timm ViT) is recorded as spfm_backbone
        meta["base_model"] = base
    backbone = getattr(config, "backbone", None) or (getattr(config, "backbone_config", None) or {}).get("backbone")
    if backbone:
        meta["spfm_backbone"] = backbone
    if getattr(config, "datasets", None):
        meta["datasets"] = list(config.datasets)
    meta["model_type"] = kind
    genes = list(getattr(config, "genes", []) or [])
    if genes:
        meta["gene_panel_size"] = len(genes)
        meta["gene_panel"] = genes
    metrics = getattr(config, "metrics", None) or {}
    if metrics:
        # The Hub's own `metrics` key is a list of metric ids and `model-index` needs a task type; the values of the
        # last evaluation go under spfm's key instead, so the metadata validates on the Hub.
        meta["spfm_metrics"] = {str(k): (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
    return meta


def model_card(config: SpfmConfig, repo_id: str | None = None, *, remote_code: bool = False) -> str:
    """README.md for a Hub repository: YAML metadata plus how to load the model and what it records."""
    meta = card_metadata(config)
    kind = meta["model_type"]
    name = repo_id or "this model"
    lines = ["---", _yaml(meta), "---", "", f"# {name}", "",
             f"An spfm (spatial-omics foundation model toolkit) model of kind `{kind}`.", ""]
    if getattr(config, "backbone_weights", WEIGHTS_INCLUDED) == WEIGHTS_EXTERNAL or (
            isinstance(getattr(config, "backbone_config", None), dict)
            and config.backbone_config.get("backbone_weights") == WEIGHTS_EXTERNAL):
        base = meta.get("base_model", "the base backbone")
        lines += [f"The backbone weights are **not** included: their licence forbids redistributing derivatives. "
                  f"Loading fetches the published weights of `{base}` from their own repository (accept its licence "
                  f"there and log in with `hf auth login` or `HF_TOKEN`).", ""]
    lines += ["## Usage", "", "```python", "import spfm", "", f'model = spfm.from_pretrained("{name}")', "```", ""]
    if remote_code:
        lines += ["Without spfm installed (needs torch, transformers, timm, safetensors):", "", "```python",
                  "from transformers import AutoModel", "",
                  f'model = AutoModel.from_pretrained("{name}", trust_remote_code=True)', "```", ""]
    genes = meta.get("gene_panel", [])
    if genes:
        shown = ", ".join(genes[:_MAX_GENES_SHOWN]) + (f", ... ({len(genes)} genes)"
                                                        if len(genes) > _MAX_GENES_SHOWN else "")
        lines += ["## Gene panel", "", shown, ""]
    if meta.get("spfm_metrics"):
        lines += ["## Metrics (last evaluation)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in meta["spfm_metrics"].items()]
        lines += [""]
    return "\n".join(lines)
