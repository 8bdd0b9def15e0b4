"""Input checks, preprocessing and the spatial graph for CellScape (AnnData -> dense expression + PyG graph).

Preprocessing as the paper: ``normalize_total(1e4)`` + ``log1p``; the top ``n_top_genes`` HVGs by ``seurat_v3`` on
raw counts (all genes when the panel is not larger); no scaling, no PCA. Several samples: ComBat on the
log-expression (``scanpy.pp.combat`` with the sample column) and one graph per sample joined block-diagonally.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spfm.errors import DataError

log = logging.getLogger(__name__)

#: Technologies on a regular grid get a kNN graph; everything else (single-cell imaging, Slide-seq) Delaunay.
GRID_TECHNOLOGIES = ("visium", "stereo", "st", "legacy", "dbit", "hdst")


def counts_matrix(adata: ad.AnnData, layer: str | None) -> tuple[np.ndarray | sp.spmatrix, str]:
    """The raw count matrix (N, G) and its key, checked for NaN, infinities and negatives."""
    if layer is None and "counts" in adata.layers:
        layer = "counts"
    key = "X" if layer is None else f'layers["{layer}"]'
    if layer is not None and layer not in adata.layers:
        raise DataError(f"no layer {layer!r}", field=key)
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise DataError("the AnnData has no expression matrix", field=key)
    values = X.data if sp.issparse(X) else np.asarray(X)
    if not np.all(np.isfinite(values)):
        raise DataError(f"{int(np.sum(~np.isfinite(values)))} NaN or infinite value(s) in the expression matrix",
                        field=key)
    if values.size and values.min() < 0:
        raise DataError("negative values in the expression matrix; CellScape expects raw counts", field=key)
    return X, key


def check_inputs(adata: ad.AnnData, *, min_cells: int = 3) -> None:
    """Coordinates present, finite, (N, 2); enough cells; at least two genes."""
    if not isinstance(adata, ad.AnnData):
        raise DataError(f"expected an AnnData, got {type(adata).__name__}", field="adata")
    if "spatial" not in adata.obsm:
        raise DataError("no cell coordinates", field='obsm["spatial"]')
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise DataError(f"expected (n_cells, 2) coordinates, got shape {xy.shape}", field='obsm["spatial"]')
    if not np.all(np.isfinite(xy)):
        raise DataError(f"{int(np.sum(~np.isfinite(xy)))} NaN or infinite coordinate(s)", field='obsm["spatial"]')
    if adata.n_obs < min_cells:
        raise DataError(f"need at least {min_cells} cells, got {adata.n_obs}", field="n_obs")
    if adata.n_vars < 2:
        raise DataError(f"a gene panel of {adata.n_vars} gene(s): CellScape needs at least 2 genes (the genomic "
                        "map places genes by their correlations)", field="var_names")


def check_no_duplicates(xy: np.ndarray, groups: np.ndarray | None) -> None:
    """Delaunay triangulation is degenerate on coincident points: refuse them, naming the first pair."""
    groups = np.zeros(len(xy)) if groups is None else groups
    for g in dict.fromkeys(groups.tolist()):
        idx = np.flatnonzero(groups == g)
        _, first, counts = np.unique(xy[idx], axis=0, return_index=True, return_counts=True)
        if np.any(counts > 1):
            dup = xy[idx][first[np.argmax(counts > 1)]]
            raise DataError(f"{int(np.sum(counts[counts > 1] - 1))} cell(s) share coordinates with another cell "
                            f"(e.g. {dup.tolist()}); the Delaunay graph is degenerate on duplicated points -- "
                            "remove or jitter them, or use graph='knn'", field='obsm["spatial"]')


def resolve_graph(adata: ad.AnnData, graph: str) -> str:
    """``"knn"`` or ``"delaunay"``; ``"auto"`` reads ``uns["spfm"]["technology"]`` (grid platforms -> kNN)."""
    if graph in ("knn", "delaunay"):
        return graph
    if graph != "auto":
        raise DataError(f"graph must be 'auto', 'knn' or 'delaunay', got {graph!r}", field="graph")
    tech = str((adata.uns.get("spfm") or {}).get("technology", "")).lower()
    words = tech.replace("-", " ").replace("_", " ").split()
    return "knn" if any(w.startswith(t) for w in words for t in GRID_TECHNOLOGIES) else "delaunay"


def select_genes(adata: ad.AnnData, layer: str | None, n_top_genes: int, batch_key: str | None) -> list[str]:
    """The HVG panel: seurat_v3 top ``n_top_genes`` on raw counts, all genes when the panel is not larger."""
    if adata.n_vars <= n_top_genes:
        return [str(g) for g in adata.var_names]
    from spfm.data.preprocess import highly_variable_genes

    X, _ = counts_matrix(adata, layer)
    tmp = ad.AnnData(X=X.copy(), obs=adata.obs[[batch_key]].copy() if batch_key else None,
                     var=adata.var[[]].copy())
    highly_variable_genes(tmp, n_top_genes, batch_key=batch_key)
    return [str(g) for g in adata.var_names[tmp.var["highly_variable"].to_numpy()]]


def expression(adata: ad.AnnData, genes: list[str], *, layer: str | None = None, target_sum: float = 1e4,
               batch_key: str | None = None) -> np.ndarray:
    """(N, p) float32 log-normalised expression of ``genes`` (library size over all genes), ComBat per batch."""
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise DataError(f"{len(missing)} gene(s) of the model's panel are missing, e.g. {missing[:5]}",
                        field="var_names")
    X, _ = counts_matrix(adata, layer)
    totals = np.asarray(X.sum(1)).ravel().astype(np.float64)
    idx = adata.var_names.get_indexer(genes)
    sub = X[:, idx]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    factors = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    out = np.log1p(sub.astype(np.float64) * factors[:, None]).astype(np.float32)
    if batch_key is not None:
        if batch_key not in adata.obs:
            raise DataError(f"batch column {batch_key!r} not found", field=f'obs["{batch_key}"]')
        batches = adata.obs[batch_key].astype(str).to_numpy()
        if len(set(batches)) > 1:
            import scanpy as sc

            tmp = ad.AnnData(X=out, obs={"batch": batches})
            sc.pp.combat(tmp, key="batch")
            out = np.asarray(tmp.X, dtype=np.float32)
            out = np.nan_to_num(out)  # ComBat divides by per-batch variance: a gene constant in a batch gives NaN
    return out


def jitter_duplicates(xy: np.ndarray, seed: int = 0) -> np.ndarray:
    """Move every repeated point (all but the first of each set of coincident points) by a random offset of
    1e-3 x the median nearest-neighbour distance, so qhull triangulates it with its twin and their neighbours."""
    from scipy.spatial import cKDTree

    xy = np.array(xy, dtype=np.float64)
    _, first = np.unique(xy, axis=0, return_index=True)
    repeated = np.setdiff1d(np.arange(len(xy)), first)
    if len(repeated):
        d, _ = cKDTree(xy).query(xy, k=2)
        nonzero = d[:, 1][d[:, 1] > 0]
        step = 1e-3 * (np.median(nonzero) if len(nonzero) else 1.0)
        xy[repeated] += np.random.default_rng(seed).normal(0.0, step, size=(len(repeated), 2))
    return xy


def spatial_graph(adata: ad.AnnData, kind: str, k: int, batch_key: str | None, duplicates: str = "error"):
    """Undirected spatial graph (PyG ``Data``), one block per sample when ``batch_key`` is given.

    ``duplicates`` (Delaunay only): ``"error"`` refuses coincident cells; ``"jitter"`` moves the repeats by a tiny
    random offset first (osmFISH as distributed has 476 duplicated cell records).
    """
    from spfm.data.graphs import from_adata

    groups = adata.obs[batch_key].astype(str).to_numpy() if batch_key else None
    if kind == "delaunay":
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        if duplicates == "jitter":
            sample = groups if groups is not None else np.zeros(adata.n_obs)
            moved = xy.copy()
            for g in dict.fromkeys(sample.tolist()):
                idx = np.flatnonzero(sample == g)
                moved[idx] = jitter_duplicates(xy[idx])
            xy = moved
            adata = ad.AnnData(obs=adata.obs[[batch_key]] if batch_key else pd.DataFrame(index=adata.obs_names),
                               obsm={"spatial": xy})
        elif duplicates != "error":
            raise DataError(f"duplicates must be 'error' or 'jitter', got {duplicates!r}", field="duplicates")
        check_no_duplicates(xy, groups)
        if groups is not None:
            small = [g for g in dict.fromkeys(groups.tolist()) if np.sum(groups == g) < 3]
            if small:
                raise DataError(f"sample(s) {small} have fewer than 3 cells: no Delaunay triangulation",
                                field=f'obs["{batch_key}"]')
        return from_adata(adata, "delaunay", sample_key=batch_key)
    return from_adata(adata, "knn", sample_key=batch_key, k=k)
