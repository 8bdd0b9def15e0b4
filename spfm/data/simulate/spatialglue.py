"""The SpatialGlue paper's two-modality simulation (Long et al., Nat. Methods 2024, Fig. 2a-d, settings 1-5).

Reconstructed from the paper's supplement and the nonnegative spatial factorisation (NSF) simulation it builds on:

* Four binary spatial factors on a 6 x 6 base pattern (row-major cell indices 0..35), each upsampled by a Kronecker
  product with a ``block x block`` block of ones (``block=6``: a 36 x 36 grid, 1,296 spots). The factors do not
  overlap, so the ground truth ``1*f1 + 2*f2 + 3*f3 + 4*f4`` has five classes, 0 = background.
* Three non-spatial factors per modality, ``U ~ Bernoulli(0.2)`` (modality 1) and ``Bernoulli(0.25)`` (modality 2).
* Each feature is assigned to one spatial and one non-spatial factor; the expression mean (20) is split between
  them as in NSF's generator (``gen_loadings``, ``mix_frac_spat=0.55``): loading 11 on the spatial factor, 9 on the
  non-spatial one (``spatial_fraction``; an earlier version put the full 20 on both).
  Factors 1, 3 and 4 load only on modality 1 and factor 2 only on modality 2 (the other modality's loadings on
  them are zero), so no single modality recovers all five classes: only an integration does.
* Mean ``mu = background + F W^T + U V^T``; counts are negative binomial with size ``r = 10`` (mean mu, variance
  ``mu + mu^2 / r``). Modality 1 (transcriptome-like, 1,000 features) is zero-inflated with ``pi = 0.5``;
  modality 2 (proteome-like, 100 features) is not. Gaussian noise ``N(2, 0.5)`` is added to both, clipped at 0
  (so values are non-negative reals, not integers).
* Background mean per setting: modality 1 0.2/0.3/0.4/0.5/0.6, modality 2 0.4/0.5/0.6/0.7/0.8 for settings 1-5.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from spfm.errors import DataError

#: Active cells of the 6 x 6 base pattern of each spatial factor (row-major indices).
FACTOR_CELLS: tuple[tuple[int, ...], ...] = (
    (1, 6, 7, 8, 13),
    (3, 4, 5, 9, 11, 15, 16, 17),
    (18, 24, 25, 30, 31, 32),
    (21, 22, 23, 28, 34),
)
#: Background means (modality 1, modality 2) of settings 1-5.
BACKGROUND: dict[int, tuple[float, float]] = {1: (0.2, 0.4), 2: (0.3, 0.5), 3: (0.4, 0.6), 4: (0.5, 0.7),
                                              5: (0.6, 0.8)}
#: Which spatial factors (0-based) each modality sees.
VISIBLE: tuple[tuple[int, ...], tuple[int, ...]] = ((0, 2, 3), (1,))
LABEL_NAMES = ("background", "factor1", "factor2", "factor3", "factor4")


def spatial_factors(block: int = 6) -> np.ndarray:
    """(N, 4) binary spatial factors on the ``(6 * block)``-square grid, rows in row-major grid order."""
    base = np.zeros((len(FACTOR_CELLS), 36))
    for f, cells in enumerate(FACTOR_CELLS):
        base[f, list(cells)] = 1.0
    ones = np.ones((block, block))
    return np.stack([np.kron(b.reshape(6, 6), ones).ravel() for b in base], axis=1)


def _modality(rng: np.random.Generator, F: np.ndarray, visible: tuple[int, ...], n_features: int, p_u: float,
              background: float, mean_expression: float, zero_inflation: float, nb_r: float,
              spatial_fraction: float) -> np.ndarray:
    n = F.shape[0]
    n_spatial, n_nonspatial = F.shape[1], 3
    U = (rng.random((n, n_nonspatial)) < p_u).astype(np.float64)
    # Each feature gets one spatial and one non-spatial factor, in balanced random groups.
    spatial_of = rng.permutation(np.arange(n_features) % n_spatial)
    nonspatial_of = rng.permutation(np.arange(n_features) % n_nonspatial)
    W = np.zeros((n_features, n_spatial))
    W[np.arange(n_features), spatial_of] = spatial_fraction * mean_expression
    W[:, [f for f in range(n_spatial) if f not in visible]] = 0.0  # factors this modality must not see
    V = np.zeros((n_features, n_nonspatial))
    V[np.arange(n_features), nonspatial_of] = (1.0 - spatial_fraction) * mean_expression
    mu = background + F @ W.T + U @ V.T
    counts = rng.negative_binomial(nb_r, nb_r / (nb_r + mu)).astype(np.float64)
    if zero_inflation > 0:
        counts[rng.random(counts.shape) < zero_inflation] = 0.0
    return np.clip(counts + rng.normal(2.0, 0.5, counts.shape), 0.0, None).astype(np.float32)


def spatialglue_simulation(setting: int = 1, seed: int = 0, *, block: int = 6,
                           n_features: tuple[int, int] = (1000, 100), mean_expression: float = 20.0, nb_r: float = 10.0,
                           zero_inflation: float = 0.5,
                           spatial_fraction: float = 0.55) -> tuple[ad.AnnData, ad.AnnData]:
    """Simulate one of the paper's five two-modality datasets.

    Args:
        setting: 1-5, which background means to use (noise grows with the setting).
        seed: seed of every random draw; the same seed gives identical data.
        block: side of the block each base cell is upsampled to (6: 36 x 36 = 1,296 spots as in the paper; larger
            blocks give bigger grids for scaling tests).
        n_features: features of modality 1 (transcriptome-like) and modality 2 (proteome-like).
        mean_expression: expression mean a feature's two factors share (20).
        spatial_fraction: the share of ``mean_expression`` on the spatial factor, the rest on the non-spatial one
            (NSF's ``mix_frac_spat``, 0.55: loadings 11 and 9).
        nb_r: negative-binomial size.
        zero_inflation: dropout probability of modality 1.

    Returns:
        ``(rna, protein)``: two AnnData over the same spots (same ``obs_names``), values in ``X`` (N, G) float32,
        ``obsm["spatial"]`` (N, 2) grid (x = column, y = row), ``obs[["array_row", "array_col"]]``, and the ground
        truth ``obs["ground_truth"]`` (categorical, 5 classes) and ``obs["label"]`` (int 0-4); ``uns["simulation"]``
        records the parameters. Modality 2 has features named ``P0..``, modality 1 ``G0..``.
    """
    if setting not in BACKGROUND:
        raise DataError(f"setting must be one of 1-5, got {setting!r}", field="setting")
    if not 0.0 <= spatial_fraction <= 1.0:
        raise DataError(f"spatial_fraction must be in [0, 1], got {spatial_fraction!r}", field="spatial_fraction")
    if int(block) != block or block < 1:
        raise DataError(f"block must be a positive integer, got {block!r}", field="block")
    rng = np.random.default_rng(seed)
    F = spatial_factors(int(block))
    side = 6 * int(block)
    rows, cols = np.divmod(np.arange(side * side), side)
    label = (F * np.arange(1, 5)).sum(axis=1).astype(np.int64)
    obs = pd.DataFrame({"array_row": rows, "array_col": cols, "label": label,
                        "ground_truth": pd.Categorical.from_codes(label, LABEL_NAMES)},
                       index=[f"spot{i}" for i in range(side * side)])
    bg1, bg2 = BACKGROUND[setting]
    out = []
    for m, (nf, p_u, bg, zi, prefix) in enumerate([(n_features[0], 0.2, bg1, zero_inflation, "G"),
                                                   (n_features[1], 0.25, bg2, 0.0, "P")]):
        X = _modality(rng, F, VISIBLE[m], int(nf), p_u, bg, mean_expression, zi, nb_r, spatial_fraction)
        a = ad.AnnData(X, obs=obs.copy(), var=pd.DataFrame(index=[f"{prefix}{j}" for j in range(int(nf))]))
        a.obsm["spatial"] = np.stack([cols, rows], axis=1).astype(np.float64)
        a.uns["simulation"] = {"name": "spatialglue", "setting": int(setting), "seed": int(seed), "modality": m + 1,
                               "background": bg, "zero_inflation": zi, "nb_r": nb_r,
                               "mean_expression": mean_expression, "spatial_fraction": spatial_fraction,
                               "block": int(block)}
        out.append(a)
    return out[0], out[1]
