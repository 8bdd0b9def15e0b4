"""Resolution-enhancement baselines and scores (soScope's comparison methods, Li, Bao et al. 2024).

Every baseline maps spot-level values ``X`` (N, G) to subspot values (M, G) on the scale of one subspot: for
counts (``reduce="sum"``, a spot is the sum of its subspots) a spot's value is divided by its number of subspots;
for continuous values (``reduce="mean"``) it is used as is.

* :func:`parent_copy`: every subspot gets its parent's per-subspot value.
* :func:`spatial_linear`: piecewise-linear interpolation of the per-subspot spot values over the spot centres
  (Delaunay, scipy ``LinearNDInterpolator``), nearest spot outside the convex hull.
* :func:`image_mlp`: an MLP (hidden (128, 32), the paper's) trained at spot level on the mean image feature of a
  spot's subspots, applied to each subspot's features.
* :func:`joint_mlp`: the same on [image features, position] (positions scaled by the spot pitch).

:func:`enhancement_scores` gives the paper's metrics per feature: Pearson r and MSE after min-max normalising
both vectors, averaged over the features (constant features skipped for Pearson), and with the subspots' parents
the Pearson r of the deviations from the spot means (what a method adds to the parent copy).
"""

from __future__ import annotations

import numpy as np


def _per_subspot(X: np.ndarray, parent: np.ndarray, reduce: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if reduce == "sum":
        k = np.bincount(parent, minlength=len(X)).astype(np.float64)
        return X / np.maximum(k, 1)[:, None]
    return X


def parent_copy(X: np.ndarray, parent: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """(M, G): each subspot = its parent spot's per-subspot value."""
    return _per_subspot(X, parent, reduce)[parent]


def spatial_linear(X: np.ndarray, spot_xy: np.ndarray, sub_xy: np.ndarray, parent: np.ndarray,
                   reduce: str = "sum") -> np.ndarray:
    """(M, G): linear interpolation of per-subspot spot values at the subspot centres."""
    from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator

    V = _per_subspot(X, parent, reduce)
    lin = LinearNDInterpolator(spot_xy, V)(sub_xy)
    near = NearestNDInterpolator(spot_xy, V)(sub_xy)
    return np.where(np.isnan(lin), near, lin)


def _mlp(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    sx = StandardScaler().fit(train_x)
    mu, sd = train_y.mean(axis=0), train_y.std(axis=0) + 1e-8
    mlp = MLPRegressor(hidden_layer_sizes=(128, 32), max_iter=500, early_stopping=False, random_state=seed)
    mlp.fit(sx.transform(train_x), (train_y - mu) / sd)
    pred = mlp.predict(sx.transform(test_x))
    return pred.reshape(len(test_x), -1) * sd + mu


def _spot_mean(F: np.ndarray, parent: np.ndarray, n: int) -> np.ndarray:
    s = np.zeros((n, F.shape[1]))
    np.add.at(s, parent, F)
    return s / np.maximum(np.bincount(parent, minlength=n), 1)[:, None]


def image_mlp(X: np.ndarray, features: np.ndarray, parent: np.ndarray, reduce: str = "sum",
              seed: int = 0, nonnegative: bool = True) -> np.ndarray:
    """(M, G): MLP from image features to per-subspot values, trained on spot means of the features."""
    F = np.asarray(features, dtype=np.float64)
    V = _per_subspot(X, parent, reduce)
    pred = _mlp(_spot_mean(F, parent, len(V)), V, F, seed)
    return np.maximum(pred, 0) if nonnegative else pred


def joint_mlp(X: np.ndarray, features: np.ndarray, spot_xy: np.ndarray, sub_xy: np.ndarray, parent: np.ndarray,
              reduce: str = "sum", seed: int = 0, nonnegative: bool = True) -> np.ndarray:
    """(M, G): MLP on [image features, position] (spots: mean features and spot centre)."""
    F = np.asarray(features, dtype=np.float64)
    V = _per_subspot(X, parent, reduce)
    train = np.concatenate([_spot_mean(F, parent, len(V)), spot_xy], axis=1)
    test = np.concatenate([F, sub_xy], axis=1)
    pred = _mlp(train, V, test, seed)
    return np.maximum(pred, 0) if nonnegative else pred


def enhancement_scores(pred: np.ndarray, truth: np.ndarray, parent: np.ndarray | None = None) -> dict[str, float]:
    """Mean over features of Pearson r and of the MSE between min-max normalised prediction and truth.

    With ``parent`` (M,) (each subspot's spot), also ``within_spot_pearson``: the mean over features of Pearson r
    between the prediction's and the truth's deviations from their spot means, i.e. how much of the structure INSIDE
    the spots a method recovers (the parent copy has none: its deviations are all zero, so it scores NaN and is left
    out). A prediction beats the copy's Pearson only if its deviations track the truth's; this says whether they do.
    """
    P = np.asarray(pred, dtype=np.float64)
    T = np.asarray(truth, dtype=np.float64)
    if P.shape != T.shape:
        raise ValueError(f"prediction {P.shape} and truth {T.shape} differ in shape")
    rs, mses = [], []
    for g in range(T.shape[1]):
        p, t = P[:, g], T[:, g]
        if np.ptp(p) > 0 and np.ptp(t) > 0:
            rs.append(float(np.corrcoef(p, t)[0, 1]))
        pn = (p - p.min()) / np.ptp(p) if np.ptp(p) > 0 else np.zeros_like(p)
        tn = (t - t.min()) / np.ptp(t) if np.ptp(t) > 0 else np.zeros_like(t)
        mses.append(float(np.mean((pn - tn) ** 2)))
    out = {"pearson": float(np.mean(rs)) if rs else float("nan"), "mse_minmax": float(np.mean(mses)),
           "n_features_pearson": len(rs)}
    if parent is not None:
        parent = np.asarray(parent)
        if parent.shape != (P.shape[0],):
            raise ValueError(f"parent must have one entry per subspot ({P.shape[0]}), got shape {parent.shape}")
        n = int(parent.max()) + 1
        dp, dt = P - _spot_mean(P, parent, n)[parent], T - _spot_mean(T, parent, n)[parent]
        ok = (dp.std(0) > 1e-12) & (dt.std(0) > 1e-12)
        within = [float(np.corrcoef(dp[:, g], dt[:, g])[0, 1]) for g in np.flatnonzero(ok)]
        out["within_spot_pearson"] = float(np.mean(within)) if within else float("nan")
    return out
