"""Metrics for domains and embeddings: label agreement, neighbourhood preservation, spatial autocorrelation.

- :func:`clustering_scores`: NMI, ARI, AMI, homogeneity, completeness and V-measure of predicted labels against
  ground truth (scikit-learn's definitions; NMI with the arithmetic mean, as SpatialGlue and CellScape report).
- :func:`knn_jaccard`: mean Jaccard index between each spot's k nearest neighbours in two spaces (a modality's
  input and the joint embedding), SpatialGlue's measure of how much of each modality an embedding keeps.
- :func:`morans_i`: Moran's I of one or more variables on a spatial graph (sparse weights, never N x N), and
  :func:`cluster_morans_i`, Moran's I of each cluster's indicator: how spatially coherent each domain is.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from spfm.errors import DataError


def _labels(values: np.ndarray, field: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"labels must be one-dimensional, got shape {arr.shape}", field=field)
    return arr


def clustering_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """``{"nmi", "ari", "ami", "homogeneity", "completeness", "v_measure"}`` of ``predicted`` against ``truth``.

    Spots whose truth is missing (NaN / None / empty string) are left out, as annotations often leave some spots
    unlabelled.
    """
    from sklearn import metrics

    truth, predicted = _labels(truth, "truth"), _labels(predicted, "predicted")
    if truth.shape != predicted.shape:
        raise DataError(f"truth has {truth.shape[0]} labels, predicted {predicted.shape[0]}", field="predicted")
    import pandas as pd

    keep = ~pd.isna(truth) & (truth.astype(str) != "")
    if not keep.any():
        raise DataError("no spot has a ground-truth label", field="truth")
    t, p = truth[keep].astype(str), predicted[keep].astype(str)
    h, c, v = metrics.homogeneity_completeness_v_measure(t, p)
    return {
        "nmi": float(metrics.normalized_mutual_info_score(t, p)),
        "ari": float(metrics.adjusted_rand_score(t, p)),
        "ami": float(metrics.adjusted_mutual_info_score(t, p)),
        "homogeneity": float(h),
        "completeness": float(c),
        "v_measure": float(v),
    }


def _knn_indices(X: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    return idx[:, 1:]


def knn_jaccard(A: np.ndarray, B: np.ndarray, k: int = 50) -> float:
    """Mean over rows of |kNN_A(i) & kNN_B(i)| / |kNN_A(i) | kNN_B(i)| (self excluded); A (N, Da), B (N, Db)."""
    if A.shape[0] != B.shape[0]:
        raise DataError(f"the two spaces have {A.shape[0]} and {B.shape[0]} rows", field="B")
    k = min(int(k), A.shape[0] - 1)
    if k < 1:
        raise DataError("need at least two rows", field="A")
    na, nb = _knn_indices(A, k), _knn_indices(B, k)
    inter = np.array([np.intersect1d(a, b, assume_unique=True).size for a, b in zip(na, nb)], dtype=np.float64)
    return float(np.mean(inter / (2 * k - inter)))


def morans_i(values: np.ndarray, weights: sp.spmatrix) -> np.ndarray:
    """Moran's I of each column of ``values`` (N,) or (N, V) on a sparse spatial weight matrix (N, N).

    I = (N / W) * (z' W z) / (z' z) with z the centred variable and W the sum of weights. A constant column gives NaN.
    """
    W = sp.csr_matrix(weights, dtype=np.float64)
    Y = np.asarray(values, dtype=np.float64)
    squeeze = Y.ndim == 1
    Y = Y[:, None] if squeeze else Y
    if W.shape != (Y.shape[0], Y.shape[0]):
        raise DataError(f"weights are {W.shape}, values have {Y.shape[0]} rows", field="weights")
    Z = Y - Y.mean(0, keepdims=True)
    num = np.einsum("ij,ij->j", Z, W @ Z)
    den = np.einsum("ij,ij->j", Z, Z)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (Y.shape[0] / W.sum()) * num / den
    return out[0] if squeeze else out


def cluster_morans_i(labels: np.ndarray, weights: sp.spmatrix) -> dict[str, float]:
    """``{label: Moran's I of the label's 0/1 indicator}`` on the spatial weights (N, N)."""
    labels = _labels(labels, "labels").astype(str)
    names = np.unique(labels)
    indicators = (labels[:, None] == names[None, :]).astype(np.float64)
    return dict(zip(names.tolist(), morans_i(indicators, weights).tolist()))
