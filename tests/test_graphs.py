"""Spatial and feature graphs: exact edges on hand-made layouts, brute-force agreement, normalisation, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial.distance import cdist
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from spfm.data import graphs as G
from spfm.errors import DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def edge_set(data) -> set[tuple[int, int]]:
    return set(map(tuple, data.edge_index.t().tolist()))


def undirected(pairs) -> set[tuple[int, int]]:
    return {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}


def degrees(data) -> np.ndarray:
    return np.bincount(data.edge_index[1].numpy(), minlength=data.num_nodes)


def assert_graph_invariants(data, n: int) -> None:
    """int64 (2, E) edges, no self loops, no duplicates, symmetric, float32 (n, 2) pos."""
    assert data.edge_index.dtype == torch.int64 and data.edge_index.shape[0] == 2
    assert data.num_nodes == n
    edges = edge_set(data)
    assert len(edges) == data.edge_index.shape[1]
    assert all(a != b for a, b in edges)
    assert edges == {(b, a) for a, b in edges}
    assert data.pos.dtype == torch.float32 and tuple(data.pos.shape) == (n, 2)


def brute_knn(xy: np.ndarray, k: int) -> np.ndarray:
    d = cdist(xy, xy)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1)[:, :k]


# ------------------------------------------------------------------------------------------------- grids


def test_square_grid_3x3_four_neighbours_has_the_12_lattice_edges():
    rows, cols = np.divmod(np.arange(9), 3)  # node = 3 * row + col
    g = G.square_grid_graph(rows, cols, neighbours=4)
    expected = undirected([(3 * r + c, 3 * r + c + 1) for r in range(3) for c in range(2)]
                          + [(3 * r + c, 3 * (r + 1) + c) for r in range(2) for c in range(3)])
    assert len(expected) == 24  # 12 undirected edges
    assert edge_set(g) == expected
    assert_graph_invariants(g, 9)
    assert degrees(g).tolist() == [2, 3, 2, 3, 4, 3, 2, 3, 2]
    np.testing.assert_array_equal(g.pos.numpy(), np.stack([cols, rows], 1))
    assert "edge_weight" not in g


def test_square_grid_8_neighbours_adds_the_diagonals():
    rows, cols = np.divmod(np.arange(9), 3)
    g = G.square_grid_graph(rows, cols, neighbours=8)
    assert g.edge_index.shape[1] == 2 * (12 + 8)
    assert degrees(g)[4] == 8 and degrees(g)[0] == 3
    assert (0, 4) in edge_set(g) and (2, 6) not in edge_set(g)


def test_square_grid_ignores_order_and_offsets_of_array_coordinates():
    rng = np.random.default_rng(0)
    rows, cols = np.divmod(np.arange(12), 4)
    perm = rng.permutation(12)
    g = G.square_grid_graph(rows[perm] + 100, cols[perm] - 7)
    back = {(int(perm[a]), int(perm[b])) for a, b in edge_set(g)}
    assert back == edge_set(G.square_grid_graph(rows, cols))


def visium_patch(n_rows: int = 5, n_cols: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Visium-style doubled columns: even rows use even array_col, odd rows odd array_col."""
    rows, cols = [], []
    for r in range(n_rows):
        for c in range(n_cols):
            rows.append(r)
            cols.append(2 * c + (r % 2))
    return np.array(rows), np.array(cols)


def test_hex_grid_interior_spot_has_its_six_visium_neighbours():
    rows, cols = visium_patch()
    g = G.hex_grid_graph(rows, cols)
    assert_graph_invariants(g, len(rows))
    where = {(r, c): i for i, (r, c) in enumerate(zip(rows, cols))}
    centre = where[(2, 4)]
    neighbours = {b for a, b in edge_set(g) if a == centre}
    expected = {where[p] for p in [(2, 2), (2, 6), (1, 3), (1, 5), (3, 3), (3, 5)]}
    assert neighbours == expected
    # Every interior spot (not on the patch border) has exactly 6; corners fewer.
    interior = [(r, c) for (r, c) in where if 0 < r < 4 and min(cols[rows == r]) < c < max(cols[rows == r])]
    assert interior and all(degrees(g)[where[p]] == 6 for p in interior)
    assert degrees(g)[where[(0, 0)]] == 2
    # The default pos is the lattice at unit pitch: every edge has length 1.
    lengths = (g.pos[g.edge_index[0]] - g.pos[g.edge_index[1]]).norm(dim=1)
    np.testing.assert_allclose(lengths.numpy(), 1.0, rtol=1e-6)


