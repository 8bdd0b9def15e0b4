"""Graphs over spots and cells, shared by every head, as ``torch_geometric.data.Data``.

Every builder returns ``Data`` with

* ``edge_index`` (2, E) int64, coalesced (sorted by source then target, no duplicates),
* ``edge_weight`` (E,) float32 only when weights were asked for (``weight="distance"``, normalisation),
* ``pos`` (N, 2) float32 (absent only for a feature graph built without coordinates),
* ``num_nodes`` N.

Conventions:

* ``edge_index[:, e] = (j, i)`` carries a message from the source j to the target i (PyG's default
  ``source_to_target`` flow). A directed kNN graph (``symmetric=False``) points from each neighbour to its query
  node, so every node has exactly k incoming edges, as ``torch_cluster.knn_graph`` does.
* Graphs are undirected (both directions of every edge stored) unless ``symmetric=False``; the kNN union rule is
  SpatialGlue's ``A + A^T`` clipped to 1. No self loops unless :func:`add_self_loops` or normalisation adds them.
* As a sparse matrix (:func:`to_scipy`, :func:`to_torch_sparse`), ``A[i, j]`` is the weight of the edge j -> i,
  so ``A @ X`` is PyG's sum aggregation; row normalisation makes each row sum to 1 (a mean over in-neighbours).
* Distances (edge weights, radius, maximum edge length, ``pos``) are in coordinate units times ``scale``: pass the
  pixel size in micrometres as ``scale`` (or ``units="um"`` to :func:`from_adata`) to work in micrometres.
* Nothing builds an N x N dense matrix: neighbours come from KD-trees (scipy ``cKDTree``, sklearn
  ``NearestNeighbors``) and hashed grid lookups, and edges are assembled with vectorised numpy, so a kNN graph over
  1e6 spots takes seconds on two cores.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from scipy.spatial import Delaunay, QhullError, cKDTree
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize as _row_normalize
from torch_geometric.data import Data
from torch_geometric.utils import add_remaining_self_loops, coalesce, to_undirected

from spfm.errors import DataError

logger = logging.getLogger(__name__)

Weight = Literal["distance"] | None
SPATIAL_KEY = 'obsm["spatial"]'

# Visium spots sit on a hexagonal lattice stored in "doubled" coordinates: array_col steps by 2 along a row and
# rows alternate by 1 column, so the six neighbours are (0, +-2) and (+-1, +-1).
HEX_OFFSETS = np.array([(0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)])
SQUARE4_OFFSETS = np.array([(0, -1), (0, 1), (-1, 0), (1, 0)])
SQUARE8_OFFSETS = np.array([(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)])


# ----------------------------------------------------------------------------------------------------- checks


def _points(coords: np.ndarray, field: str = "coords") -> np.ndarray:
    """(N, 2) float64 coordinates, or DataError naming ``field``."""
    try:
        xy = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"coordinates are not numeric: {exc}", field=field) from None
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise DataError(f"expected (n, 2) coordinates, got shape {xy.shape}", field=field)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise DataError(f"{int(bad.sum())} point(s) with NaN or infinite coordinates (first at row "
                        f"{int(np.argmax(bad))})", field=field)
    return xy


def _check_scale(scale: float) -> float:
    if not (np.isfinite(scale) and scale > 0):
        raise DataError(f"scale must be a positive number (coordinate units -> distance units), got {scale}",
                        field="scale")
    return float(scale)


def _check_k(k: int, n: int) -> int:
    if int(k) != k or k < 1:
        raise DataError(f"k must be a positive integer, got {k}", field="k")
    if k >= n:
        raise DataError(f"k={k} must be below the number of points ({n}): each point has at most {n - 1} "
                        "neighbours other than itself", field="k")
    return int(k)


def _check_weight(weight: Weight) -> None:
    if weight not in (None, "distance"):
        raise DataError(f"weight must be None or 'distance', got {weight!r}", field="weight")


# ----------------------------------------------------------------------------------------------------- assembly


def _data(src: np.ndarray, dst: np.ndarray, n: int, pos: np.ndarray | None, weight: np.ndarray | None,
          symmetric: bool) -> Data:
    """Coalesced ``Data`` from edge endpoints (numpy), adding the reverse edges when ``symmetric``."""
    edge_index = torch.from_numpy(np.stack([src, dst]).astype(np.int64))
    w = None if weight is None else torch.from_numpy(np.asarray(weight, dtype=np.float32))
    if symmetric:
        # Weights of builders are symmetric (distances), so reducing the two directions by max changes nothing.
        edge_index, w = to_undirected(edge_index, w, num_nodes=n, reduce="max")
    else:
        edge_index, w = coalesce(edge_index, w, num_nodes=n)
    data = Data(edge_index=edge_index, num_nodes=n)
    if w is not None:
        data.edge_weight = w
    if pos is not None:
        data.pos = torch.from_numpy(np.asarray(pos, dtype=np.float32))
    return data


def _lengths(xy: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    return np.sqrt(((xy[src] - xy[dst]) ** 2).sum(axis=1))


def _knn_edges(dist: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop each point itself from a (N, k+1) neighbour query; (neighbour, query, distance) of the k left."""
    n = idx.shape[0]
    is_self = idx == np.arange(n)[:, None]
    # With more than k duplicates of a point its own index may fall outside the k+1 returned: drop the farthest.
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    return idx[keep], np.repeat(np.arange(n), k), dist[keep]


