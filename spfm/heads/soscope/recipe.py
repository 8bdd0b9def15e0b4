"""Run a soScope recipe (``recipes/soscope_*.yaml``): inputs, omics, layout, params, features/graph, output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spfm.errors import DataError


def run_recipe(path: str | Path, **overrides: Any):
    """Fit soScope as the recipe says, write the enhanced AnnData to ``output``; returns the head."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp
    import yaml

    from spfm.atomic import atomic_path
    from spfm.heads.soscope import SoScope

    path = Path(path)
    with open(path) as fh:
        cfg = yaml.safe_load(fh) or {}
    if cfg.get("head") != "SoScope":
        raise DataError(f"not a soScope recipe (head: {cfg.get('head')!r})", path=path, field="head")
    inputs = cfg.get("inputs")
    if not inputs:
        raise DataError("the recipe lists no inputs", path=path, field="inputs")
    adatas = [ad.read_h5ad(p) for p in inputs]
    params = {**(cfg.get("params") or {}), **overrides}
    feats = np.load(cfg["image_features"], allow_pickle=False) if cfg.get("image_features") else None
    graph = sp.load_npz(cfg["subspot_graph"]) if cfg.get("subspot_graph") else None
    head = SoScope(**params).fit(adatas if len(adatas) > 1 else adatas[0], image_features=feats,
                                 subspot_graph=graph)
    out = Path(cfg.get("output", "runs/soscope_enhanced.h5ad"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        head.enhance().write_h5ad(tmp)
    return head
