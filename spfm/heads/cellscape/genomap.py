"""CellScape's genomic map: each cell's expression vector (p,) laid out as a q x q image, q = ceil(sqrt(p)).

Genes are placed on the grid once, from the training data, so that co-expressed genes sit near each other
(genomap, Islam & Xing 2023, as the CellScape paper cites):

1. gene-gene distance ``D_g = 1 - Pearson(X[:, u], X[:, v])`` over cells (p, p); a constant gene has correlation 0
   with every other gene (distance 1) instead of NaN;
2. grid distance ``D_c`` = Euclidean distance between the centres of the q * q grid cells;
3. Gromov-Wasserstein coupling ``T`` (p, q*q) between (D_g, uniform) and (D_c, uniform) with POT, both distance
   matrices scaled to a maximum of 1 so neither dominates the square loss;
4. a hard assignment: each gene takes a grid cell by the largest coupling entries. The paper's "largest entry" per
   gene can put two genes on one cell; we solve the assignment problem on ``-T`` (Hungarian,
   ``scipy.optimize.linear_sum_assignment``), which picks, among one-to-one placements, the one with the most
   coupling mass -- equal to the per-gene argmax whenever that is already one-to-one.

The layout is an int64 vector ``grid_index`` (p,) of flat grid positions (row * q + col), stored as a buffer of
the module, so new data (same gene panel) map the same way. ``q * q - p`` cells stay zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spfm.errors import DataError


def grid_side(n_genes: int) -> int:
    """q = ceil(sqrt(p)), the side of the square map for p genes."""
    return int(math.ceil(math.sqrt(int(n_genes))))


def gene_distance(X: np.ndarray) -> np.ndarray:
    """(p, p) ``1 - Pearson correlation`` between the columns of ``X`` (N, p); constant genes get distance 1."""
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(0, keepdims=True)
    norm = np.linalg.norm(Xc, axis=0)
    Xn = np.divide(Xc, norm, out=np.zeros_like(Xc), where=norm > 0)
    corr = np.clip(Xn.T @ Xn, -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    return 1.0 - corr


def grid_distance(q: int) -> np.ndarray:
    """(q*q, q*q) Euclidean distances between grid cell centres, flat index row * q + col."""
    rr, cc = np.divmod(np.arange(q * q), q)
    xy = np.stack([rr, cc], 1).astype(np.float64)
    return np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))


def genomic_layout(X: np.ndarray, *, max_iter: int = 200, q: int | None = None) -> np.ndarray:
    """Flat grid position (p,) int64 of each gene, by Gromov-Wasserstein + a one-to-one hard assignment.

    Args:
        X: log-normalised expression (N, p), p >= 2.
        max_iter: Gromov-Wasserstein iterations (conditional gradient steps; POT default 1e4 is far more than the
            few tens it needs to converge at p <= 3,000). Deterministic: POT starts from the product coupling.
        q: map side (default ceil(sqrt(p))); a larger q leaves more empty grid cells between genes.
    """
    import ot
    from scipy.optimize import linear_sum_assignment

    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] < 2:
        raise DataError(f"a genomic map needs at least 2 genes, got a panel of shape {X.shape}", field="var_names")
    p = X.shape[1]
    q = grid_side(p) if q is None else int(q)
    if q * q < p:
        raise DataError(f"a {q} x {q} genomic map cannot hold {p} genes", field="map_side")
    Dg = gene_distance(X)
    Dc = grid_distance(q)
    Dg = Dg / max(Dg.max(), 1e-12)
    Dc = Dc / max(Dc.max(), 1e-12)
    a = np.full(p, 1.0 / p)
    b = np.full(q * q, 1.0 / (q * q))
    T = ot.gromov.gromov_wasserstein(Dg, Dc, a, b, loss_fun="square_loss", max_iter=max_iter)
    rows, cols = linear_sum_assignment(-np.asarray(T))
    grid = np.empty(p, dtype=np.int64)
    grid[rows] = cols
    return grid


def to_maps(x: torch.Tensor, grid_index: torch.Tensor, q: int) -> torch.Tensor:
    """(N, 1, q, q) genomic maps from expression ``x`` (N, p) and the layout ``grid_index`` (p,); empty cells 0."""
    maps = x.new_zeros(x.shape[0], q * q)
    maps[:, grid_index] = x
    return maps.view(x.shape[0], 1, q, q)