def test_hex_grid_rejects_a_square_layout_and_duplicates():
    rows, cols = np.divmod(np.arange(9), 3)
    with pytest.raises(DataError, match="array_col"):
        G.hex_grid_graph(rows, cols)
    with pytest.raises(DataError, match="share array coordinates"):
        G.hex_grid_graph(np.array([0, 0, 1]), np.array([0, 0, 1]))
    with pytest.raises(DataError, match="array_row"):
        G.square_grid_graph(np.array([0.5, 1.0]), np.array([0, 1]))


# ------------------------------------------------------------------------------------------------- kNN, radius


def test_directed_knn_matches_brute_force_with_k_incoming_edges_each():
    xy = np.random.default_rng(1).uniform(0, 100, (60, 2))
    g = G.knn_graph(xy, 5, symmetric=False)
    assert degrees(g).tolist() == [5] * 60
    expected = {(int(j), i) for i, row in enumerate(brute_knn(xy, 5)) for j in row}
    assert edge_set(g) == expected


def test_symmetric_knn_is_the_union_of_both_directions():
    xy = np.random.default_rng(2).uniform(0, 100, (80, 2))
    g = G.knn_graph(xy, 3)
    assert_graph_invariants(g, 80)
    directed = {(int(j), i) for i, row in enumerate(brute_knn(xy, 3)) for j in row}
    assert edge_set(g) == directed | {(b, a) for a, b in directed}
    assert degrees(g).min() >= 3


def test_knn_distance_weights_are_scaled_lengths():
    xy = np.random.default_rng(3).uniform(0, 1000, (40, 2))
    g = G.knn_graph(xy, 4, scale=0.5, weight="distance")
    assert g.edge_weight.dtype == torch.float32
    src, dst = g.edge_index.numpy()
    np.testing.assert_allclose(g.edge_weight.numpy(), 0.5 * np.linalg.norm(xy[src] - xy[dst], axis=1), rtol=1e-5)
    np.testing.assert_allclose(g.pos.numpy(), 0.5 * xy, rtol=1e-6)


def test_knn_with_duplicated_points_has_no_self_loops():
    xy = np.array([[0, 0], [0, 0], [0, 0], [5, 5], [6, 5]], dtype=float)
    g = G.knn_graph(xy, 2, symmetric=False)
    assert all(a != b for a, b in edge_set(g))
    assert degrees(g).tolist() == [2] * 5
    assert {a for a, b in edge_set(g) if b == 0} == {1, 2}


def test_knn_bad_input_names_the_field():
    xy = np.random.default_rng(0).uniform(size=(5, 2))
    with pytest.raises(DataError, match="k: k=5 must be below"):
        G.knn_graph(xy, 5)
    xy[2, 1] = np.nan
    with pytest.raises(DataError, match="coords: 1 point"):
        G.knn_graph(xy, 2)
    with pytest.raises(DataError, match=r"\(n, 2\)"):
        G.knn_graph(np.zeros((5, 3)), 2)


def test_radius_graph_matches_brute_force_and_includes_the_boundary():
    g = G.radius_graph(np.array([[0.0, 0.0], [1.0, 0.0], [2.5, 0.0], [10.0, 0.0]]), 1.5, weight="distance")
    assert edge_set(g) == undirected([(0, 1), (1, 2)])
    np.testing.assert_allclose(sorted(g.edge_weight.tolist()), [1.0, 1.0, 1.5, 1.5])
    xy = np.random.default_rng(4).uniform(0, 10, (70, 2))
    d = cdist(xy, xy)
    expected = {(i, j) for i, j in zip(*np.nonzero(d <= 1.7)) if i != j}
    assert edge_set(G.radius_graph(xy, 1.7)) == expected


# ------------------------------------------------------------------------------------------------- Delaunay


