"""soScope's two graphs: the spot graph A (encoder) and the subspot similarity graph W (image term).

* A: grid neighbours from ``obs["array_row"/"array_col"]`` (4 for square layouts, 6 for Visium's hexagonal
  lattice) or, without array coordinates, every spot within 1.25 spot pitches (the same neighbours on a regular
  lattice). A spot without neighbours is an error: the encoder would see it alone.
* W: on the subspot lattice, each subspot joined to its lattice neighbours (4 on a square split, 6 on the
  hexagonal 7-spot merge; the 6 nearest subspots for ``visium_split``, the 5 nearest cells for ``cells``), weighted
  by feature similarity ``w = exp(-(d - d_min) / delta)``, ``delta = (d_median - d_min) / ln(s)`` with d the L2
  distance between the two subspots' feature vectors (the median neighbour pair gets 1/s), plus self loops of
  weight 1 (the reference's BuildGraph). Without features all weights are 1.
"""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from torch_geometric.utils import coalesce

from spfm.data.graphs import hex_grid_graph, knn_graph, radius_graph, square_grid_graph
from spfm.data.simulate.merge import looks_hexagonal as _looks_hexagonal
from spfm.errors import DataError
from spfm.heads.soscope.layouts import Layout


def spot_graph(adata: ad.AnnData, layout: Layout, xy: np.ndarray, pitch: float) -> torch.Tensor:
    """(2, E) undirected spot edges, checked for isolated spots and a layout that fits the coordinates."""
    has_grid = "array_row" in adata.obs and "array_col" in adata.obs
    if has_grid:
        rows = np.asarray(adata.obs["array_row"], dtype=np.float64)
        cols = np.asarray(adata.obs["array_col"], dtype=np.float64)
        if not (np.all(np.isfinite(rows)) and np.all(np.isfinite(cols))):
            raise DataError("array coordinates must be finite integers", field='obs["array_row"], obs["array_col"]')
        rows, cols = rows.astype(np.int64), cols.astype(np.int64)
        hexa = _looks_hexagonal(rows, cols)
        if layout.kind == "square" and hexa:
            raise DataError(f"layout {layout.spec!r} is square but the array coordinates are Visium hexagonal"
                            " (doubled columns); use layout='visium_split' (or 'visium7' for 7-spot merges)",
                            field='obs["array_col"]')
        if layout.hexagonal and not hexa:
            raise DataError(f"layout {layout.spec!r} needs Visium hexagonal array coordinates (row + col of one"
                            " parity, columns two apart); these are a square grid", field='obs["array_col"]')
        if hexa:
            data = hex_grid_graph(rows, cols, pos=xy)
        else:
            data = square_grid_graph(rows, cols, neighbours=4, pos=xy)
    else:
        data = radius_graph(xy, 1.25 * pitch)
    ei = data.edge_index
    deg = torch.bincount(ei[1], minlength=adata.n_obs)
    lonely = torch.nonzero(deg == 0).ravel().numpy()
    if len(lonely):
        names = list(adata.obs_names[lonely[:5]])
        where = 'obs["array_row"], obs["array_col"]' if has_grid else 'obsm["spatial"]'
        raise DataError(f"{len(lonely)} spot(s) have no neighbour in the spot graph (disconnected), e.g. {names};"
                        " remove them or check the coordinates", field=where)
    return ei


def _feature_weights(features: np.ndarray, src: np.ndarray, dst: np.ndarray, s: float) -> np.ndarray:
    d = np.linalg.norm(features[src] - features[dst], axis=1)
    if len(d) == 0:
        return d
    d_min, d_med = float(d.min()), float(np.median(d))
    delta = (d_med - d_min) / math.log(s)
    if not delta > 0:
        return np.ones_like(d)
    return np.exp(-(d - d_min) / delta)


def subspot_graph(sub_xy: np.ndarray, layout: Layout, sub_pitch: float | None, features: np.ndarray | None,
                  s: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """W on the subspot lattice: (2, E) coalesced edges with self loops and (E,) weights in (0, 1]."""
    if layout.kind in ("square", "visium7"):
        data = radius_graph(sub_xy, 1.05 * sub_pitch)
    else:
        data = knn_graph(sub_xy, 6 if layout.kind == "visium_split" else 5, symmetric=True)
    src, dst = data.edge_index.numpy()
    if features is not None:
        w = _feature_weights(np.asarray(features, dtype=np.float64), src, dst, s)
    else:
        w = np.ones(len(src))
    M = len(sub_xy)
    return _with_self_loops(torch.as_tensor(np.stack([src, dst])), torch.as_tensor(w, dtype=torch.float32), M)


def _with_self_loops(ei: torch.Tensor, w: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = ei[0] != ei[1]
    loops = torch.arange(M)
    ei = torch.cat([ei[:, keep], torch.stack([loops, loops])], dim=1)
    w = torch.cat([w[keep], torch.ones(M)])
    ei, w = coalesce(ei, w, num_nodes=M, reduce="max")
    return ei, w


def given_subspot_graph(graph, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's W (scipy sparse M x M, or PyG ``Data`` with ``edge_index`` / ``edge_weight``) -> edges, weights."""
    if sp.issparse(graph):
        coo = sp.coo_matrix(graph)
        if coo.shape != (M, M):
            raise DataError(f"subspot graph is {coo.shape[0]} x {coo.shape[1]}, expected {M} x {M} (one row per"
                            " subspot)", field="subspot_graph")
        ei = torch.as_tensor(np.stack([coo.row, coo.col]).astype(np.int64))
        w = torch.as_tensor(coo.data, dtype=torch.float32)
    elif hasattr(graph, "edge_index"):
        ei = graph.edge_index.long()
        n = int(getattr(graph, "num_nodes", None) or (int(ei.max()) + 1 if ei.numel() else 0))
        if n != M:
            raise DataError(f"subspot graph has {n} nodes, expected {M} (one per subspot)", field="subspot_graph")
        w = graph.edge_weight.float() if getattr(graph, "edge_weight", None) is not None else torch.ones(ei.shape[1])
    else:
        raise DataError(f"subspot graph must be a scipy sparse matrix or a PyG Data, got {type(graph).__name__}",
                        field="subspot_graph")
    if w.numel() and (not torch.isfinite(w).all() or w.min() < 0 or w.max() > 1):
        raise DataError("subspot graph weights must lie in [0, 1] (they are BCE targets)", field="subspot_graph")
    return _with_self_loops(ei, w, M)
