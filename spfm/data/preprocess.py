"""Preprocessing shared by the heads: normalise + log1p, HVGs, CLR for protein, TF-IDF + LSI for chromatin, PCA.

Conventions (scanpy style):

* The AnnData-level functions (:func:`normalize_log1p`, :func:`highly_variable_genes`, :func:`clr`, :func:`lsi`,
  :func:`pca`) change the AnnData **in place**, return ``None``, write only to the keys listed in their docstring,
  and log one INFO line on the ``spfm.data.preprocess`` logger naming what they wrote.
* The array-level helpers (:func:`clr_transform`, :func:`tfidf_transform`) take a matrix and return a new one of
  the same kind (``scipy.sparse`` in, CSR out; dense in, dense out); the AnnData functions are built on them.
* Everything is sparse-safe: CLR, normalisation and TF-IDF keep the sparsity pattern (each maps 0 to 0), LSI runs a
  randomized SVD on the sparse matrix, and PCA on sparse input centres implicitly (scanpy), so nothing is densified.
* Bad input raises :class:`spfm.errors.DataError` naming the key (``X``, ``layers["counts"]``, ``obs["batch"]``).

Order for raw counts, as the SpatialGlue and CellScape references do it: HVGs on raw counts first (``seurat_v3``
needs integers), then :func:`normalize_log1p` (which keeps the counts in ``layers["counts"]``), then :func:`pca`.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.preprocessing import normalize as _row_normalize
from sklearn.utils.extmath import randomized_svd

from spfm.errors import DataError

logger = logging.getLogger(__name__)

#: Layer where :func:`normalize_log1p` and :func:`clr` keep the raw counts they replace.
COUNTS_LAYER = "counts"

Matrix = np.ndarray | sp.spmatrix | sp.sparray


def _key(layer: str | None) -> str:
    return "X" if layer is None else f'layers["{layer}"]'


def _get_matrix(adata: ad.AnnData, layer: str | None) -> Matrix:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        known = ", ".join(adata.layers.keys()) or "none"
        raise DataError(f"layer {layer!r} not found (layers here: {known})", field=_key(layer))
    return adata.layers[layer]


def _values(X: Matrix) -> np.ndarray:
    """The stored values of a matrix (the non-zeros of a sparse one): enough to check finiteness and sign."""
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def _check_nonnegative(X: Matrix, field: str) -> None:
    values = _values(X)
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise DataError(f"{int(np.sum(~np.isfinite(values)))} NaN or infinite value(s)", field=field)
    if values.min() < 0:
        raise DataError(f"negative value {values.min()}: expected counts", field=field)


def _check_integer_counts(X: Matrix, field: str) -> None:
    _check_nonnegative(X, field)
    values = _values(X)
    fractional = values != np.round(values)
    if np.any(fractional):
        example = float(values[np.argmax(fractional)])
        raise DataError(
            f"seurat_v3 HVG selection needs raw integer counts, found {int(fractional.sum())} non-integer value(s)"
            f" (e.g. {example:.4g}); pass layer='counts' or select HVGs before normalising",
            field=field,
        )


def _keep_counts(adata: ad.AnnData, layer: str | None, keep_counts: bool, counts_layer: str) -> str:
    """Copy ``X`` to ``layers[counts_layer]`` before it is overwritten; say what happened (for the log line)."""
    if not keep_counts or layer is not None:
        return ""
    if counts_layer in adata.layers:
        return f"; layers[{counts_layer!r}] already present, kept as is"
    adata.layers[counts_layer] = adata.X.copy()
    return f"; raw counts copied to layers[{counts_layer!r}]"


def _row_sums(X: Matrix) -> np.ndarray:
    return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()


def _scale_rows(X: Matrix, factors: np.ndarray) -> Matrix:
    """Multiply row i of X by factors[i]; CSR stays CSR with the same pattern."""
    if sp.issparse(X):
        return sp.csr_matrix(sp.diags(factors) @ sp.csr_matrix(X, dtype=np.float64))
    return np.asarray(X, dtype=np.float64) * factors[:, None]


def normalize_log1p(
    adata: ad.AnnData,
    *,
    target_sum: float = 1e4,
    layer: str | None = None,
    keep_counts: bool = True,
    counts_layer: str = COUNTS_LAYER,
) -> None:
    """Library-size normalise each spot to ``target_sum`` and take log1p (scanpy's ``normalize_total`` + ``log1p``).

    ``X[i, j] <- log1p(counts[i, j] / sum_j counts[i, j] * target_sum)``; spots with no counts stay 0.

    Args:
        adata: counts in ``X`` (N, G), or in ``layers[layer]``.
        target_sum: counts per spot after normalisation (1e4 in SpatialGlue, CellScape and HisToSGE).
        layer: read the counts from this layer instead of ``X`` (the result still goes to ``X``).
        keep_counts: when reading from ``X``, copy it to ``layers[counts_layer]`` first (an existing layer of that
            name is left untouched).
        counts_layer: where the counts are kept.

    Writes: ``X`` (float32, sparse when the input is), ``uns["log1p"]`` (scanpy's marker that X is log data),
    ``layers[counts_layer]`` when ``keep_counts``.
    """
    if not target_sum > 0:
        raise DataError(f"target_sum must be positive, got {target_sum}", field="target_sum")
    if layer is None and "log1p" in adata.uns:
        raise DataError("X is already log-transformed (uns['log1p'] is set); pass layer='counts' to start from the"
                        " raw counts", field='uns["log1p"]')
    counts = _get_matrix(adata, layer)
    _check_nonnegative(counts, _key(layer))
    kept = _keep_counts(adata, layer, keep_counts, counts_layer)
    totals = _row_sums(counts)
    empty = int(np.sum(totals == 0))
    factors = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    X = _scale_rows(counts, factors)
    if sp.issparse(X):
        X.data = np.log1p(X.data)
        X = X.astype(np.float32)
    else:
        X = np.log1p(X).astype(np.float32)
    adata.X = X
    adata.uns["log1p"] = {"base": None}
    logger.info("normalize_log1p: X <- log1p(%s / total * %g)%s%s", _key(layer), target_sum, kept,
                f"; {empty} spot(s) with no counts left at 0" if empty else "")


def highly_variable_genes(
    adata: ad.AnnData,
    n_top_genes: int = 3000,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    subset: bool = False,
) -> None:
    """Highly variable genes by scanpy's ``seurat_v3`` flavour (variance of standardised raw counts after a loess
    fit of log variance on log mean; with ``batch_key``, genes are ranked by how many batches select them, then by
    median rank).

    Args:
        adata: raw integer counts in ``X`` or ``layers[layer]`` (N, G).
        n_top_genes: how many genes to select; all genes when the panel is smaller (as CellScape prescribes).
        layer: read the counts from this layer.
        batch_key: ``obs`` column with the batch (sample) of each spot.
        subset: drop the genes not selected.

    Writes: ``var["highly_variable"]``, ``var["highly_variable_rank"]``, ``var["means"]``, ``var["variances"]``,
    ``var["variances_norm"]`` (and ``var["highly_variable_nbatches"]`` with ``batch_key``), ``uns["hvg"]``; with
    ``subset`` the AnnData keeps only the selected genes.

    Raises:
        DataError: a missing layer or batch column, or counts that are not non-negative integers.
    """
    # Imported here: scanpy is slow to import and only this function and pca need it.
    import scanpy as sc

    if n_top_genes < 1:
        raise DataError(f"n_top_genes must be at least 1, got {n_top_genes}", field="n_top_genes")
    counts = _get_matrix(adata, layer)
    if batch_key is not None and batch_key not in adata.obs:
        raise DataError(f"batch column {batch_key!r} not found", field=f'obs["{batch_key}"]')
    _check_integer_counts(counts, _key(layer))
    n_vars = adata.n_vars
    n = min(int(n_top_genes), n_vars)
    try:
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n, layer=layer, batch_key=batch_key,
                                    subset=subset, check_values=False)
    except ValueError as exc:  # skmisc's loess fails on degenerate inputs (too few genes, constant counts)
        raise DataError(f"seurat_v3 HVG selection failed: {exc}", field=_key(layer)) from exc
    logger.info("highly_variable_genes: seurat_v3 on %s selected %d of %d genes%s -> var['highly_variable']%s",
                _key(layer), n, n_vars,
                f" (batch_key={batch_key!r})" if batch_key else "", "; subset to them" if subset else "")


def clr_transform(X: Matrix) -> Matrix:
    """Centred log-ratio per cell (row), as Seurat ``NormalizeData(method="CLR", margin=2)`` and the SpatialGlue
    reference's ``clr_normalize_each_cell`` compute it.

    For a cell with counts x over all P proteins: ``log1p(x / exp(sum_{x_j > 0} log1p(x_j) / P))``. The
    geometric-mean proxy is taken over the cell's P proteins (``axis=1``), dividing by P including zeros. Note that
    muon's ``pt.clr`` defaults to the other margin (per protein, ``axis=0``); this is not that.

    Args:
        X: (N, P) non-negative counts, dense or sparse.

    Returns:
        (N, P) float64, CSR when X is sparse (0 maps to 0, so the pattern is kept), else dense.
    """
    n_features = X.shape[1]
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64)
        logs = X.copy()
        logs.data = np.log1p(logs.data)
        geo = np.exp(_row_sums(logs) / n_features)
        out = _scale_rows(X, 1.0 / geo)
        out.data = np.log1p(out.data)
        return out
    X = np.asarray(X, dtype=np.float64)
    geo = np.exp(np.log1p(X).sum(axis=1) / n_features)  # log1p(0) = 0, so this is the sum over x > 0
    return np.log1p(X / geo[:, None])


def clr(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    keep_counts: bool = True,
    counts_layer: str = COUNTS_LAYER,
) -> None:
    """CLR-normalise protein (ADT) counts per cell (see :func:`clr_transform` for the formula and margin).

    Args:
        adata: protein counts in ``X`` or ``layers[layer]`` (N, P).
        layer: read the counts from this layer.
        keep_counts: when reading from ``X``, copy it to ``layers[counts_layer]`` first.
        counts_layer: where the counts are kept.

    Writes: ``X`` (float32, sparse when the input is), ``uns["clr"]`` (``{"axis": 1, "n_features": P}``),
    ``layers[counts_layer]`` when ``keep_counts``.
    """
    counts = _get_matrix(adata, layer)
    _check_nonnegative(counts, _key(layer))
    kept = _keep_counts(adata, layer, keep_counts, counts_layer)
    adata.X = clr_transform(counts).astype(np.float32)
    adata.uns["clr"] = {"axis": 1, "n_features": int(adata.n_vars)}
    logger.info("clr: X <- CLR of %s per cell over %d features%s", _key(layer), adata.n_vars, kept)


def tfidf_transform(X: Matrix) -> Matrix:
    """TF-IDF as in Seurat v3 / the SpatialGlue reference: ``tf = x / row sum``, ``idf = N / column sum``.

    Features with no counts at all get idf 0 (the reference would produce NaN from 0 * inf).

    Args:
        X: (N, P) non-negative counts, no all-zero rows.

    Returns:
        (N, P) float64, CSR when X is sparse, else dense.
    """
    row = _row_sums(X)
    col = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    idf = np.divide(X.shape[0], col, out=np.zeros_like(col), where=col > 0)
    if sp.issparse(X):
        return sp.csr_matrix(_scale_rows(X, 1.0 / row) @ sp.diags(idf))
    return _scale_rows(X, 1.0 / row) * idf[None, :]


def lsi(
    adata: ad.AnnData,
    n_components: int = 50,
    *,
    layer: str | None = None,
    mask_var: str | None = None,
    drop_first: bool = True,
    scale: bool = True,
    random_state: int = 0,
    key_added: str = "X_lsi",
) -> None:
    """Latent semantic indexing of chromatin peak counts, step for step as the SpatialGlue reference's ``lsi``:

    1. TF-IDF (:func:`tfidf_transform`),
    2. L1-normalise each row,
    3. ``log1p(1e4 * x)``,
    4. randomized SVD (``sklearn.utils.extmath.randomized_svd``) with ``n_components + drop_first`` components,
       keeping the left singular vectors U (not U * S: every component gets equal weight),
    5. when ``scale``: standardise each row of U over its components (mean 0, std 1 with ddof=1), before dropping,
    6. when ``drop_first``: drop the first component, which tracks sequencing depth.

    SpatialGlue's setting is ``n_components=50, drop_first=True`` (the reference asks for 51 and drops one).
    The correlation of every component with log depth is recorded so a user can see that dropping the first is right.

    Args:
        adata: peak counts in ``X`` or ``layers[layer]`` (N, P), sparse is fine (never densified).
        n_components: output dimensions.
        layer: read the counts from this layer.
        mask_var: a boolean ``var`` column restricting the peaks used (e.g. ``"highly_variable"``); None uses all.
        drop_first: compute one extra component and drop the first.
        scale: row-standardise as the reference does.
        random_state: seed of the randomized SVD.
        key_added: ``obsm`` key for the result.

    Writes: ``obsm[key_added]`` (N, n_components) float32; ``uns["lsi"]`` with ``n_components``, ``drop_first``,
    ``scale``, ``singular_values`` (all computed components) and ``depth_correlation`` (Pearson r of each computed
    singular vector, before row scaling, with log1p of the spot's total counts).
    """
    counts = _get_matrix(adata, layer)
    field = _key(layer)
    _check_nonnegative(counts, field)
    if mask_var is not None:
        if mask_var not in adata.var:
            raise DataError(f"var column {mask_var!r} not found", field=f'var["{mask_var}"]')
        counts = counts[:, np.asarray(adata.var[mask_var], dtype=bool)]
    totals = _row_sums(counts)
    if np.any(totals == 0):
        raise DataError(f"{int(np.sum(totals == 0))} spot(s) have no counts; TF-IDF divides by the row sum, filter"
                        " them first", field=field)
    n_compute = int(n_components) + int(drop_first)
    if n_components < 1 or n_compute >= min(counts.shape) or (scale and n_compute < 2):
        raise DataError(f"n_components + drop_first must be in [{1 + int(scale)}, min(n_spots, n_peaks) - 1] = "
                        f"[{1 + int(scale)}, {min(counts.shape) - 1}] (row scaling needs two), got {n_compute}",
                        field="n_components")
    X = _row_normalize(tfidf_transform(counts), norm="l1")
    if sp.issparse(X):
        X.data = np.log1p(X.data * 1e4)
    else:
        X = np.log1p(X * 1e4)
    U, S, _ = randomized_svd(X, n_compute, random_state=random_state)
    depth = np.log1p(totals)
    corr = [float(np.corrcoef(U[:, i], depth)[0, 1]) for i in range(n_compute)]
    if scale:
        U = (U - U.mean(axis=1, keepdims=True)) / U.std(axis=1, ddof=1, keepdims=True)
    adata.obsm[key_added] = U[:, int(drop_first):].astype(np.float32)
    adata.uns["lsi"] = {"n_components": int(n_components), "drop_first": bool(drop_first), "scale": bool(scale),
                        "singular_values": S.astype(np.float64), "depth_correlation": np.asarray(corr)}
    logger.info("lsi: obsm[%r] <- %d LSI components of %s%s (depth correlation of the first computed: %.2f)",
                key_added, n_components, field, ", first dropped" if drop_first else "", corr[0])


def pca(
    adata: ad.AnnData,
    n_comps: int = 50,
    *,
    layer: str | None = None,
    mask_var: str | None = None,
    zero_center: bool = True,
    random_state: int = 0,
    key_added: str = "X_pca",
) -> None:
    """PCA to ``n_comps`` (scanpy's ``pp.pca``; sparse input is centred implicitly, never densified).

    Args:
        adata: features in ``X`` or ``layers[layer]`` (N, G).
        n_comps: number of components, below min(N, G).
        layer: use this layer instead of ``X``.
        mask_var: a boolean ``var`` column restricting the genes (e.g. ``"highly_variable"``); None uses all genes
            (unlike scanpy, whose default silently uses ``highly_variable`` when present).
        zero_center: centre the features (False gives a truncated SVD).
        random_state: solver seed.
        key_added: ``obsm`` key for the scores.

    Writes: ``obsm[key_added]`` (N, n_comps) float32; loadings in ``varm["PCs"]`` and ``uns["pca"]`` (variance,
    variance_ratio) for the default key, else in ``varm[key_added]`` and ``uns[key_added]``.
    """
    import scanpy as sc

    X = _get_matrix(adata, layer)
    values = _values(X)
    if values.size and not np.all(np.isfinite(values)):
        raise DataError(f"{int(np.sum(~np.isfinite(values)))} NaN or infinite value(s)", field=_key(layer))
    if mask_var is not None and mask_var not in adata.var:
        raise DataError(f"var column {mask_var!r} not found", field=f'var["{mask_var}"]')
    n_vars = adata.n_vars if mask_var is None else int(np.sum(adata.var[mask_var]))
    if not 1 <= n_comps < min(adata.n_obs, n_vars):
        raise DataError(f"n_comps must be in [1, min(n_obs, n_vars) - 1] = [1, {min(adata.n_obs, n_vars) - 1}],"
                        f" got {n_comps}", field="n_comps")
    sc.pp.pca(adata, n_comps=n_comps, layer=layer, mask_var=mask_var, zero_center=zero_center,
              random_state=random_state, key_added=None if key_added == "X_pca" else key_added)
    logger.info("pca: obsm[%r] <- %d components of %s over %d genes", key_added, n_comps, _key(layer), n_vars)