def test_delaunay_on_a_triangle_with_an_interior_point():
    xy = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    g = G.delaunay_graph(xy)
    assert_graph_invariants(g, 4)
    assert edge_set(g) == undirected([(0, 1), (1, 2), (0, 2), (0, 3), (1, 3), (2, 3)])
    pruned = G.delaunay_graph(xy, max_edge_length=4.0)  # drops the hypotenuse (length 4 * sqrt 2)
    assert edge_set(pruned) == edge_set(g) - undirected([(1, 2)])


def test_delaunay_joins_duplicates_and_rejects_collinear_points():
    xy = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    g = G.delaunay_graph(xy)
    assert degrees(g)[3] >= 1 and (3, 1) in edge_set(g)
    with pytest.raises(DataError, match="one line"):
        G.delaunay_graph(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    with pytest.raises(DataError, match="at least 3"):
        G.delaunay_graph(np.zeros((2, 2)))


# ------------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("metric", ["correlation", "cosine", "euclidean"])
def test_feature_knn_matches_brute_force(metric):
    X = np.random.default_rng(5).normal(size=(90, 12))
    k = 7
    g = G.feature_knn_graph(X, k, metric=metric, symmetric=False, weight="distance")
    d = cdist(X, X, metric=metric)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :k]
    assert edge_set(g) == {(int(j), i) for i, row in enumerate(nn) for j in row}
    src, dst = g.edge_index.numpy()
    np.testing.assert_allclose(g.edge_weight.numpy(), d[dst, src], rtol=1e-4, atol=1e-6)
    assert "pos" not in g


def test_feature_knn_sparse_input_and_bad_rows():
    X = sp.random(50, 30, density=0.3, random_state=0, format="csr") + sp.eye(50, 30)
    dense = G.feature_knn_graph(X.toarray(), 4, metric="cosine")
    assert edge_set(G.feature_knn_graph(X, 4, metric="cosine")) == edge_set(dense)
    constant = np.random.default_rng(0).normal(size=(10, 5))
    constant[3] = 2.0
    with pytest.raises(DataError, match="constant"):
        G.feature_knn_graph(constant, 3, metric="correlation")


def test_feature_knn_ivf_is_close_to_exact_and_valid():
    # Clustered 16-dimensional data, 4,000 rows: the inverted-file search probes 8 of ~63 k-means cells per cell.
    rng = np.random.default_rng(1)
    X = rng.normal(scale=3.0, size=(12, 16))[rng.integers(0, 12, 4000)] + rng.normal(size=(4000, 16))
    exact = G.feature_knn_graph(X, 10, metric="correlation", symmetric=False)
    approx = G.feature_knn_graph(X, 10, metric="correlation", symmetric=False, algorithm="ivf", weight="distance",
                                 seed=3)
    e, a = edge_set(exact), edge_set(approx)
    assert len(a) == len(e) == 40000  # k distinct neighbours per row, never itself
    assert all(src != dst for src, dst in a)
    assert len(e & a) / len(e) > 0.9
    # Stored distances are the true correlation distances of the pairs found.
    src, dst = approx.edge_index.numpy()[:, :200]
    expected = [1.0 - np.corrcoef(X[i], X[j])[0, 1] for i, j in zip(src, dst)]
    np.testing.assert_allclose(approx.edge_weight.numpy()[:200], expected, rtol=1e-3, atol=1e-4)
    with pytest.raises(DataError, match="algorithm"):
        G.feature_knn_graph(X, 10, algorithm="hnsw")


# ------------------------------------------------------------------------------------------------- helpers


def small_graph():
    xy = np.random.default_rng(6).uniform(0, 10, (25, 2))
    return G.knn_graph(xy, 3)


def test_sym_normalisation_matches_gcn_norm_and_the_dense_formula():
    g = small_graph()
    n = G.normalize_adjacency(g, "sym")
    ei, w = gcn_norm(g.edge_index, None, num_nodes=g.num_nodes)
    ref = sp.csr_matrix((w.numpy(), (ei[1].numpy(), ei[0].numpy())), shape=(25, 25)).toarray()
    np.testing.assert_allclose(G.to_scipy(n).toarray(), ref, rtol=1e-6)
    A = G.to_scipy(g).toarray() + np.eye(25)
    d = A.sum(1)
    np.testing.assert_allclose(G.to_scipy(n).toarray(), A / np.sqrt(np.outer(d, d)), rtol=1e-6)


