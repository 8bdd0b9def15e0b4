"""Run a soScope recipe (``recipes/soscope_*.yaml``): inputs, omics, layout, params, features/graph, output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spfm.errors import DataError


def run_recipe(source: str | Path | dict[str, Any], *, progress: bool = True, where: str | Path | None = None,
               **overrides: Any):
    """Fit soScope as the recipe (a file, or a mapping read from ``where``: what ``spfm run`` passes) says, write
    the enhanced AnnData to ``output``; returns it. ``overrides`` are SoScope arguments that win over ``params``."""
    import numpy as np
    import scipy.sparse as sp

    from spfm.atomic import atomic_write_h5ad, read_h5ad
    from spfm.heads.soscope import SoScope
    from spfm.recipes import read_recipe

    cfg, path = read_recipe(source)
    path = path or where
    if cfg.get("head") != "SoScope":
        raise DataError(f"not a soScope recipe (head: {cfg.get('head')!r})", path=path, field="head")
    inputs = cfg.get("inputs")
    if not inputs:
        raise DataError("the recipe lists no inputs", path=path, field="inputs")
    adatas = [read_h5ad(p, "input AnnData", field="inputs") for p in inputs]
    params = {**(cfg.get("params") or {}), **overrides}
    feats = np.load(cfg["image_features"], allow_pickle=False) if cfg.get("image_features") else None
    graph = sp.load_npz(cfg["subspot_graph"]) if cfg.get("subspot_graph") else None
    head = SoScope(**params).fit(adatas if len(adatas) > 1 else adatas[0], image_features=feats,
                                 subspot_graph=graph, progress=progress)
    enhanced = head.enhance()
    atomic_write_h5ad(enhanced, cfg.get("output", "runs/soscope_enhanced.h5ad"))
    return enhanced