# ----------------------------------------------------------------------------------------------------- spatial


def knn_graph(coords: np.ndarray, k: int, *, scale: float = 1.0, symmetric: bool = True,
              weight: Weight = None) -> Data:
    """k-nearest-neighbour graph on coordinates (self excluded), by a KD-tree.

    Args:
        coords: (N, 2) point coordinates (pixels, micrometres, ...).
        k: neighbours per point (SpatialGlue: 3, or 6 for Stereo-CITE-seq; CellScape: 6 hex, 8 square).
        scale: multiply coordinates by this first (the pixel size in um gives micrometres).
        symmetric: union of i->j and j->i (each node then has k or more neighbours); False keeps the directed
            graph, neighbour -> query, exactly k incoming edges per node.
        weight: ``"distance"`` stores the Euclidean length of each edge (scaled units).

    Returns:
        ``Data`` with ``edge_index``, ``pos`` (N, 2) = coords * scale, ``num_nodes``, [``edge_weight``].
    """
    xy = _points(coords) * _check_scale(scale)
    k = _check_k(k, len(xy))
    _check_weight(weight)
    dist, idx = cKDTree(xy).query(xy, k=k + 1, workers=-1)
    src, dst, d = _knn_edges(dist, idx, k)
    return _data(src, dst, len(xy), xy, d if weight else None, symmetric)


def radius_graph(coords: np.ndarray, r: float, *, scale: float = 1.0, weight: Weight = None) -> Data:
    """Undirected graph joining every pair of points at most ``r`` apart (scaled units), self excluded.

    Args:
        coords: (N, 2) coordinates.
        r: radius, in coordinate units * scale.
        scale: multiply coordinates by this first.
        weight: ``"distance"`` stores edge lengths.
    """
    xy = _points(coords) * _check_scale(scale)
    if not (np.isfinite(r) and r > 0):
        raise DataError(f"radius must be a positive number, got {r}", field="r")
    _check_weight(weight)
    pairs = cKDTree(xy).query_pairs(float(r), output_type="ndarray")
    src, dst = pairs[:, 0], pairs[:, 1]
    return _data(src, dst, len(xy), xy, _lengths(xy, src, dst) if weight else None, symmetric=True)


