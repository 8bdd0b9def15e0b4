"""Checks and tensors for soScope: AnnData (one per modality) + layout + image features or W -> a ``Problem``."""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from spfm.errors import DataError
from spfm.heads.soscope.graphs import given_subspot_graph, spot_graph, subspot_graph
from spfm.heads.soscope.layouts import Layout, spot_pitch, subspot_positions


@dataclass
class Problem:
    """Everything one enhancement needs, as tensors (CPU).

    x: (N, G) spot values as measured (counts: spot totals; gaussian: spot means). edge_index: (2, E) spot graph.
    parent: (M,) parent spot of each subspot. k: (M,) K of the parent. y: (M, L) decoder image input.
    w_index, w_value: W's (2, E_w) edges with self loops and (E_w,) weights. sub_xy: (M, 2) subspot centres.
    """

    x: torch.Tensor
    edge_index: torch.Tensor
    parent: torch.Tensor
    k: torch.Tensor
    y: torch.Tensor
    w_index: torch.Tensor
    w_value: torch.Tensor
    sub_xy: np.ndarray
    spot_xy: np.ndarray
    spot_names: np.ndarray
    pitch: float
    interp_index: list[int] | None = None


def as_list(adata) -> list[ad.AnnData]:
    if isinstance(adata, ad.AnnData):
        return [adata]
    if isinstance(adata, (list, tuple)) and adata and all(isinstance(a, ad.AnnData) for a in adata):
        return list(adata)
    raise DataError(f"expected an AnnData or a list of AnnData (one per modality), got {type(adata).__name__}",
                    field="adata")


def modality_values(adatas: list[ad.AnnData], omics: list[str], names: list[str], layer: str | None,
                    rounding: bool) -> np.ndarray:
    """(N, G) float32 concatenation of the modalities, checked for the distribution each one is modelled with."""
    if len(adatas) != len(omics):
        raise DataError(f"{len(adatas)} AnnData given for {len(omics)} omics types {omics}", field="omics")
    ref = adatas[0].obs_names
    blocks = []
    for a, om, name in zip(adatas, omics, names):
        if a.n_obs != len(ref) or not np.array_equal(a.obs_names, ref):
            raise DataError(f"modality {name!r} does not have the same spots in the same order as {names[0]!r}",
                            field="obs_names")
        src = a.layers[layer] if layer is not None else a.X
        field = f'{name}: layers["{layer}"]' if layer is not None else f"{name}: X"
        if layer is not None and layer not in a.layers:
            raise DataError(f"layer {layer!r} is missing", field=field)
        X = np.asarray(src.toarray() if sp.issparse(src) else src, dtype=np.float64)
        if not np.all(np.isfinite(X)):
            raise DataError("values must be finite", field=field)
        if om in ("nb", "poisson"):
            if X.min() < 0:
                raise DataError(f"{om} models counts but the values include {X.min():g} < 0", field=field)
            frac = np.abs(X - np.round(X))
            if frac.max() > 1e-6:
                if not rounding:
                    bad = np.unravel_index(int(np.argmax(frac)), X.shape)
                    raise DataError(f"{om} models integer counts but {field} holds non-integer values (e.g. "
                                    f"{X[bad]:g} at spot {a.obs_names[bad[0]]!r}, feature {a.var_names[bad[1]]!r});"
                                    " pass raw counts, use omics='gaussian', or set rounding=True", field=field)
                X = np.round(X)
        blocks.append(X)
    return np.concatenate(blocks, axis=1).astype(np.float32)


def spot_coordinates(adata: ad.AnnData) -> np.ndarray:
    if "spatial" not in adata.obsm:
        raise DataError("spot coordinates are missing", field='obsm["spatial"]')
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] != adata.n_obs or not np.all(np.isfinite(xy[:, :2])):
        raise DataError(f"expected finite (N, 2) coordinates, got shape {xy.shape}", field='obsm["spatial"]')
    return xy[:, :2]


def assignment_parent(assignment, n_spots: int) -> np.ndarray:
    """(M,) parent index from a parent vector or a region x cell (N x M) 0/1 matrix with one 1 per column."""
    if assignment is None:
        raise DataError("layout 'cells' needs an assignment (region x cell matrix or parent index per cell)",
                        field="assignment")
    if sp.issparse(assignment) or (isinstance(assignment, np.ndarray) and assignment.ndim == 2):
        A = sp.csc_matrix(assignment)
        if A.shape[0] != n_spots:
            raise DataError(f"assignment has {A.shape[0]} rows, expected one per spot ({n_spots})", field="assignment")
        per_cell = np.diff(A.indptr)
        if np.any(per_cell != 1):
            raise DataError(f"{int((per_cell != 1).sum())} cell(s) are assigned to {sorted(set(per_cell))[:3]}"
                            " regions; each cell must belong to exactly one region", field="assignment")
        parent = A.indices.astype(np.int64)
    else:
        parent = np.asarray(assignment)
        if parent.ndim != 1 or not np.issubdtype(parent.dtype, np.integer):
            raise DataError("assignment must be an integer parent index per cell or a region x cell matrix",
                            field="assignment")
        parent = parent.astype(np.int64)
        if parent.min() < 0 or parent.max() >= n_spots:
            raise DataError(f"assignment refers to region {parent.max()} but there are {n_spots} spots",
                            field="assignment")
    empty = np.setdiff1d(np.arange(n_spots), parent)
    if len(empty):
        raise DataError(f"{len(empty)} region(s) have no cell, e.g. {empty[:5].tolist()}", field="assignment")
    return parent


