"""Merge simulator (spfm.data.simulate.merge_spots): truth kept, sums/means conserved, order = soScope layout."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from spfm.data.simulate import merge_spots
from spfm.errors import DataError
from spfm.heads.soscope.layouts import Layout, spot_pitch, subspot_positions


def _cells(n: int = 400, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1000, (n, 2))
    X = rng.poisson(3.0, (n, 5)).astype(np.float32)
    a = ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=list("abcde")))
    a.obsm["spatial"] = xy
    return a


def _grid(rows: int, cols: int, hexagonal: bool = False, seed: int = 0) -> ad.AnnData:
    rr, cc = [], []
    for r in range(rows):
        for c in range(cols):
            if hexagonal:
                if (r + c) % 2:
                    continue
            rr.append(r)
            cc.append(c)
    rr, cc = np.array(rr), np.array(cc)
    n = len(rr)
    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.poisson(4.0, (n, 3)).astype(np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]))
    a.obs["array_row"], a.obs["array_col"] = rr, cc
    if hexagonal:
        a.obsm["spatial"] = np.stack([cc * 50.0, rr * 50.0 * np.sqrt(3)], axis=1)
    else:
        a.obsm["spatial"] = np.stack([cc * 100.0, rr * 100.0], axis=1)
    return a


def test_binned_merge_conserves_counts_and_matches_layout_positions():
    cells = _cells()
    spots, truth = merge_spots(cells, "square:3", bin_size=50.0)
    K = 9
    assert truth.n_obs == spots.n_obs * K
    assert np.allclose(truth.X.reshape(spots.n_obs, K, -1).sum(axis=1), spots.X)
    # Every cell lands in exactly one kept bin (min_filled=1 keeps every block with a cell).
    assert truth.obs["n_cells"].sum() == cells.n_obs
    assert np.allclose(truth.X.sum(axis=0), cells.X.sum(axis=0))
    # The subspot centres are the ones SoScope computes from the spot centres and the layout.
    pos = subspot_positions(spots.obsm["spatial"], Layout.parse("square:3"), 150.0)
    assert np.allclose(pos, truth.obsm["spatial"])
    assert list(truth.obs["parent_spot"][:K]) == [spots.obs_names[0]] * K


def test_reference_order_puts_the_centre_last():
    cells = _cells()
    _, t_row = merge_spots(cells, "square:3", bin_size=50.0)
    _, t_ref = merge_spots(cells, "square:3:reference", bin_size=50.0)
    a, b = t_row.X.reshape(-1, 9, 5), t_ref.X.reshape(-1, 9, 5)
    assert np.allclose(a[:, 4], b[:, 8])
    assert np.allclose(a[:, [0, 1, 2, 3]], b[:, [0, 1, 2, 3]])
    assert np.allclose(a[:, [5, 6, 7, 8]], b[:, [4, 5, 6, 7]])


def test_grid_merge_keeps_complete_blocks_and_original_values():
    a = _grid(5, 6)  # rows 0..4: the last row of blocks is incomplete and dropped
    spots, truth = merge_spots(a, "square:2")
    assert spots.n_obs == 2 * 3
    assert np.allclose(truth.X.reshape(-1, 4, 3).sum(axis=1), spots.X)
    # Spot 0 = block (0, 0): row-major subspots are the spots at (0,0), (0,1), (1,0), (1,1).
    idx = [int(np.flatnonzero((a.obs["array_row"] == r) & (a.obs["array_col"] == c))[0])
           for r, c in ((0, 0), (0, 1), (1, 0), (1, 1))]
    assert np.allclose(truth.X[:4], a.X[idx])
    assert np.allclose(truth.obsm["spatial"][:4], a.obsm["spatial"][idx])


def test_mean_reduce_for_continuous_values():
    a = _grid(4, 4)
    spots, truth = merge_spots(a, "square:2", reduce="mean")
    assert np.allclose(truth.X.reshape(-1, 4, 3).mean(axis=1), spots.X)


def test_visium7_flowers_tile_and_follow_the_layout_order():
    a = _grid(24, 48, hexagonal=True)
    spots, truth = merge_spots(a, "visium7")
    assert truth.n_obs == 7 * spots.n_obs
    # Each original spot is used at most once.
    keys = {tuple(p) for p in np.round(truth.obsm["spatial"], 6)}
    assert len(keys) == truth.n_obs
    pitch = spot_pitch(spots.obsm["spatial"])
    assert np.isclose(pitch, 100.0 * np.sqrt(7), rtol=1e-6)
    expect = subspot_positions(spots.obsm["spatial"], Layout.parse("visium7"), pitch)
    assert np.allclose(expect, truth.obsm["spatial"], atol=1e-6)
    assert np.allclose(truth.X.reshape(-1, 7, 3).sum(axis=1), spots.X)


def test_bad_inputs_are_named():
    cells = _cells()
    with pytest.raises(DataError, match="array_row"):
        merge_spots(cells, "square:2")
    with pytest.raises(DataError, match="layout"):
        merge_spots(cells, "triangle:2", bin_size=10.0)
    with pytest.raises(DataError, match="hexagonal"):
        merge_spots(_grid(6, 12, hexagonal=True), "square:2")
    with pytest.raises(DataError, match="bin_size"):
        merge_spots(cells, "square:2", bin_size=-1.0)


def test_osmfish_merge(shared_data):
    cells = ad.read_h5ad(shared_data / "osmfish" / "osmfish.h5ad")
    spots, truth = merge_spots(cells, "square:3", bin_size=700.0, min_filled=3)
    assert spots.n_obs > 50
    assert np.allclose(truth.X.reshape(spots.n_obs, 9, -1).sum(axis=1), spots.X, rtol=1e-5)
