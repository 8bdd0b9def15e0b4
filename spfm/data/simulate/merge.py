"""Merge simulator: aggregate a higher-resolution AnnData into low-resolution spots, keeping the truth.

soScope's evaluation (Li, Bao et al. 2024, "In silico low-resolution profile simulation") merges real data into
low-resolution spots and scores how well a method recovers the originals:

* **cells or small spots on irregular positions** (Xenium, osmFISH, slide-seq): the tissue is cut into square
  bins of ``bin_size`` (the subspots); a bin's truth is the sum (or mean) of the cells in it, and ``a x a`` bins
  make one low-resolution spot;
* **spots on a square grid** (legacy ST, DBiT-seq, spatial-CITE-seq; ``obs["array_row"/"array_col"]``): each
  ``a x a`` block of spots is one low-resolution spot; incomplete blocks at the tissue edge are dropped;
* **Visium hexagonal spots**: a centre spot and its 6 neighbours are one low-resolution spot (``layout="visium7"``).
  The centres form the index-7 sub-lattice of the hexagonal lattice, so every spot belongs to exactly one flower;
  incomplete flowers are dropped (as the paper did).

The subspots of low-resolution spot n are rows ``n*K .. n*K+K-1`` of the truth, in the order of
:class:`spfm.heads.soscope.layouts.Layout` (row-major, or the reference's centre-last order), so a soScope
enhancement of ``spots`` lines up row for row with ``truth``.
"""

from __future__ import annotations

import math
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spfm.errors import DataError


def _parse_layout(layout: str) -> tuple[str, int, str]:
    """(kind, a, order) of ``square:A[:reference]`` or ``visium7`` (the soScope layout strings merges support)."""
    parts = str(layout).strip().lower().split(":") if isinstance(layout, str) else []
    if parts[:1] == ["visium7"] and len(parts) == 1:
        return "visium7", 1, "row"
    if parts[:1] == ["square"] and len(parts) in (2, 3) and parts[1].isdigit() and 2 <= int(parts[1]) <= 10 \
            and (len(parts) == 2 or parts[2] in ("row", "reference")):
        return "square", int(parts[1]), parts[2] if len(parts) == 3 else "row"
    raise DataError(f"merge_spots supports layouts 'square:A' (A = 2..10, optionally ':reference') and 'visium7',"
                    f" got {layout!r}", field="layout")


def square_order(a: int, order: str) -> np.ndarray:
    """(a*a,) permutation: block position p holds row-major subspot ``order[p]`` (reference: centre last)."""
    perm = np.arange(a * a)
    if order == "reference" and a % 2 == 1:
        centre = a * a // 2
        perm = np.concatenate([perm[perm != centre], [centre]])
    return perm


def looks_hexagonal(rows: np.ndarray, cols: np.ndarray) -> bool:
    """Visium doubled columns: one parity of row + col, and the columns of each row two apart."""
    rows, cols = np.asarray(rows), np.asarray(cols)
    if len(rows) < 2 or len(np.unique((rows + cols) % 2)) > 1:
        return False
    order = np.lexsort((cols, rows))
    r, c = rows[order], cols[order]
    steps = np.diff(c)[np.diff(r) == 0]
    return len(steps) > 0 and bool(np.all(steps % 2 == 0))


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def _xy(adata: ad.AnnData) -> np.ndarray:
    if "spatial" not in adata.obsm:
        raise DataError("coordinates are missing", field='obsm["spatial"]')
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.all(np.isfinite(xy[:, :2])):
        raise DataError(f"expected finite (N, 2) coordinates, got shape {xy.shape}", field='obsm["spatial"]')
    return xy[:, :2]


def _aggregate(X: np.ndarray, group: np.ndarray, n_groups: int, reduce: str) -> tuple[np.ndarray, np.ndarray]:
    """Sum or mean of rows of X per group; also the number of rows per group."""
    M = sp.csr_matrix((np.ones(len(group)), (group, np.arange(len(group)))), shape=(n_groups, len(group)))
    total = np.asarray(M @ X)
    n = np.asarray(M.sum(axis=1)).ravel()
    if reduce == "mean":
        total = total / np.maximum(n, 1)[:, None]
    return total, n