def test_row_normalisation_averages_over_neighbours():
    g = small_graph()
    n = G.normalize_adjacency(g, "row", self_loops=False)
    X = np.random.default_rng(7).normal(size=(25, 3))
    got = G.to_scipy(n) @ X
    for i in range(25):
        nbrs = [a for a, b in edge_set(g) if b == i]
        np.testing.assert_allclose(got[i], X[nbrs].mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(G.to_scipy(n).sum(1)).ravel(), 1.0, rtol=1e-6)


def test_sparse_matrices_put_the_target_on_the_row():
    g = G.knn_graph(np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]), 1, symmetric=False)
    # 0 <- 1, 1 <- 0, 2 <- 1 as (source, target) = (1, 0), (0, 1), (1, 2)
    A = G.to_scipy(g).toarray()
    np.testing.assert_array_equal(A, [[0, 1, 0], [1, 0, 0], [0, 1, 0]])
    T = G.to_torch_sparse(g)
    assert T.is_sparse
    np.testing.assert_array_equal(T.to_dense().numpy(), A)
    np.testing.assert_array_equal(G.to_torch_sparse(g, "csr").to_dense().numpy(), A)


def test_make_symmetric_and_add_self_loops():
    g = G.knn_graph(np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]), 1, symmetric=False, weight="distance")
    s = G.make_symmetric(g)
    assert edge_set(s) == undirected([(0, 1), (1, 2)])
    np.testing.assert_allclose(G.to_scipy(s).toarray(), [[0, 1, 0], [1, 0, 4], [0, 4, 0]])
    loops = G.add_self_loops(s, fill_value=2.0)
    np.testing.assert_allclose(np.diag(G.to_scipy(loops).toarray()), [2, 2, 2])
    assert G.add_self_loops(loops).edge_index.shape == loops.edge_index.shape  # not added twice
    assert "edge_weight" not in G.add_self_loops(G.knn_graph(np.eye(3, 2), 1))


def test_feature_distance_weights_follow_the_soscope_kernel():
    rows, cols = np.zeros(4, int), np.arange(4)  # a chain 0-1-2-3
    g = G.add_self_loops(G.square_grid_graph(rows, cols))
    f = np.array([[0.0], [1.0], [3.0], [6.0]])  # edge distances 1, 2, 3 -> min 1, median 2
    w = G.feature_distance_weights(g, f, s=5.0)
    delta = (2 - 1) / math.log(5)
    expected = {1.0: 1.0, 2.0: math.exp(-1 / delta), 3.0: math.exp(-2 / delta)}
    for (a, b), wt in zip(w.edge_index.t().tolist(), w.edge_weight.tolist()):
        want = 1.0 if a == b else expected[abs(f[a, 0] - f[b, 0])]
        assert wt == pytest.approx(want, rel=1e-5)
    assert expected[2.0] == pytest.approx(1 / 5)


# ------------------------------------------------------------------------------------------------- AnnData


