"""Reading HisToSGE's inputs from AnnData: features, targets, array and physical coordinates, chunks, neighbours.

Every check raises :class:`~spfm.errors.DataError` naming the key at fault.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp

from spfm.errors import DataError

ARRAY_KEYS = ("array_col", "array_row")  # x, y of the published position embeddings


def embedding_key(adata: ad.AnnData, key: str | None) -> str:
    """The ``obsm`` key holding patch embeddings: ``key``, or the single ``X_<backbone>`` entry ``spfm embed`` wrote."""
    if key is not None:
        if key not in adata.obsm:
            raise DataError(f"no patch embeddings under obsm[{key!r}] (obsm keys here: "
                            f"{', '.join(adata.obsm.keys()) or 'none'}); run `spfm embed` first",
                            field=f'obsm["{key}"]')
        return key
    found = [k for k in adata.obsm.keys() if k.startswith("X_") and k not in ("X_pca", "X_umap")]
    if len(found) != 1:
        raise DataError("missing patch embeddings: pass embedding_key= (obsm keys here: "
                        f"{', '.join(adata.obsm.keys()) or 'none'}); `spfm embed` writes obsm['X_<backbone>']",
                        field="obsm")
    return found[0]


def features(adata: ad.AnnData, key: str, dim: int | None = None) -> np.ndarray:
    """(N, D) float32 patch embeddings; D must equal ``dim`` when given (the dimension the head was trained on)."""
    X = np.asarray(adata.obsm[key], dtype=np.float32)
    if X.ndim != 2 or X.shape[0] != adata.n_obs:
        raise DataError(f"expected (n_obs, D) embeddings, got shape {X.shape}", field=f'obsm["{key}"]')
    if dim is not None and X.shape[1] != dim:
        raise DataError(f"embeddings have {X.shape[1]} dimensions but the head was trained on {dim} (another "
                        "backbone?)", field=f'obsm["{key}"]')
    if not np.all(np.isfinite(X)):
        raise DataError("embeddings contain NaN or infinite values", field=f'obsm["{key}"]')
    return X


def counts(adata: ad.AnnData) -> sp.csr_matrix:
    """Raw counts (N, G) from ``layers["counts"]`` when present, else ``X``; checked non-negative and finite."""
    key = 'layers["counts"]' if "counts" in adata.layers else "X"
    X = adata.layers["counts"] if "counts" in adata.layers else adata.X
    if X is None:
        raise DataError("no counts", field=key)
    X = sp.csr_matrix(X, dtype=np.float32)
    if X.data.size and (not np.all(np.isfinite(X.data)) or X.data.min() < 0):
        raise DataError("counts must be finite and non-negative (pass raw counts, not log-normalised values)",
                        field=key)
    return X


def log1p_normalised(adata: ad.AnnData, genes: Sequence[str], target_sum: float) -> np.ndarray:
    """(N, len(genes)) float32 ``log1p(counts / total * target_sum)``; totals over all genes of ``adata``."""
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise DataError(f"gene panel mismatch: {len(missing)} of the head's {len(genes)} genes are not in var_names "
                        f"(e.g. {missing[:5]})", field="var_names")
    X = counts(adata)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    cols = adata.var_names.get_indexer(list(genes))
    Y = sp.diags(scale) @ X[:, cols]
    return np.log1p(Y.toarray()).astype(np.float32)


def array_xy(adata: ad.AnnData, n_positions: int) -> np.ndarray:
    """(N, 2) float (array column, array row): the published model's position indices, in [0, n_positions)."""
    for k in ARRAY_KEYS:
        if k not in adata.obs:
            raise DataError("the published (chunk) model needs integer array coordinates; use attention='knn' for "
                            "data without a spot lattice", field=f'obs["{k}"]')
    xy = adata.obs[list(ARRAY_KEYS)].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(xy)):
        raise DataError("array coordinates contain NaN", field='obs["array_col"], obs["array_row"]')
    bad = (xy < 0) | (xy > n_positions - 1)
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DataError(f"array coordinate {tuple(xy[i])} of spot {adata.obs_names[i]!r} is outside the position "
                        f"tables [0, {n_positions - 1}]", field='obs["array_col"], obs["array_row"]')
    return xy.astype(np.float32)


def pixel_size(adata: ad.AnnData, override: float | None) -> float:
    """Micrometres per pixel of ``obsm["spatial"]``: ``override``, else ``uns["spfm"]["pixel_size_um"]``."""
    value = override
    if value is None:
        try:
            value = adata.uns["spfm"]["pixel_size_um"]
        except (KeyError, TypeError):
            raise DataError("the knn variant measures distances in micrometres: pass pixel_size_um= or use an "
                            "AnnData from spfm.data.hest.read_sample / spfm embed",
                            field='uns["spfm"]["pixel_size_um"]') from None
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise DataError(f"pixel size must be positive, got {value}", field='uns["spfm"]["pixel_size_um"]')
    return value


def coords_um(adata: ad.AnnData, override: float | None) -> np.ndarray:
    """(N, 2) float32 spot centres in micrometres."""
    if "spatial" not in adata.obsm:
        raise DataError("no spot coordinates", field='obsm["spatial"]')
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.all(np.isfinite(xy[:, :2])):
        raise DataError(f"expected finite (n_obs, 2) coordinates, got shape {xy.shape}", field='obsm["spatial"]')
    return (xy[:, :2] * pixel_size(adata, override)).astype(np.float32)


def chunks(n: int, chunk_size: int, where: str = "") -> list[np.ndarray]:
    """Row indices of ``n`` spots cut into ``n // chunk_size`` consecutive chunks (``np.array_split``, as published).

    Raises:
        DataError: fewer spots than ``chunk_size``.
    """
    if n < chunk_size:
        raise DataError(f"{n} spots{where} are too few for chunks of {chunk_size}; lower chunk_size or use "
                        "attention='knn'", field="chunk_size")
    return np.array_split(np.arange(n), n // chunk_size)


def pad_chunks(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) int64 index matrix (padding points at row 0 of the chunk) and (B, L) bool padding mask."""
    width = max(len(p) for p in parts)
    index = np.zeros((len(parts), width), np.int64)
    pad = np.ones((len(parts), width), bool)
    for i, p in enumerate(parts):
        index[i, : len(p)] = p
        index[i, len(p):] = p[0]
        pad[i, : len(p)] = False
    return index, pad


def neighbours(xy_um: np.ndarray, k: int) -> np.ndarray:
    """(N, k') int64 indices of each spot's k' = min(k, N - 1) nearest other spots (spfm.data.graphs.knn_graph)."""
    from spfm.data.graphs import knn_graph

    n = len(xy_um)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0), np.int64)
    graph = knn_graph(xy_um, k, symmetric=False)  # neighbour -> query, exactly k incoming edges per query
    src, dst = graph.edge_index.numpy()
    order = np.argsort(dst, kind="stable")
    return src[order].reshape(n, k)