def delaunay_graph(coords: np.ndarray, *, scale: float = 1.0, max_edge_length: float | None = None,
                   weight: Weight = None) -> Data:
    """Undirected Delaunay triangulation edges (for irregular layouts: Slide-seq, seqFISH, STARmap, osmFISH).

    A point that coincides with another is left out of the triangulation by qhull; it is joined to the vertex it
    coincides with (qhull's nearest vertex), so no point is isolated.

    Args:
        coords: (N, 2) coordinates, N >= 3, not all on one line.
        scale: multiply coordinates by this first.
        max_edge_length: drop edges longer than this (scaled units): long hull edges across empty space.
        weight: ``"distance"`` stores edge lengths.
    """
    xy = _points(coords) * _check_scale(scale)
    if len(xy) < 3:
        raise DataError(f"a Delaunay triangulation needs at least 3 points, got {len(xy)}", field="coords")
    if max_edge_length is not None and not max_edge_length > 0:
        raise DataError(f"max_edge_length must be positive, got {max_edge_length}", field="max_edge_length")
    _check_weight(weight)
    try:
        tri = Delaunay(xy)
    except QhullError as exc:
        raise DataError(f"Delaunay triangulation failed (all points on one line?): {str(exc).splitlines()[0]}",
                        field="coords") from None
    s = tri.simplices
    src = np.concatenate([s[:, 0], s[:, 1], s[:, 2], tri.coplanar[:, 0]])
    dst = np.concatenate([s[:, 1], s[:, 2], s[:, 0], tri.coplanar[:, 2]])
    if len(tri.coplanar):
        logger.warning("delaunay_graph: %d duplicated point(s) joined to the point they coincide with",
                       len(tri.coplanar))
    lengths = _lengths(xy, src, dst)
    if max_edge_length is not None:
        keep = lengths <= max_edge_length
        src, dst, lengths = src[keep], dst[keep], lengths[keep]
    return _data(src, dst, len(xy), xy, lengths if weight else None, symmetric=True)