def decoder_input(features: np.ndarray | None, M: int, mode: str, seed: int, offsets: np.ndarray,
                  noise_dim: int, standardize: bool) -> np.ndarray:
    """(M, L) decoder image input: the features, or (no image) Gaussian noise (the paper) / the subspot offsets."""
    if features is not None:
        y = np.asarray(features, dtype=np.float32)
        if standardize:
            y = (y - y.mean(axis=0)) / (y.std(axis=0) + 1e-6)
        return y
    if mode == "noise":
        return np.random.default_rng(seed).standard_normal((M, noise_dim)).astype(np.float32)
    return offsets.astype(np.float32)


def interp_features(x: np.ndarray, counts: np.ndarray, spot_xy: np.ndarray, sub_xy: np.ndarray, parent: np.ndarray,
                    index: list[int] | None, n_max: int = 32) -> tuple[np.ndarray, list[int]]:
    """(M, F) no-image decoder input (``no_image="interp"``, spfm option): the spot profiles linearly interpolated
    at the subspot centres (count features per subspot and log1p'd), z-scored per column.

    Keeps ``n_max`` features (the most variable at spot level, ``index`` when given: the fitted choice), so a wide
    panel (e.g. 283 ADTs) does not swamp the latent in the decoder's first layer.
    """
    from spfm.eval.baselines import spatial_linear

    k = np.bincount(parent, minlength=len(x)).astype(np.float64)[:, None]
    v = np.where(counts[None, :], np.log1p(x / np.maximum(k, 1.0)), x)
    if index is None:
        index = np.argsort(-v.var(axis=0), kind="stable")[:n_max].tolist()
    idx = np.asarray(index, dtype=np.int64)
    f = spatial_linear(v[:, idx], spot_xy, sub_xy, parent, reduce="mean")
    f = (f - f.mean(axis=0)) / (f.std(axis=0) + 1e-6)
    return f.astype(np.float32), [int(i) for i in idx]


def build_problem(adatas: list[ad.AnnData], layout: Layout, x: np.ndarray, *, image_features, subspot_graph_in,
                  assignment, subspot_xy, pitch: float | None, similarity_s: float, no_image: str, noise_dim: int,
                  seed: int, standardize: bool, counts: np.ndarray | None = None,
                  interp_index: list[int] | None = None, interp_input: bool = False) -> Problem:
    """Check the geometry and inputs of one enhancement problem and build its tensors."""
    a0 = adatas[0]
    N = a0.n_obs
    xy = spot_coordinates(a0)
    p = float(pitch) if pitch else spot_pitch(xy)
    if layout.kind == "cells":
        parent = assignment_parent(assignment, N)
        if subspot_xy is None:
            raise DataError("layout 'cells' needs the cell positions", field="subspot_xy")
        sub_xy = np.asarray(subspot_xy, dtype=np.float64)
        if sub_xy.shape != (len(parent), 2):
            raise DataError(f"subspot_xy has shape {sub_xy.shape}, expected ({len(parent)}, 2)", field="subspot_xy")
        counts = np.bincount(parent, minlength=N)
        k = counts[parent]
        offsets = (sub_xy - xy[parent]) / p
        sub_pitch = None
    else:
        K = layout.K
        parent = np.repeat(np.arange(N), K)
        k = np.full(len(parent), K)
        sub_xy = subspot_positions(xy, layout, p)
        offsets = np.tile(layout.offsets(), (N, 1)) / layout.subspot_pitch()
        sub_pitch = p * layout.subspot_pitch()
    M = len(parent)
    if image_features is not None:
        feats = np.asarray(image_features)
        if feats.ndim != 2 or feats.shape[0] != M:
            raise DataError(f"image features have shape {feats.shape}; expected ({M}, L): one row per subspot"
                            f" ({N} spots x K for layout {layout.spec!r})", field="image_features")
        if not np.all(np.isfinite(feats)):
            raise DataError("image features must be finite", field="image_features")
    else:
        feats = None
    edge_index = spot_graph(a0, layout, xy, p)
    cnt = np.ones(x.shape[1], dtype=bool) if counts is None else np.asarray(counts, dtype=bool)
    if feats is None and no_image == "interp":
        y, interp_index = interp_features(x, cnt, xy, sub_xy, parent, interp_index)
        w_feats = y  # W from expression similarity of the interpolated profiles
    else:
        y = decoder_input(feats, M, no_image, seed, offsets, noise_dim, standardize)
        w_feats, interp_index = feats, None
        if interp_input:
            # spfm option: the interpolated spot profiles appended to the image features (W stays the image's).
            f, interp_index = interp_features(x, cnt, xy, sub_xy, parent, interp_index)
            y = np.concatenate([y, f], axis=1)
    if subspot_graph_in is not None:
        w_index, w_value = given_subspot_graph(subspot_graph_in, M)
    else:
        w_index, w_value = subspot_graph(sub_xy, layout, sub_pitch, w_feats, similarity_s)
    return Problem(x=torch.as_tensor(x), edge_index=edge_index, parent=torch.as_tensor(parent),
                   k=torch.as_tensor(k, dtype=torch.float32), y=torch.as_tensor(y), w_index=w_index,
                   w_value=w_value, sub_xy=sub_xy, spot_xy=xy, spot_names=np.asarray(a0.obs_names), pitch=p,
                   interp_index=interp_index)