def spots(n: int = 30, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    a = ad.AnnData(np.zeros((n, 2), dtype=np.float32))
    a.obsm["spatial"] = rng.uniform(0, 2000, (n, 2))
    a.uns["spfm"] = {"pixel_size_um": 0.25}
    return a


def test_from_adata_spatial_kinds_and_units():
    a = spots()
    px = G.from_adata(a, "knn", k=4, weight="distance")
    um = G.from_adata(a, "knn", k=4, weight="distance", units="um")
    assert edge_set(px) == edge_set(um)
    np.testing.assert_allclose(um.edge_weight.numpy(), 0.25 * px.edge_weight.numpy(), rtol=1e-5)
    np.testing.assert_allclose(um.pos.numpy(), 0.25 * a.obsm["spatial"], rtol=1e-6)
    r = G.from_adata(a, "radius", r=100.0, units="um")
    assert edge_set(r) == edge_set(G.radius_graph(a.obsm["spatial"], 400.0))
    assert edge_set(G.from_adata(a, "delaunay")) == edge_set(G.delaunay_graph(a.obsm["spatial"]))


def test_from_adata_grids_and_features():
    rows, cols = visium_patch()
    a = ad.AnnData(np.zeros((len(rows), 3), dtype=np.float32),
                   obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(len(rows))]))
    a.obsm["spatial"] = np.stack([cols * 50.0, rows * 86.6], 1)
    g = G.from_adata(a, "hex")
    assert edge_set(g) == edge_set(G.hex_grid_graph(rows, cols))
    np.testing.assert_allclose(g.pos.numpy(), a.obsm["spatial"], rtol=1e-6)
    a.obsm["X_pca"] = np.random.default_rng(0).normal(size=(len(rows), 5))
    f = G.from_adata(a, "feature", k=3, metric="euclidean")
    assert edge_set(f) == edge_set(G.feature_knn_graph(a.obsm["X_pca"], 3, metric="euclidean"))
    with pytest.raises(DataError, match=r'obsm\["X_lsi"\]'):
        G.from_adata(a, "feature", use_rep="X_lsi", k=3)


def test_from_adata_sample_key_joins_graphs_without_cross_edges():
    a = spots(40)
    a.obs["sample"] = np.repeat(["s1", "s2"], 20)
    a.obsm["spatial"][20:] = a.obsm["spatial"][:20] + 0.5  # second sample overlaps the first in space
    g = G.from_adata(a, "knn", k=3, sample_key="sample")
    first = edge_set(G.knn_graph(a.obsm["spatial"][:20], 3))
    second = {(i + 20, j + 20) for i, j in edge_set(G.knn_graph(a.obsm["spatial"][20:], 3))}
    assert edge_set(g) == first | second
    assert_graph_invariants(g, 40)


def test_from_adata_bad_input_names_the_key():
    a = spots()
    del a.obsm["spatial"]
    with pytest.raises(DataError, match=r'obsm\["spatial"\]'):
        G.from_adata(a, "knn", k=3)
    a = spots()
    a.obsm["spatial"][4] = np.nan
    with pytest.raises(DataError, match=r'obsm\["spatial"\]: 1 point'):
        G.from_adata(a, "delaunay")
    a = spots()
    a.uns.clear()
    with pytest.raises(DataError, match=r'uns\["spfm"\]\["pixel_size_um"\]'):
        G.from_adata(a, "knn", k=3, units="um")
    with pytest.raises(DataError, match=r'obs\["array_row"\]'):
        G.from_adata(spots(), "square")
    with pytest.raises(DataError, match=r'obs\["batch"\]'):
        G.from_adata(spots(), "knn", k=3, sample_key="batch")


# ------------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_visium_hex_neighbours_are_the_six_nearest_spots_in_pixels():
    path = DATA / "visium_tiny" / "spatial" / "tissue_positions_list.csv"
    if not path.is_file():
        pytest.skip("../shared/data/visium_tiny not present")
    pos = pd.read_csv(path, header=None, names=["barcode", "in_tissue", "row", "col", "pxl_row", "pxl_col"])
    g = G.hex_grid_graph(pos["row"], pos["col"], pos=pos[["pxl_col", "pxl_row"]].to_numpy(float))
    assert_graph_invariants(g, len(pos))
    deg = degrees(g)
    assert (deg == 6).sum() > 0.9 * len(pos) and deg.max() == 6
    knn = G.knn_graph(pos[["pxl_col", "pxl_row"]].to_numpy(float), 6, symmetric=False)
    hex_in = {(a, b) for a, b in edge_set(g) if deg[b] == 6}
    knn_in = {(a, b) for a, b in edge_set(knn) if deg[b] == 6}
    assert hex_in == knn_in


@pytest.mark.slow
def test_knn_on_a_million_points():
    xy = np.random.default_rng(0).uniform(0, 20000, (1_000_000, 2))
    g = G.knn_graph(xy, 6)
    assert g.num_nodes == 1_000_000
    assert degrees(g).min() >= 6
    assert (g.edge_index[0] != g.edge_index[1]).all()