def _grid_index(array_row: np.ndarray, array_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer (N,) row and column arrays, or DataError naming the column."""
    out = []
    for name, values in (("array_row", array_row), ("array_col", array_col)):
        try:
            v = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise DataError("array coordinates are not numeric", field=f'obs["{name}"]') from None
        if not np.all(np.isfinite(v)) or np.any(v != np.round(v)):
            raise DataError("array coordinates must be finite integers", field=f'obs["{name}"]')
        out.append(v.astype(np.int64))
    if len(out[0]) != len(out[1]):
        raise DataError(f"array_row has {len(out[0])} entries, array_col {len(out[1])}", field='obs["array_col"]')
    return out[0], out[1]


def _grid_graph(rows: np.ndarray, cols: np.ndarray, offsets: np.ndarray, pos: np.ndarray) -> Data:
    """Join each spot to the spots at the given (d_row, d_col) offsets, by a sorted-key lookup (no dense grid)."""
    n = len(rows)
    # Shift so that every neighbour coordinate is >= 0, then key = row * width + col is unique per position.
    r = rows - rows.min() + 2
    c = cols - cols.min() + 2
    width = int(c.max()) + 3
    keys = r * width + c
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    dup = sorted_keys[1:] == sorted_keys[:-1]
    if dup.any():
        first = order[1:][dup][0]
        raise DataError(f"{int(dup.sum())} spot(s) share array coordinates with another (e.g. row {rows[first]},"
                        f" col {cols[first]})", field='obs["array_row"], obs["array_col"]')
    src_parts, dst_parts = [], []
    for dr, dc in offsets:
        want = (r + dr) * width + (c + dc)
        at = np.minimum(np.searchsorted(sorted_keys, want), n - 1)
        found = sorted_keys[at] == want
        src_parts.append(order[at[found]])
        dst_parts.append(np.flatnonzero(found))
    return _data(np.concatenate(src_parts), np.concatenate(dst_parts), n, pos, None, symmetric=True)


def hex_grid_graph(array_row: np.ndarray, array_col: np.ndarray, *, pos: np.ndarray | None = None) -> Data:
    """Visium hexagonal neighbours from array coordinates: same row ``array_col +- 2``, adjacent rows ``+- 1``.

    Interior spots get 6 neighbours; edge spots fewer.

    Args:
        array_row, array_col: (N,) integer Visium array coordinates (``obs["array_row"]``, ``obs["array_col"]``);
            ``array_row + array_col`` has one parity on a Visium array.
        pos: (N, 2) coordinates to store; default the lattice itself, ``(col / 2, row * sqrt(3) / 2)``, in units of
            the spot pitch.
    """
    rows, cols = _grid_index(array_row, array_col)
    if len(np.unique((rows + cols) % 2)) > 1:
        raise DataError("array_row + array_col mixes even and odd values, so this is not a Visium hexagonal"
                        " (doubled-column) layout; use square_grid_graph or knn_graph", field='obs["array_col"]')
    if pos is None:
        pos = np.stack([cols / 2.0, rows * math.sqrt(3) / 2.0], axis=1)
    return _grid_graph(rows, cols, HEX_OFFSETS, _points(pos, "pos"))


def square_grid_graph(array_row: np.ndarray, array_col: np.ndarray, *, neighbours: Literal[4, 8] = 4,
                      pos: np.ndarray | None = None) -> Data:
    """Square-grid neighbours from integer array coordinates (legacy ST, DBiT-seq, binned Stereo-seq, subspots).

    Args:
        array_row, array_col: (N,) integer grid coordinates, neighbours one step apart.
        neighbours: 4 (rook) or 8 (queen, with diagonals).
        pos: (N, 2) coordinates to store; default ``(col, row)``.
    """
    if neighbours not in (4, 8):
        raise DataError(f"neighbours must be 4 or 8, got {neighbours}", field="neighbours")
    rows, cols = _grid_index(array_row, array_col)
    if pos is None:
        pos = np.stack([cols, rows], axis=1)
    return _grid_graph(rows, cols, SQUARE4_OFFSETS if neighbours == 4 else SQUARE8_OFFSETS, _points(pos, "pos"))


# ----------------------------------------------------------------------------------------------------- features


def _ivf_knn(Z: np.ndarray, k: int, *, n_lists: int | None = None, n_probe: int = 8,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Approximate Euclidean k nearest neighbours (self excluded) of the rows of Z (N, D), inverted-file style.

    k-means (on a sample) splits the points into ``n_lists`` cells (sqrt(N), and N / 400 beyond 160k points); the
    points of each cell are compared, by one dense GEMM, with the points of the ``n_probe`` cells whose centres are
    nearest to that cell's centre, and the k closest kept. Cost ~ N * (n_probe * N / n_lists) * D instead of
    N^2 * D, linear in N beyond 160k points: a million 30-dimensional points in minutes on one core, where the exact
    search takes hours; recall falls as the probed cells cover a smaller share of the data. A true neighbour is
    missed only when it lies in a cell outside the probed ones (recall > 0.9 on clustered embeddings, see
    tests/test_graphs.py; 0.75-0.83 on the noise-dominated simulation features at 10-20k points, 0.88 / 0.975 with
    ``n_probe`` 16 / 32).

    Returns ``(dist (N, k), idx (N, k))`` sorted by distance, as ``NearestNeighbors.kneighbors()``.
    """
    n, _ = Z.shape
    if n_lists is None:  # sqrt(N) cells; beyond 160k points cells of ~400, so the cost per point stays constant
        n_lists = max(int(round(np.sqrt(n))), n // 400)
    n_lists = max(1, min(n // max(4 * k, 1), int(n_lists)))
    n_probe = max(1, min(int(n_probe), n_lists))
    Zt = torch.from_numpy(np.ascontiguousarray(Z, dtype=np.float32))
    sq = (Zt * Zt).sum(1)
    gen = torch.Generator().manual_seed(int(seed))

    def nearest_centre(points: torch.Tensor, points_sq: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        out = torch.empty(points.shape[0], dtype=torch.long)
        c_sq = (centres * centres).sum(1)
        for lo in range(0, points.shape[0], 65536):  # bounded (chunk, n_lists) distance blocks
            d = points_sq[lo:lo + 65536, None] + c_sq[None, :] - 2.0 * points[lo:lo + 65536] @ centres.T
            out[lo:lo + 65536] = d.argmin(1)
        return out

    # k-means (Lloyd, 10 rounds) on a sample of ~64 points per cell: enough to place the cells.
    sample = torch.randperm(n, generator=gen)[: min(n, 64 * n_lists)]
    centres = Zt[sample[torch.randperm(len(sample), generator=gen)[:n_lists]]].clone()
    for _ in range(10):
        lab = nearest_centre(Zt[sample], sq[sample], centres)
        counts = torch.bincount(lab, minlength=n_lists).clamp_(min=1).to(Zt.dtype)
        sums = torch.zeros_like(centres).index_add_(0, lab, Zt[sample])
        moved = sums / counts[:, None]
        empty = torch.bincount(lab, minlength=n_lists) == 0
        centres = torch.where(empty[:, None], centres, moved)  # an empty cell keeps its centre
    assign = nearest_centre(Zt, sq, centres)
    order = torch.argsort(assign, stable=True)
    bounds = torch.zeros(n_lists + 1, dtype=torch.long)
    bounds[1:] = torch.cumsum(torch.bincount(assign, minlength=n_lists), 0)
    c_sq = (centres * centres).sum(1)
    probes = (c_sq[:, None] + c_sq[None, :] - 2.0 * centres @ centres.T).topk(n_probe, dim=1, largest=False).indices
    dist = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for cell in range(n_lists):
        members = order[bounds[cell]:bounds[cell + 1]]
        if len(members) == 0:
            continue
        cand = torch.cat([order[bounds[c]:bounds[c + 1]] for c in probes[cell].tolist()])
        kk = min(k + 1, len(cand))
        # |q|^2 is the same along a row, so the ranking needs only |c|^2 - 2 q.c: one fused addmm per cell.
        d = torch.addmm(sq[cand][None, :], Zt[members], Zt[cand].T, alpha=-2.0)  # (members, candidates)
        vals, pos = d.topk(kk, dim=1, largest=False, sorted=True)
        nb = cand[pos]
        # The point itself is normally among its k + 1 closest (distance 0): drop it, else drop the farthest.
        is_self = nb == members[:, None]
        is_self[~is_self.any(1), -1] = True
        keep = ~is_self
        if kk - 1 < k:  # fewer candidates than k + 1 (tiny inputs): pad with the farthest found
            keep[:, -1] = True
        vals, nb = vals[keep].view(len(members), -1), nb[keep].view(len(members), -1)
        vals = vals.add_(sq[members][:, None])
        if vals.shape[1] < k:
            vals = torch.cat([vals, vals[:, -1:].expand(-1, k - vals.shape[1])], 1)
            nb = torch.cat([nb, nb[:, -1:].expand(-1, k - nb.shape[1])], 1)
        dist[members.numpy()] = vals[:, :k].clamp_(min=0.0).sqrt_().numpy()
        idx[members.numpy()] = nb[:, :k].numpy()
    return dist, idx


def feature_knn_graph(X: np.ndarray | sp.spmatrix, k: int, *,
                      metric: Literal["correlation", "cosine", "euclidean"] = "correlation",
                      symmetric: bool = True, weight: Weight = None, pos: np.ndarray | None = None,
                      algorithm: Literal["exact", "ivf"] = "exact", n_probe: int = 8, seed: int = 0) -> Data:
    """k-nearest-neighbour graph in feature space (self excluded), e.g. on PCA or LSI embeddings.

    Cosine and correlation neighbours are found as Euclidean neighbours of L2-normalised rows (row-centred first
    for correlation), where ``|a - b|^2 = 2 (1 - cos)``, so a KD-tree or sklearn's chunked brute force serves all
    three metrics. SpatialGlue's feature graph is ``metric="correlation", k=20``.

    Args:
        X: (N, D) features; sparse input is accepted for cosine and euclidean, and densified for correlation
            (centring destroys sparsity; pass an embedding, not raw counts).
        k: neighbours per node.
        metric: distance between rows.
        symmetric: union of both directions; False gives k incoming edges per node (neighbour -> query).
        weight: ``"distance"`` stores the metric's distance (1 - r for correlation, 1 - cos for cosine).
        pos: (N, 2) coordinates to store alongside, if any.
        algorithm: ``"exact"`` (KD-tree / chunked brute force) or ``"ivf"``: approximate, cells of a k-means
            partition searched by dense products (:func:`_ivf_knn`), for hundreds of thousands to millions of rows
            where the exact search in tens of dimensions is quadratic. Dense input only.
        n_probe: cells each cell is compared with (``"ivf"``): more is slower and closer to exact.
        seed: seed of the ``"ivf"`` k-means.
    """
    if algorithm not in ("exact", "ivf"):
        raise DataError(f"algorithm must be 'exact' or 'ivf', got {algorithm!r}", field="algorithm")
    if metric not in ("correlation", "cosine", "euclidean"):
        raise DataError(f"metric must be 'correlation', 'cosine' or 'euclidean', got {metric!r}", field="metric")
    _check_weight(weight)
    X = X if sp.issparse(X) else np.asarray(X)
    if X.ndim != 2:
        raise DataError(f"expected (n, d) features, got shape {X.shape}", field="X")
    if not np.all(np.isfinite(X.data if sp.issparse(X) else X)):
        raise DataError("NaN or infinite feature values", field="X")
    n = X.shape[0]
    k = _check_k(k, n)
    Z = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    if metric == "correlation":
        Z = Z.toarray() if sp.issparse(Z) else Z
        Z = Z - Z.mean(axis=1, keepdims=True)
    if metric != "euclidean":
        norms = np.sqrt(np.asarray(Z.multiply(Z).sum(axis=1) if sp.issparse(Z) else (Z**2).sum(axis=1))).ravel()
        if np.any(norms == 0):
            what = "constant" if metric == "correlation" else "all-zero"
            raise DataError(f"{int(np.sum(norms == 0))} row(s) are {what}, so their {metric} distance is undefined",
                            field="X")
        Z = _row_normalize(Z)
    if algorithm == "ivf":
        dist, idx = _ivf_knn(Z.toarray() if sp.issparse(Z) else Z, k, n_probe=n_probe, seed=seed)
    else:
        dist, idx = NearestNeighbors(n_neighbors=k).fit(Z).kneighbors()  # no query: each point excluded
    if metric != "euclidean":
        dist = dist**2 / 2.0
    src, dst = idx.ravel(), np.repeat(np.arange(n), k)
    return _data(src, dst, n, None if pos is None else _points(pos, "pos"), dist.ravel() if weight else None,
                 symmetric)


# ----------------------------------------------------------------------------------------------------- helpers


def _weights(data: Data) -> torch.Tensor:
    w = getattr(data, "edge_weight", None)
    return torch.ones(data.edge_index.shape[1], dtype=torch.float32) if w is None else w


def _like(data: Data, edge_index: torch.Tensor, edge_weight: torch.Tensor | None) -> Data:
    """A copy of ``data`` with new edges (other attributes shared)."""
    out = data.clone()
    out.edge_index = edge_index
    if edge_weight is None:
        if "edge_weight" in out:
            del out.edge_weight
    else:
        out.edge_weight = edge_weight
    return out


def make_symmetric(data: Data, reduce: Literal["max", "min", "mean", "sum"] = "max") -> Data:
    """Add the reverse of every edge; an edge present both ways keeps the ``reduce`` of its two weights."""
    edge_index, w = to_undirected(data.edge_index, getattr(data, "edge_weight", None), num_nodes=data.num_nodes,
                                  reduce=reduce)
    return _like(data, edge_index, w)


def add_self_loops(data: Data, fill_value: float = 1.0) -> Data:
    """Add a loop (i, i) to every node that lacks one, with weight ``fill_value`` when the graph has weights."""
    edge_index, w = add_remaining_self_loops(data.edge_index, getattr(data, "edge_weight", None),
                                             fill_value=fill_value, num_nodes=data.num_nodes)
    edge_index, w = coalesce(edge_index, w, num_nodes=data.num_nodes)
    return _like(data, edge_index, w)


def normalize_adjacency(data: Data, mode: Literal["sym", "row"] = "sym", *, self_loops: bool = True) -> Data:
    """Normalised adjacency as edge weights (missing weights count as 1).

    ``sym``: ``D^-1/2 (A + I) D^-1/2``, what ``GCNConv(normalize=True)`` computes (SpatialGlue's A_hat).
    ``row``: ``D^-1 (A + I)``, each node's incoming weights summing to 1 (mean aggregation).
    D is the weighted in-degree (sum of weights of edges ending at a node), which equals the out-degree on an
    undirected graph; nodes with no edges keep weight 0.

    Args:
        data: the graph.
        mode: ``"sym"`` or ``"row"``.
        self_loops: add a weight-1 loop to every node that has none first (the ``+ I``).

    Returns:
        A ``Data`` with the same nodes and ``edge_weight`` (E',) float32 holding the normalised values.
    """
    if mode not in ("sym", "row"):
        raise DataError(f"mode must be 'sym' or 'row', got {mode!r}", field="mode")
    edge_index, w = data.edge_index, _weights(data).to(torch.float32)
    if self_loops:
        edge_index, w = add_remaining_self_loops(edge_index, w, fill_value=1.0, num_nodes=data.num_nodes)
        edge_index, w = coalesce(edge_index, w, num_nodes=data.num_nodes)
    src, dst = edge_index
    deg = torch.zeros(data.num_nodes, dtype=torch.float32).index_add_(0, dst, w)
    if mode == "sym":
        inv_sqrt = deg.pow(-0.5).masked_fill_(deg == 0, 0.0)
        w = inv_sqrt[src] * w * inv_sqrt[dst]
    else:
        inv = deg.reciprocal().masked_fill_(deg == 0, 0.0)
        w = w * inv[dst]
    return _like(data, edge_index, w)


def to_scipy(data: Data) -> sp.csr_matrix:
    """(N, N) CSR matrix with ``A[i, j]`` = weight of edge j -> i (1 when unweighted), so ``A @ X`` aggregates."""
    src, dst = data.edge_index.numpy()
    return sp.csr_matrix((_weights(data).numpy(), (dst, src)), shape=(data.num_nodes, data.num_nodes))


def to_torch_sparse(data: Data, layout: Literal["coo", "csr"] = "coo") -> torch.Tensor:
    """(N, N) torch sparse tensor, same orientation as :func:`to_scipy` (``torch.sparse.mm(A, X)`` aggregates)."""
    if layout not in ("coo", "csr"):
        raise DataError(f"layout must be 'coo' or 'csr', got {layout!r}", field="layout")
    A = torch.sparse_coo_tensor(data.edge_index.flip(0), _weights(data), (data.num_nodes, data.num_nodes),
                                check_invariants=False)  # indices come from a valid graph
    A = A.coalesce()
    if layout == "coo":
        return A
    with warnings.catch_warnings():  # torch flags CSR as beta on every conversion; the ops spfm uses are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return A.to_sparse_csr()


def feature_distance_weights(data: Data, features: np.ndarray | torch.Tensor, s: float = 5.0) -> Data:
    """soScope's edge weights from feature distances: ``w = exp(-(d - d_min) / delta)``,
    ``delta = (d_median - d_min) / ln(s)``, so the closest pair gets 1 and the median pair ``1 / s``.

    d is the L2 distance between the feature vectors of an edge's two ends, taken over the edges that are not
    self loops; self loops get weight 1. When all distances are equal every weight is 1.

    Args:
        data: the graph (e.g. a 4-neighbour grid over subspots).
        features: (N, L) per-node features (e.g. image embeddings of subspots).
        s: the median edge maps to weight 1/s (s > 1; 5 in the soScope examples).
    """
    if not s > 1:
        raise DataError(f"s must be greater than 1, got {s}", field="s")
    f = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if f.ndim != 2 or f.shape[0] != data.num_nodes:
        raise DataError(f"expected ({data.num_nodes}, L) features, got shape {tuple(f.shape)}", field="features")
    src, dst = data.edge_index
    d = (f[src] - f[dst]).norm(dim=1)
    loop = src == dst
    w = torch.ones_like(d)
    if (~loop).any():
        d_edges = d[~loop]
        d_min, d_med = d_edges.min(), d_edges.median()
        if d_med > d_min:
            delta = (d_med - d_min) / math.log(s)
            w[~loop] = torch.exp(-(d_edges - d_min) / delta)
    return _like(data, data.edge_index, w)


# ----------------------------------------------------------------------------------------------------- AnnData


def _pixel_size(adata: ad.AnnData, pixel_size_um: float | None) -> float:
    if pixel_size_um is not None:
        return _check_scale(pixel_size_um)
    try:
        value = adata.uns["spfm"]["pixel_size_um"]
    except (KeyError, TypeError):
        raise DataError("units='um' needs the pixel size: pass pixel_size_um or read the sample with"
                        " spfm.data.hest.read_sample", field='uns["spfm"]["pixel_size_um"]') from None
    if not (np.isfinite(value) and value > 0):
        raise DataError(f"pixel size must be positive, got {value}", field='uns["spfm"]["pixel_size_um"]')
    return float(value)


def _spatial(adata: ad.AnnData) -> np.ndarray:
    if "spatial" not in adata.obsm:
        raise DataError("no spot coordinates", field=SPATIAL_KEY)
    return _points(adata.obsm["spatial"], SPATIAL_KEY)


def _join(parts: list[tuple[np.ndarray, Data]], n: int, pos: np.ndarray | None) -> Data:
    """Join per-sample graphs block-diagonally (no edges between samples), in the AnnData's row order."""
    src = np.concatenate([idx[g.edge_index[0].numpy()] for idx, g in parts])
    dst = np.concatenate([idx[g.edge_index[1].numpy()] for idx, g in parts])
    weighted = all("edge_weight" in g for _, g in parts)
    w = np.concatenate([g.edge_weight.numpy() for _, g in parts]) if weighted else None
    return _data(src, dst, n, pos, w, symmetric=False)


def from_adata(
    adata: ad.AnnData,
    kind: Literal["knn", "radius", "delaunay", "hex", "square", "feature"],
    *,
    units: Literal["pixel", "um"] = "pixel",
    pixel_size_um: float | None = None,
    sample_key: str | None = None,
    use_rep: str = "X_pca",
    **kwargs,
) -> Data:
    """Build a graph from an AnnData's coordinates or features.

    ``knn``, ``radius``, ``delaunay`` read ``obsm["spatial"]``; ``hex`` and ``square`` read ``obs["array_row"]``
    and ``obs["array_col"]`` (``pos`` then comes from ``obsm["spatial"]`` when present); ``feature`` reads
    ``obsm[use_rep]`` (``use_rep="X"`` for ``X``). Keyword arguments go to the builder (``k``, ``r``,
    ``max_edge_length``, ``neighbours``, ``metric``, ``symmetric``, ``weight``).

    Args:
        adata: the spots or cells.
        kind: which builder: :func:`knn_graph`, :func:`radius_graph`, :func:`delaunay_graph`,
            :func:`hex_grid_graph`, :func:`square_grid_graph`, :func:`feature_knn_graph`.
        units: ``"um"`` scales pixel coordinates to micrometres (distances, radii, ``pos``) by ``pixel_size_um`` or
            ``uns["spfm"]["pixel_size_um"]``.
        pixel_size_um: micrometres per pixel, overriding ``uns["spfm"]``.
        sample_key: an ``obs`` column; one graph per sample, joined block-diagonally (no edges across samples).
        use_rep: the ``obsm`` key of the features for ``kind="feature"``.
    """
    builders = {"knn": knn_graph, "radius": radius_graph, "delaunay": delaunay_graph, "hex": hex_grid_graph,
                "square": square_grid_graph, "feature": feature_knn_graph}
    if kind not in builders:
        raise DataError(f"kind must be one of {', '.join(builders)}, got {kind!r}", field="kind")
    if units not in ("pixel", "um"):
        raise DataError(f"units must be 'pixel' or 'um', got {units!r}", field="units")
    scale = _pixel_size(adata, pixel_size_um) if units == "um" else 1.0
    has_spatial = "spatial" in adata.obsm
    pos = _spatial(adata) * scale if (kind in ("knn", "radius", "delaunay") or has_spatial) else None

    if kind in ("hex", "square"):
        for name in ("array_row", "array_col"):
            if name not in adata.obs:
                raise DataError("no array coordinates", field=f'obs["{name}"]')
        rows, cols = _grid_index(adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy())
    elif kind == "feature":
        if use_rep == "X":
            features = adata.X
        elif use_rep in adata.obsm:
            features = adata.obsm[use_rep]
        else:
            raise DataError(f"no features under obsm[{use_rep!r}]; run spfm.data.preprocess.pca (or lsi) first",
                            field=f'obsm["{use_rep}"]')

    def build(idx: np.ndarray) -> Data:
        sub_pos = None if pos is None else pos[idx]
        if kind in ("knn", "radius", "delaunay"):
            return builders[kind](sub_pos, **kwargs)  # pos is already scaled
        if kind in ("hex", "square"):
            return builders[kind](rows[idx], cols[idx], pos=sub_pos, **kwargs)
        return feature_knn_graph(features[idx], pos=sub_pos, **kwargs)

    if sample_key is None:
        return build(np.arange(adata.n_obs))
    if sample_key not in adata.obs:
        raise DataError(f"sample column {sample_key!r} not found", field=f'obs["{sample_key}"]')
    groups = adata.obs[sample_key].to_numpy()
    parts = [(idx, build(idx)) for idx in (np.flatnonzero(groups == g) for g in dict.fromkeys(groups))]
    return _join(parts, adata.n_obs, pos)
