"""Per-modality preprocessing of the SpatialGlue reference, fitted once and replayable on new spots.

- ``rna``: HVGs (scanpy ``seurat_v3``) on raw counts (all genes when the panel is not larger than ``n_hvg``),
  ``normalize_total(1e4)`` + ``log1p`` over all kept genes, per-gene scaling (mean 0, std 1, ddof 1; skipped for
  Stereo-CITE-seq), subset to the HVGs, PCA to ``n_comps``.
- ``protein``: CLR per spot (:func:`spfm.data.preprocess.clr_transform`), scaling, PCA to ``n_comps``.
- ``atac`` (chromatin peaks, histone marks): TF-IDF, L1 rows, ``log1p(1e4 x)``, randomized SVD with ``n_comps + 1``
  components, rows standardised, the first (depth) component dropped -- the steps of
  :func:`spfm.data.preprocess.lsi`, repeated here because applying the head to new spots needs the peak weights
  (idf) and right singular vectors, which that function does not keep.

The fitted state is split as the head contract asks: names and settings (JSON) in :class:`FittedModality`, arrays
(scaling statistics, PCA loadings, idf, singular vectors) in ``arrays``, which the head stores as module buffers.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.preprocessing import normalize as _row_normalize
from sklearn.utils.extmath import randomized_svd

from spfm.data import preprocess as pp
from spfm.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class FittedModality:
    """JSON-able preprocessing state of one modality (the arrays live in the module's buffers)."""

    name: str
    kind: str
    n_comps: int
    scale: bool
    features: list[str]                       # input features kept (library size / CLR / TF-IDF over these)
    selected: list[str] = field(default_factory=list)  # rna: the HVGs fed to PCA (subset of ``features``)
    target_sum: float = 1e4
    array_shapes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _counts(adata: ad.AnnData, name: str) -> tuple[np.ndarray | sp.csr_matrix, str]:
    """Raw values: ``layers["counts"]`` when present, else ``X``; checked for NaN and negatives."""
    key = 'layers["counts"]' if "counts" in adata.layers else "X"
    X = adata.layers["counts"] if "counts" in adata.layers else adata.X
    X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    values = X.data if sp.issparse(X) else X
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{int(bad.sum())} NaN or infinite value(s) in modality {name!r}", field=f"{name}: {key}")
    if values.size and values.min() < 0:
        raise DataError(f"negative value {values.min():.4g} in modality {name!r}: expected counts",
                        field=f"{name}: {key}")
    return X, key


def _column_var(X) -> np.ndarray:
    if sp.issparse(X):
        mean = np.asarray(X.mean(axis=0)).ravel()
        return np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean**2
    return X.var(axis=0)


def _drop_constant(adata: ad.AnnData, X, name: str, key: str, drop: bool):
    """Remove constant features (zero variance over spots): they carry nothing and break scaling and CLR ranks."""
    const = _column_var(X) <= 1e-12 * max(1.0, float(np.abs(X.data if sp.issparse(X) else X).max(initial=0.0)))
    if not const.any():
        return X, list(adata.var_names)
    names = adata.var_names[const]
    example = ", ".join(map(str, names[:5]))
    if const.all():
        raise DataError(f"every feature of modality {name!r} is constant over the spots", field=f"{name}: {key}")
    if not drop:
        raise DataError(f"{int(const.sum())} constant feature(s) in modality {name!r} (e.g. {example}); remove them "
                        "or pass drop_constant=True", field=f"{name}: {key}")
    log.warning("spatialglue: modality %r: dropped %d constant feature(s) of %d (e.g. %s)", name, int(const.sum()),
                len(const), example)
    return X[:, ~const], list(adata.var_names[~const])


def _check_dims(name: str, kind: str, n_comps: int, n_features: int, n_spots: int) -> None:
    need = n_comps + (1 if kind == "atac" else 0)
    if n_features <= need or n_spots <= need:
        raise DataError(f"modality {name!r} ({kind}) has {n_features} usable feature(s) and {n_spots} spot(s), too "
                        f"few for {n_comps} dimensions (needs more than {need} of each); pass a smaller n_comps",
                        field="n_comps")


def _scale_fit(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (ddof 1, as scanpy's ``pp.scale``; a zero std becomes 1)."""
    mean = X.mean(axis=0)
    std = X.std(axis=0, ddof=1) if X.shape[0] > 1 else np.ones(X.shape[1])
    std[std == 0] = 1.0
    return mean, std


def _lognorm(X, target_sum: float) -> np.ndarray:
    totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    factors = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    Y = sp.diags(factors) @ X if sp.issparse(X) else X * factors[:, None]
    return np.log1p(Y.toarray() if sp.issparse(Y) else Y)


def _pca_fit(X: np.ndarray, n_comps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (N, n_comps), mean (G,), loadings (n_comps, G).

    scikit-learn's PCA, as the reference's ``pca()`` calls it, with an exact solver chosen by shape: the shared
    :func:`spfm.data.preprocess.pca` (scanpy, ARPACK) and sklearn's randomized default took 9-10 s for 99
    components of 1,296 x 1,000 on two busy cores (LU / QR iterations), and even a full SVD 0.4-20 s; the
    eigendecomposition of the features x features covariance is one GEMM over the data plus a small eigh, well under a
    second, and exact. Same subspace either way.
    """
    from sklearn.decomposition import PCA

    n, g = X.shape
    solver = "covariance_eigh" if g <= 2000 and n >= g else "randomized"
    pca = PCA(n_components=n_comps, svd_solver=solver, random_state=seed).fit(X)
    return pca.transform(X).astype(np.float32), pca.mean_, pca.components_


def fit_modality(adata: ad.AnnData, name: str, kind: str, *, n_comps: int, scale: bool, n_hvg: int = 3000,
                 drop_constant: bool = True, seed: int = 0) -> tuple[np.ndarray, FittedModality, dict[str, np.ndarray]]:
    """Fit one modality's preprocessing and return its features.

    Args:
        adata: the modality's spots x features, raw counts in ``layers["counts"]`` or ``X``.
        name: the modality's name (for messages and keys).
        kind: ``"rna"``, ``"protein"`` or ``"atac"``.
        n_comps: output dimensions (shared by all modalities).
        scale: standardise features before PCA (rna, protein).
        n_hvg: HVGs for rna.
        drop_constant: drop constant features with a warning (False: DataError).
        seed: PCA / SVD seed.

    Returns:
        ``(features (N, n_comps) float32, FittedModality, arrays)``.
    """
    X, key = _counts(adata, name)
    X, features = _drop_constant(adata, X, name, key, drop_constant)
    _check_dims(name, kind, n_comps, len(features) if kind != "rna" else min(len(features), n_hvg), X.shape[0])
    fitted = FittedModality(name=name, kind=kind, n_comps=int(n_comps), scale=bool(scale), features=features)
    arrays: dict[str, np.ndarray] = {}
    if kind == "rna":
        if len(features) > n_hvg:
            tmp = ad.AnnData(X, var=pd.DataFrame(index=features))
            try:
                pp.highly_variable_genes(tmp, n_top_genes=n_hvg)
            except DataError as exc:
                raise DataError(f"modality {name!r}: {exc}", field=f"{name}: {key}") from None
            hvg = np.asarray(tmp.var["highly_variable"], dtype=bool)
        else:
            log.info("spatialglue: modality %r has %d genes <= n_hvg=%d, all used", name, len(features), n_hvg)
            hvg = np.ones(len(features), dtype=bool)
        fitted.selected = [f for f, h in zip(features, hvg) if h]
        Y = _lognorm(X, fitted.target_sum)[:, hvg]
    elif kind == "protein":
        Y = np.asarray(pp.clr_transform(X.toarray() if sp.issparse(X) else X))
    elif kind == "atac":
        return _fit_lsi(X, fitted, seed)
    else:
        raise DataError(f"unknown modality kind {kind!r}; use one of rna, protein, atac", field="kinds")
    if scale:
        arrays["scale_mean"], arrays["scale_std"] = _scale_fit(Y)
        Y = (Y - arrays["scale_mean"]) / arrays["scale_std"]
    scores, arrays["pca_mean"], arrays["pca_components"] = _pca_fit(Y, n_comps, seed)
    fitted.array_shapes = {k: list(v.shape) for k, v in arrays.items()}
    return scores, fitted, {k: v.astype(np.float32) for k, v in arrays.items()}


def _lsi_input(X, idf: np.ndarray) -> np.ndarray | sp.csr_matrix:
    rows = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    if np.any(rows == 0):
        raise DataError(f"{int(np.sum(rows == 0))} spot(s) have no peak counts; TF-IDF divides by the row sum, "
                        "filter them first", field="atac: X")
    tf = sp.diags(1.0 / rows) @ X if sp.issparse(X) else X / rows[:, None]
    Y = sp.csr_matrix(tf @ sp.diags(idf)) if sp.issparse(tf) else tf * idf[None, :]
    Y = _row_normalize(Y, norm="l1")
    if sp.issparse(Y):
        Y.data = np.log1p(Y.data * 1e4)
        return Y
    return np.log1p(Y * 1e4)


def _lsi_rows(U: np.ndarray) -> np.ndarray:
    U = (U - U.mean(axis=1, keepdims=True)) / U.std(axis=1, ddof=1, keepdims=True)
    return U[:, 1:].astype(np.float32)


def _fit_lsi(X, fitted: FittedModality, seed: int):
    col = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    idf = np.divide(X.shape[0], col, out=np.zeros_like(col), where=col > 0)
    Y = _lsi_input(X, idf)
    U, S, Vt = randomized_svd(Y, fitted.n_comps + 1, random_state=seed)
    arrays = {"idf": idf.astype(np.float32), "svd_components": Vt.astype(np.float32),
              "singular_values": S.astype(np.float32)}
    fitted.array_shapes = {k: list(v.shape) for k, v in arrays.items()}
    return _lsi_rows(U), fitted, arrays


def apply_modality(adata: ad.AnnData, fitted: FittedModality, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Features (N, n_comps) float32 of new spots with the fitted preprocessing (no refitting)."""
    missing = [f for f in fitted.features if f not in adata.var_names]
    if missing:
        raise DataError(f"modality {fitted.name!r} lacks {len(missing)} feature(s) the head was fitted on "
                        f"(e.g. {', '.join(missing[:5])})", field=f"{fitted.name}: var_names")
    sub = adata[:, fitted.features]
    X, _ = _counts(sub, fitted.name)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    if fitted.kind == "atac":
        Y = _lsi_input(X, arrays["idf"])
        U = np.asarray(Y @ arrays["svd_components"].T) / arrays["singular_values"][None, :]
        return _lsi_rows(U)
    if fitted.kind == "rna":
        Y = _lognorm(X, fitted.target_sum)[:, [fitted.features.index(g) for g in fitted.selected]]
    else:
        Y = np.asarray(pp.clr_transform(X.toarray() if sp.issparse(X) else X))
    if fitted.scale:
        Y = (Y - arrays["scale_mean"]) / arrays["scale_std"]
    return ((Y - arrays["pca_mean"]) @ arrays["pca_components"].T).astype(np.float32)