def _square_bins(xy: np.ndarray, a: int, bin_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer (row, col) bin of every point and the bin grid origin."""
    if not (np.isfinite(bin_size) and bin_size > 0):
        raise DataError(f"bin_size must be a positive number, got {bin_size}", field="bin_size")
    origin = xy.min(axis=0)
    col = np.floor((xy[:, 0] - origin[0]) / bin_size).astype(np.int64)
    row = np.floor((xy[:, 1] - origin[1]) / bin_size).astype(np.int64)
    return row, col, origin


def _hex_flowers(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flower centre (axial q, r) of every spot and whether it is the centre (index-7 sub-lattice tiling)."""
    if len(np.unique((rows + cols) % 2)) > 1:
        raise DataError("array_row + array_col mixes parities: not a Visium hexagonal layout",
                        field='obs["array_row"], obs["array_col"]')
    q = (cols - rows) // 2
    r = rows
    # f = q - 2r (mod 7) is 0 on the flower centres and takes 7 distinct values on a flower's 7 cells.
    f = np.mod(q - 2 * r, 7)
    axial = {0: (0, 0), 1: (1, 0), 6: (-1, 0), 5: (0, 1), 2: (0, -1), 3: (1, -1), 4: (-1, 1)}
    dq = np.array([axial[int(v)][0] for v in range(7)])[f]
    dr = np.array([axial[int(v)][1] for v in range(7)])[f]
    return q - dq, r - dr, f == 0


def merge_spots(
    adata: ad.AnnData,
    layout: str = "square:3",
    *,
    bin_size: float | None = None,
    reduce: Literal["sum", "mean"] = "sum",
    min_filled: int = 1,
    layer: str | None = None,
) -> tuple[ad.AnnData, ad.AnnData]:
    """Aggregate ``adata`` into low-resolution spots and return ``(spots, truth)``.

    Args:
        adata: cells or spots x features, values in ``X`` (or ``layers[layer]``), coordinates in
            ``obsm["spatial"]``; for a grid merge (no ``bin_size``) also integer ``obs["array_row"]`` and
            ``obs["array_col"]`` (square grid for ``square:A``, Visium doubled-column hexagonal for ``visium7``).
        layout: ``"square:A"`` (optionally ``":reference"`` for the centre-last order) or ``"visium7"``.
        bin_size: cut the tissue into square subspot bins of this size (coordinate units) instead of using the
            array grid; required when ``adata`` has no array coordinates (cells).
        reduce: ``"sum"`` (counts: a spot is the sum of its subspots; soScope's NB/Poisson convention) or
            ``"mean"`` (continuous values: a spot is the mean of its subspots; soScope's Gaussian convention).
            With bins, a subspot's truth is the sum (mean) of its cells.
        min_filled: with bins, keep a low-resolution spot only if at least this many of its K bins hold a cell.
        layer: read values from ``layers[layer]`` instead of ``X``.

    Returns:
        ``spots``: N low-resolution spots (``X`` float32, ``obsm["spatial"]`` the block centre, square merges also
        ``obs["array_row"/"array_col"]`` of the block grid), ``uns["soscope_merge"]`` with the layout, K and
        settings. ``truth``: N*K subspots (row ``n*K + k`` is subspot k of spot n), ``obs["parent_spot"]``,
        ``obs["subspot"]`` (k), ``obs["n_cells"]`` (cells or spots merged into it), ``obsm["spatial"]``
        (bin centre, or the original spot position).
    """
    kind, a, order = _parse_layout(layout)
    spec = f"square:{a}" + (":reference" if order == "reference" else "") if kind == "square" else kind
    if reduce not in ("sum", "mean"):
        raise DataError(f"reduce must be 'sum' or 'mean', got {reduce!r}", field="reduce")
    if layer is not None and layer not in adata.layers:
        raise DataError(f"layer {layer!r} is missing", field=f'layers["{layer}"]')
    X = _dense(adata.layers[layer] if layer is not None else adata.X)
    xy = _xy(adata)
    K = a * a if kind == "square" else 7
    perm = square_order(a, order)

    if kind == "square":
        if bin_size is not None:
            row, col, origin = _square_bins(xy, a, float(bin_size))
        else:
            for key in ("array_row", "array_col"):
                if key not in adata.obs:
                    raise DataError("a grid merge needs array coordinates; give bin_size to bin cells instead",
                                    field=f'obs["{key}"]')
            row = np.asarray(adata.obs["array_row"], dtype=np.int64)
            col = np.asarray(adata.obs["array_col"], dtype=np.int64)
            if looks_hexagonal(row, col):
                raise DataError("array coordinates look hexagonal (Visium doubled columns); use layout='visium7'",
                                field='obs["array_col"]')
            row, col = row - row.min(), col - col.min()
        brow, bcol = row // a, col // a
        slot_rm = (row % a) * a + (col % a)
        block_key = brow * (int(bcol.max()) + 1) + bcol
    else:
        if bin_size is not None:
            raise DataError("visium7 merges Visium spots on their array grid; bin_size does not apply",
                            field="bin_size")
        for key in ("array_row", "array_col"):
            if key not in adata.obs:
                raise DataError("a visium7 merge needs Visium array coordinates", field=f'obs["{key}"]')
        rows = np.asarray(adata.obs["array_row"], dtype=np.int64)
        cols = np.asarray(adata.obs["array_col"], dtype=np.int64)
        cq, cr, is_centre = _hex_flowers(rows, cols)
        cq, cr = cq - cq.min(), cr - cr.min()
        block_key = cr * (int(cq.max()) + 1) + cq

    uniq, block = np.unique(block_key, return_inverse=True)
    n_blocks = len(uniq)

    if kind == "square":
        # Position p in the block holds row-major subspot perm[p]; invert to place each point.
        pos_of_rm = np.argsort(perm)
        slot = pos_of_rm[slot_rm]
    else:
        # Order the 7 members of each flower by their angle around the flower's mean position (centre last), so
        # the truth matches soScope's Layout("visium7").offsets() in the orientation of obsm["spatial"].
        centre = np.zeros((n_blocks, 2))
        centre[block[is_centre]] = xy[is_centre]
        d = xy - centre[block]
        ang = np.mod(np.arctan2(d[:, 1], d[:, 0]) + math.pi / 6.0, 2 * math.pi)
        slot = np.where(is_centre, 6, np.floor(ang / (math.pi / 3.0)).astype(np.int64) % 6)

    sub = block * K + slot
    truth_X, n_in = _aggregate(X, sub, n_blocks * K, reduce)
    sub_xy_mean = _aggregate(xy, sub, n_blocks * K, "mean")[0]

    if bin_size is not None:
        filled = (n_in.reshape(n_blocks, K) > 0).sum(axis=1)
        keep = filled >= max(1, int(min_filled))
        # Bin centres, also for empty bins, from the block grid.
        ub_row, ub_col = np.divmod(uniq, int(bcol.max()) + 1)
        ij = np.stack(np.divmod(np.arange(K), a), axis=1)[perm]
        r_all = ub_row[:, None] * a + ij[None, :, 0]
        c_all = ub_col[:, None] * a + ij[None, :, 1]
        sub_xy = np.stack([origin[0] + (c_all.ravel() + 0.5) * bin_size,
                           origin[1] + (r_all.ravel() + 0.5) * bin_size], axis=1)
    else:
        # Grid merges keep complete blocks only: a missing member would be an unmeasured subspot.
        counts = np.bincount(sub, minlength=n_blocks * K).reshape(n_blocks, K)
        if kind == "square" and np.any(counts > 1):
            raise DataError("two spots fall in the same subspot slot (duplicate array coordinates?)",
                            field='obs["array_row"], obs["array_col"]')
        keep = (counts == 1).all(axis=1)
        sub_xy = sub_xy_mean
    if not keep.any():
        raise DataError(f"no complete low-resolution spot could be formed with layout {spec!r}",
                        field="layout")

    kept = np.flatnonzero(keep)
    rows_keep = (kept[:, None] * K + np.arange(K)[None, :]).ravel()
    truth_X = truth_X[rows_keep]
    sub_xy = sub_xy[rows_keep]
    n_in = n_in[rows_keep]
    tX = truth_X.reshape(len(kept), K, -1)
    spot_X = tX.sum(axis=1) if reduce == "sum" else tX.mean(axis=1)
    spot_xy = sub_xy.reshape(len(kept), K, 2).mean(axis=1)

    names = np.array([f"spot{i}" for i in range(len(kept))])
    spots = ad.AnnData(spot_X.astype(np.float32), obs=pd.DataFrame(index=names), var=adata.var.copy())
    spots.obsm["spatial"] = spot_xy
    if kind == "square":
        ub_row, ub_col = np.divmod(uniq[kept], int(bcol.max()) + 1)
        spots.obs["array_row"] = ub_row.astype(np.int64)
        spots.obs["array_col"] = ub_col.astype(np.int64)
    info = {"layout": spec, "K": int(K), "reduce": reduce,
            "bin_size": None if bin_size is None else float(bin_size), "n_source": int(adata.n_obs)}
    spots.uns["soscope_merge"] = info
    if "spfm" in adata.uns:
        spots.uns["spfm"] = dict(adata.uns["spfm"])

    sub_names = np.array([f"{names[n]}_{k}" for n in range(len(kept)) for k in range(K)])
    truth = ad.AnnData(truth_X.astype(np.float32), obs=pd.DataFrame(index=sub_names), var=adata.var.copy())
    truth.obs["parent_spot"] = pd.Categorical(np.repeat(names, K), categories=names)
    truth.obs["subspot"] = np.tile(np.arange(K), len(kept))
    truth.obs["n_cells"] = n_in.astype(np.int64)
    truth.obsm["spatial"] = sub_xy
    truth.uns["soscope_merge"] = dict(info)
    return spots, truth
