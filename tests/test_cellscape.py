"""CellScape head: genomic map, sampler, losses, PCGrad, the AnnData API, round trip, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spfm.errors import DataError
from spfm.heads.cellscape import CellScape
from spfm.heads.cellscape.genomap import genomic_layout, grid_side, to_maps
from spfm.heads.cellscape.losses import neighbourhood_contrastive, pcgrad_backward, sce_loss
from spfm.heads.cellscape.sampler import CSRGraph, epoch_batches, locality_order
from spfm.heads.cellscape.simulate import simulate_tissue
from spfm.heads.domains import refine_labels

FAST = dict(epochs=4, hidden_dim=32, latent_dim=8, fused_dim=8, heads=2, batch_size=256)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tissue():
    return simulate_tissue(400, 12, n_domains=3, n_cell_types=4, seed=1)


# ---------------------------------------------------------------------------------------------- genomic map
def test_genomic_layout_is_one_to_one_and_puts_correlated_genes_together():
    rng = np.random.default_rng(0)
    n, p = 400, 16
    X = rng.normal(size=(n, p))
    X[:, 1] = X[:, 0] + 0.05 * rng.normal(size=n)  # genes 0 and 1 nearly identical
    X[:, 2] = X[:, 0] + 0.05 * rng.normal(size=n)
    grid = genomic_layout(X)
    q = grid_side(p)
    assert q == 4 and grid.shape == (p,) and len(set(grid.tolist())) == p and grid.max() < q * q
    rc = np.stack(np.divmod(grid, q), 1)
    close = np.abs(rc[0] - rc[1]).max()
    # the three correlated genes sit within one step of each other on the grid (Chebyshev distance)
    assert close <= 1 and np.abs(rc[0] - rc[2]).max() <= 1


def test_larger_map_side_keeps_genes_apart_and_too_small_is_refused():
    X = np.random.default_rng(0).normal(size=(200, 10))  # p = 10: default q = 4
    grid = genomic_layout(X, q=6)
    assert len(set(grid.tolist())) == 10 and grid.max() < 36
    with pytest.raises(DataError, match="cannot hold 10 genes"):
        genomic_layout(X, q=3)


def test_to_maps_places_values_and_pads_with_zeros():
    x = torch.arange(1, 6, dtype=torch.float32)[None, :]  # p = 5 -> q = 3
    grid = torch.tensor([8, 0, 4, 2, 6])
    maps = to_maps(x, grid, 3)
    assert maps.shape == (1, 1, 3, 3)
    flat = maps.view(-1)
    assert flat[8] == 1 and flat[0] == 2 and flat[4] == 3 and flat[2] == 4 and flat[6] == 5
    assert flat[[1, 3, 5, 7]].abs().sum() == 0


def test_one_gene_panel_is_refused_by_the_layout():
    with pytest.raises(DataError, match="at least 2 genes"):
        genomic_layout(np.ones((10, 1)))


# ---------------------------------------------------------------------------------------------- sampler
def test_subgraph_matches_pyg_k_hop_and_is_induced():
    from torch_geometric.utils import k_hop_subgraph, to_undirected

    g = torch.Generator().manual_seed(0)
    ei = to_undirected(torch.randint(0, 300, (2, 900), generator=g))
    ei = ei[:, ei[0] != ei[1]]
    csr = CSRGraph(ei, 300)
    seeds = torch.tensor([5, 17, 200])
    sub = csr.subgraph(seeds, 2)
    expected, _, _, _ = k_hop_subgraph(seeds, 2, ei, num_nodes=300)
    assert sorted(sub.nodes.tolist()) == sorted(expected.tolist())
    assert sub.nodes[:3].tolist() == seeds.tolist() and sub.n_seeds == 3
    inside = set(sub.nodes.tolist())
    want = {(a, b) for a, b in ei.t().tolist() if a in inside and b in inside}
    got = {tuple(e) for e in sub.nodes[sub.edge_index].t().tolist()}
    assert got == want
    assert int(sub.hop.max()) <= 2
    assert (csr._local >= 0).sum() == 0  # scratch reset for the next batch


def test_subgraph_lists_nodes_by_hop_and_rows_are_hop_prefixes():
    from torch_geometric.utils import to_undirected

    g = torch.Generator().manual_seed(1)
    ei = to_undirected(torch.randint(0, 400, (2, 1000), generator=g))
    sub = CSRGraph(ei[:, ei[0] != ei[1]], 400).subgraph(torch.tensor([3, 50, 301]), 3)
    assert (sub.hop[1:] >= sub.hop[:-1]).all()  # by hop: "within h hops" is a prefix of the nodes
    counts = [int((sub.hop <= h).sum()) for h in (2, 1, 0)]
    assert sub.rows(3) == counts and counts[-1] == 3 and counts[0] < len(sub.nodes)
    assert sub.rows(1) == [3]


@pytest.mark.parametrize("variant", ["full", "cci"])
def test_trimmed_layers_give_the_untrimmed_rows_the_losses_read(variant):
    """With ``rows`` each layer computes only the rows later layers read; those rows must equal the untrimmed pass
    (the CNN in eval mode: in training its BatchNorm statistics are those of the rows it sees)."""
    from spfm.data.graphs import delaunay_graph
    from spfm.heads.cellscape.model import CellScapeModule

    torch.manual_seed(0)
    xy = np.random.default_rng(0).uniform(0, 100, size=(600, 2))
    ei = delaunay_graph(xy).edge_index
    sub = CSRGraph(ei, 600).subgraph(torch.tensor([7, 99, 250, 420]), 3)
    x = torch.rand(len(sub.nodes), 12)
    mask = torch.rand(len(sub.nodes)) < 0.3
    module = CellScapeModule(12, variant=variant, hidden_dim=16, latent_dim=8, fused_dim=8, heads=2)
    module.train(variant == "cci")
    rows = sub.rows(3)
    z_all, x_hat_all = module(x, sub.edge_index, mask)
    z, x_hat = module(x, sub.edge_index, mask, rows)
    assert z.shape[0] == rows[1] < len(sub.nodes) and x_hat.shape[0] == rows[2] == 4
    torch.testing.assert_close(z, z_all[: rows[1]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_hat, x_hat_all[:4], rtol=1e-5, atol=1e-6)
    zs, zi, _ = module.encode(x, sub.edge_index, sub.rows(2))
    assert zs.shape[0] == 4
    torch.testing.assert_close(zs, module.encode(x, sub.edge_index)[0][:4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,concat", [(4, True), (1, False)])
def test_gat_layer_in_input_space_equals_pyg_gatconv(heads, concat):
    """GATLayer on a narrow input (p <= C: it weights and sums inputs, then projects) gives GATConv's outputs and
    parameter gradients, with the same state_dict; also when the graph carries a self loop and only the first rows
    are asked for."""
    from torch_geometric.nn import GATConv

    from spfm.heads.cellscape.model import GATLayer

    torch.manual_seed(0)
    n, p, c = 60, 5, 8
    layer = GATLayer(p, c, heads=heads, concat=concat)
    ref = GATConv(p, c, heads=heads, concat=concat)
    ref.load_state_dict(layer.state_dict())
    assert layer._input_space() and list(layer.state_dict()) == list(ref.state_dict())
    with torch.no_grad():  # non-zero bias and attention that differs between heads
        for q in layer.parameters():
            q.normal_()
        ref.load_state_dict(layer.state_dict())
    x = torch.randn(n, p)
    ei = torch.randint(0, n, (2, 300))
    ei[:, 0] = torch.tensor([3, 3])  # a self loop: GATConv keeps exactly one per node
    for n_out in (None, 17):
        out = layer(x, ei, n_out)
        expected = ref(x, ei)[: n if n_out is None else n_out]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        layer.zero_grad(), ref.zero_grad()
        out.pow(2).sum().backward()
        expected.pow(2).sum().backward()
        for (name, a), b in zip(layer.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
    wide = GATLayer(2 * c, c, heads=heads, concat=concat)  # input wider than a head: GATConv's own path
    assert not wide._input_space()


def test_locality_order_walks_a_z_curve_sample_by_sample():
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2).astype(float)  # row-major (x, y)
    visited = [tuple(int(v) for v in grid[i]) for i in locality_order(grid * 7.5 + 3)]  # scale and offset ignored
    assert visited[:8] == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    assert visited[8:12] == [(0, 2), (1, 2), (0, 3), (1, 3)]
    groups = np.array(["b", "a"] * 8)  # two samples interleaved in index order, sharing coordinates
    order = locality_order(grid, groups)
    assert sorted(order) == list(range(16))
    assert (groups[order[:8]] == "b").all() and (groups[order[8:]] == "a").all()  # first-seen sample first


def test_spatial_epoch_batches_are_compact_patches_covering_every_cell():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(1000, 2))
    gen = torch.Generator().manual_seed(0)
    zorder = torch.from_numpy(locality_order(xy))

    def mean_extent(batches):  # mean bounding-box diagonal of the batches of 64 or more cells
        return np.mean([np.ptp(xy[b.numpy()], axis=0).sum() for b in batches if len(b) >= 64])

    for batches in (epoch_batches(1000, 64, gen), epoch_batches(1000, 64, gen, zorder)):
        assert sorted(torch.cat(batches).tolist()) == list(range(1000))  # each cell once per epoch
        assert max(len(b) for b in batches) == 64
    spatial = epoch_batches(1000, 64, gen, zorder)
    assert mean_extent(spatial) < 0.5 * mean_extent(epoch_batches(1000, 64, gen))  # random: ~190 of a 200 maximum
    again = epoch_batches(1000, 64, gen, zorder)
    assert [b.tolist() for b in again] != [b.tolist() for b in spatial]  # new offset and batch order each epoch


def test_fanout_caps_neighbours_per_node():
    ei = torch.stack([torch.arange(1, 50), torch.zeros(49, dtype=torch.long)])  # star into node 0
    csr = CSRGraph(ei, 50)
    tgt, src = csr.neighbours(torch.tensor([0]), fanout=5, generator=torch.Generator().manual_seed(0))
    assert len(src) == 5 and len(set(src.tolist())) == 5 and (tgt == 0).all()
    _, all_src = csr.neighbours(torch.tensor([0]))
    assert sorted(all_src.tolist()) == list(range(1, 50))


# ---------------------------------------------------------------------------------------------- losses
def test_sce_loss_zero_for_parallel_vectors_and_grows_with_angle():
    x = torch.rand(10, 6) + 0.1
    assert sce_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
    small = sce_loss(x, x + 0.1 * torch.randn(10, 6, generator=torch.Generator().manual_seed(0)))
    big = sce_loss(x, -x)
    assert 0 < small.item() < big.item() == pytest.approx(8.0)  # (1 - (-1))^3


def test_contrastive_prefers_embeddings_that_agree_with_neighbours():
    # two cliques of 4 cells; neighbours within a clique
    edges = [(a, b) for c in (range(4), range(4, 8)) for a in c for b in c if a != b]
    ei = torch.tensor(edges).t()
    anchors = torch.arange(8)
    aligned = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(4, 1), torch.tensor([[0.0, 1.0]]).repeat(4, 1)])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(4, 1)
    assert neighbourhood_contrastive(aligned, anchors, ei, 0.5) < neighbourhood_contrastive(mixed, anchors, ei, 0.5)
    # equals its formula on a tiny case: one anchor 0 with neighbours {1}, anchor 1 with {0}
    z = torch.nn.functional.normalize(torch.randn(2, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    ei2 = torch.tensor([[1, 0], [0, 1]])
    s = z @ z.T / 0.5
    want = 0.5 * ((torch.logsumexp(s[0], 0) - s[0, 1]) + (torch.logsumexp(s[1], 0) - s[1, 0]))
    assert neighbourhood_contrastive(z, torch.tensor([0, 1]), ei2, 0.5).item() == pytest.approx(want.item(), 1e-5)


def test_pcgrad_projects_conflicting_gradients_and_keeps_private_ones():
    w = torch.nn.Parameter(torch.zeros(2))
    v = torch.nn.Parameter(torch.zeros(1))  # only the first loss reaches it
    l1 = (w * torch.tensor([1.0, 0.0])).sum() + 2 * v.sum()
    l2 = (w * torch.tensor([-1.0, 1.0])).sum()
    info = pcgrad_backward([l1, l2], [w, v])
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert torch.allclose(w.grad, p1 + p2)
    assert v.grad.item() == pytest.approx(2.0)
    assert info["conflict"] == 1.0 and info["cosine"] < 0
    w.grad = None
    pcgrad_backward([(w * g1).sum(), (w * torch.tensor([1.0, 1.0])).sum()], [w])
    assert torch.allclose(w.grad, torch.tensor([2.0, 1.0]))  # no conflict: plain sum


# ---------------------------------------------------------------------------------------------- head
def _same_label_edge_fraction(labels, edge_index) -> float:
    src, dst = edge_index.numpy()
    labels = np.asarray(labels)
    return float(np.mean(labels[src] == labels[dst]))


def test_run_writes_keys_and_finds_layers(tissue):
    from spfm.eval.metrics import clustering_scores
    from spfm.heads.cellscape import prep
    from spfm.heads.domains import cluster_embedding

    adata = tissue.copy()
    head = CellScape(**{**FAST, "epochs": 30, "hidden_dim": 64, "latent_dim": 16, "fused_dim": 16, "batch_size": 512})
    head.run(adata, n_domains=3, n_cell_types=4, seed=0, progress=False)
    assert adata.obsm["X_cellscape_spatial"].shape == (400, 16)
    assert adata.obsm["X_cellscape_intrinsic"].shape == (400, 16)
    assert adata.obs["domain"].nunique() == 3 and adata.obs["cell_type_cluster"].nunique() == 4
    assert head.graph_kind == "delaunay" and len(head.genes) == 12
    assert head.history[-1]["recon"] < head.history[0]["recon"]
    assert adata.uns["cellscape"]["n_domains"] == 3
    # Against the non-spatial floor (log-expression, PCA, the same mixture): layers are mostly invisible to one
    # cell's profile, so CellScape's domains must agree more with the layers and be spatially more coherent.
    x = prep.expression(adata, head.genes)
    floor = cluster_embedding(x, 3, n_pcs=30, seed=0)
    truth = adata.obs["domain_true"].to_numpy()
    ours = adata.obs["domain"].to_numpy()
    assert clustering_scores(truth, ours)["nmi"] > clustering_scores(truth, floor)["nmi"] + 0.05
    graph = prep.spatial_graph(adata, "delaunay", 6, None)
    assert _same_label_edge_fraction(ours, graph.edge_index) > _same_label_edge_fraction(floor, graph.edge_index)


def test_cci_variant_has_no_intrinsic_branch(tissue):
    adata = tissue.copy()
    head = CellScape(variant="cci", **FAST)
    head.run(adata, n_domains=3, seed=0, progress=False)
    assert "X_cellscape_intrinsic" not in adata.obsm and "cell_type_cluster" not in adata.obs
    assert head.module.intrinsic is None and head.module.grid_index.numel() == 0


def test_round_trip_config_and_state_dict_gives_identical_outputs(tissue):
    import json

    head = CellScape(**FAST, map_side=5).fit(tissue, seed=3, progress=False)  # 12 genes on a 5 x 5 map (not 4 x 4)
    assert head.module.q == 5
    config = json.loads(json.dumps(head.to_config()))
    state = {k: v.clone() for k, v in head.module.state_dict().items()}
    assert "grid_index" in state and not torch.equal(state["grid_index"], torch.arange(12))
    restored = CellScape.from_config(config)
    restored.module.load_state_dict(state)
    a_s, a_i = head.embed(tissue)
    b_s, b_i = restored.embed(tissue)
    np.testing.assert_array_equal(a_s, b_s)
    np.testing.assert_array_equal(a_i, b_i)


def test_same_seed_same_embedding_and_new_data_map_the_same_genes(tissue):
    a = CellScape(**FAST).fit(tissue, seed=0, progress=False).embed(tissue)[0]
    b = CellScape(**FAST).fit(tissue, seed=0, progress=False).embed(tissue)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    head = CellScape(**FAST).fit(tissue, seed=0, progress=False)
    other = simulate_tissue(150, 12, n_domains=3, seed=9)
    other = other[:, ::-1].copy()  # genes in another order: the panel is selected by name
    zs, zi = head.embed(other)
    assert zs.shape == (150, 8) and np.isfinite(zs).all() and np.isfinite(zi).all()


def test_embed_is_exact_whatever_the_batch_size(tissue):
    """Seeds go in Z-order and each batch's outputs go back to their own rows: any batch size gives the full-graph
    embedding."""
    head = CellScape(**FAST).fit(tissue, seed=0, progress=False)
    x, graph = head._prepare(tissue, None)
    with torch.no_grad():  # one pass over the whole graph, rows in the AnnData's order
        whole_s, whole_i, _ = (z.numpy() for z in head.module.eval().encode(x, graph.edge_index))
    for bs in (37, 128, tissue.n_obs):
        zs, zi = head.embed(tissue, batch_size=bs)
        np.testing.assert_allclose(zs, whole_s, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(zi, whole_i, rtol=1e-5, atol=1e-5)


def test_spatial_batch_order_trains_reproducibly(tissue):
    a = CellScape(**FAST, batch_order="spatial").fit(tissue, seed=0, progress=False)
    b = CellScape(**FAST, batch_order="spatial").fit(tissue, seed=0, progress=False)
    random = CellScape(**FAST).fit(tissue, seed=0, progress=False)
    za, zb = a.embed(tissue)[0], b.embed(tissue)[0]
    np.testing.assert_allclose(za, zb, rtol=1e-5, atol=1e-6)
    assert np.isfinite(za).all() and not np.allclose(za, random.embed(tissue)[0])
    assert a.timing["steps"] == random.timing["steps"] == FAST["epochs"] * 2  # 400 cells, batches of 256
    with pytest.raises(DataError, match="batch_order"):
        CellScape(batch_order="hilbert")


def test_multi_sample_combat_and_block_diagonal_graph():
    import anndata as ad

    from spfm.heads.cellscape import prep

    a = simulate_tissue(200, 10, n_domains=2, seed=2)
    b = simulate_tissue(200, 10, n_domains=2, seed=3)
    b.X = b.X.toarray()
    b.X[:, 0] += 20  # a gene-specific batch effect
    both = ad.concat({"s1": a, "s2": b}, label="sample", index_unique="-")
    both.obsm["spatial"] = np.concatenate([a.obsm["spatial"], b.obsm["spatial"]])
    graph = prep.spatial_graph(both, "delaunay", 6, "sample")
    src, dst = graph.edge_index
    assert ((src < 200) == (dst < 200)).all()  # no edge across samples
    raw = prep.expression(both, list(both.var_names))
    x = prep.expression(both, list(both.var_names), batch_key="sample")
    gap_raw = abs(raw[:200, 0].mean() - raw[200:, 0].mean())
    gap = abs(x[:200, 0].mean() - x[200:, 0].mean())
    assert gap < 0.1 * gap_raw  # ComBat aligns the batch means of the gene
    head = CellScape(**FAST)
    head.run(both, n_domains=2, batch_key="sample", refine_r=4, seed=0, progress=False)
    assert both.obs["domain"].nunique() == 2 and head.to_config()["batch_key"] == "sample"


def test_graph_choice_follows_the_technology(tissue):
    from spfm.heads.cellscape.prep import resolve_graph

    adata = tissue.copy()
    assert resolve_graph(adata, "auto") == "delaunay"
    adata.uns["spfm"] = {**adata.uns["spfm"], "technology": "Visium"}
    assert resolve_graph(adata, "auto") == "knn"
    with pytest.raises(DataError, match="graph must be"):
        resolve_graph(adata, "voronoi")


def test_refine_labels_majority_vote():
    xy = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2).astype(float)
    labels = (xy[:, 0] >= 5).astype(int)
    labels[22] = 1  # an isolated wrong label inside the left half
    out = refine_labels(labels, xy, 4)
    assert out[22] == 0 and (out != labels).sum() == 1
    with pytest.raises(DataError, match="r must be"):
        refine_labels(labels, xy, 0)


# ---------------------------------------------------------------------------------------------- bad input
def test_fewer_cells_than_domains(tissue):
    small = tissue[:5].copy()
    with pytest.raises(DataError, match="fewer cells") as err:
        CellScape(**FAST).run(small, n_domains=6, progress=False)
    assert err.value.field == "n_domains"


def test_duplicate_coordinates_are_refused_or_jittered(tissue):
    adata = tissue.copy()
    adata.obsm["spatial"][7] = adata.obsm["spatial"][3]
    with pytest.raises(DataError, match="share coordinates") as err:
        CellScape(**FAST).fit(adata, progress=False)
    assert err.value.field == 'obsm["spatial"]'
    head = CellScape(**{**FAST, "epochs": 1, "duplicates": "jitter"}).fit(adata, progress=False)
    assert head.embed(adata)[0].shape[0] == adata.n_obs


def test_one_gene_panel(tissue):
    with pytest.raises(DataError, match="1 gene") as err:
        CellScape(**FAST).fit(tissue[:, :1].copy(), progress=False)
    assert err.value.field == "var_names"


def test_nans_in_expression_and_coordinates(tissue):
    adata = tissue.copy()
    X = adata.X.toarray()
    X[2, 3] = np.nan
    adata.X = X
    with pytest.raises(DataError, match="NaN") as err:
        CellScape(**FAST).fit(adata, progress=False)
    assert err.value.field == "X"
    adata = tissue.copy()
    adata.obsm["spatial"][0, 1] = np.nan
    with pytest.raises(DataError, match="NaN") as err:
        CellScape(**FAST).fit(adata, progress=False)
    assert err.value.field == 'obsm["spatial"]'


def test_other_bad_inputs(tissue):
    with pytest.raises(DataError, match="unknown CellScape"):
        CellScape(lr_schedule="cosine")
    with pytest.raises(DataError, match="variant"):
        CellScape(variant="both")
    adata = tissue.copy()
    del adata.obsm["spatial"]
    with pytest.raises(DataError, match="coordinates"):
        CellScape(**FAST).fit(adata, progress=False)
    with pytest.raises(DataError, match="not fitted"):
        CellScape(**FAST).embed(tissue)
    with pytest.raises(DataError, match="batch column"):
        CellScape(**FAST).fit(tissue, batch_key="slide", progress=False)
    head = CellScape(**FAST).fit(tissue, progress=False)
    with pytest.raises(DataError, match="missing"):
        head.embed(tissue[:, 2:].copy())


def test_shipped_recipes_name_valid_hyperparameters():
    import inspect

    import yaml
    from conftest import PROJECT_ROOT

    recipes = sorted((PROJECT_ROOT / "recipes").glob("cellscape_*.yaml"))
    assert len(recipes) >= 3
    run_args = set(inspect.signature(CellScape.run).parameters)
    for path in recipes:
        recipe = yaml.safe_load(path.read_text())
        assert recipe["head"] == "CellScape"
        CellScape(**recipe["params"])  # unknown keys raise DataError
        assert set(recipe["run"]) <= run_args, path.name


def test_cli_domains_writes_the_keys(tmp_path, tissue):
    from spfm.cli import main

    src = tmp_path / "in.h5ad"
    tissue.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    assert main(["domains", str(src), "-o", str(out), "--n-domains", "3", "--epochs", "2", "--method",
                 "cellscape-cci", "--no-progress"]) == 0
    import anndata as ad

    result = ad.read_h5ad(out)
    assert "X_cellscape_spatial" in result.obsm and result.obs["domain"].nunique() == 3
    assert result.uns["cellscape"]["config"]["hparams"]["batch_order"] == "random"
    assert main(["domains", str(src), "-o", str(out), "--n-domains", "3", "--epochs", "2", "--batch-order", "spatial",
                 "--no-progress"]) == 0
    assert ad.read_h5ad(out).uns["cellscape"]["config"]["hparams"]["batch_order"] == "spatial"
    assert main(["domains", str(src), "-o", str(tmp_path / "x.h5ad"), "--n-domains", "500", "--epochs", "2",
                 "--no-progress"]) != 0  # fewer cells than domains: a clear error, exit status non-zero
    assert not (tmp_path / "x.h5ad").exists()


def test_plots_write_pngs(tmp_path, tissue):
    from spfm.pl import plot_cellscape_domains

    adata = tissue.copy()
    CellScape(**FAST).run(adata, 3, seed=0, progress=False)
    path = plot_cellscape_domains(adata, tmp_path / "d.png")  # annotation auto-detected: obs["domain_true"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.slow
def test_umap_plot(tmp_path, tissue):
    from spfm.pl import plot_cellscape_umap

    adata = tissue.copy()
    CellScape(**FAST).run(adata, 3, n_cell_types=4, seed=0, progress=False)
    assert plot_cellscape_umap(adata, tmp_path / "u.png").stat().st_size > 5000


@pytest.mark.slow
def test_starmap_bz5_beats_the_non_spatial_floor(shared_data):
    import anndata as ad

    from spfm.eval.metrics import clustering_scores
    from spfm.heads.cellscape import prep
    from spfm.heads.domains import cluster_embedding

    adata = ad.read_h5ad(shared_data / "starmap_mpfc" / "BZ5.h5ad")
    truth = adata.obs["layer"].astype(str).to_numpy()
    floor = cluster_embedding(prep.expression(adata, list(adata.var_names)), 4, n_pcs=30, seed=0)
    CellScape().run(adata, 4, seed=0, progress=False)
    ours = clustering_scores(truth, adata.obs["domain"].astype(str).to_numpy())["nmi"]
    assert ours > clustering_scores(truth, floor)["nmi"] + 0.2  # floor ~0.30, CellScape ~0.7 (benchmark)


def test_hub_save_and_load_round_trip(tmp_path, tissue):
    from spfm.hub.api import from_pretrained, save_pretrained

    head = CellScape(**FAST).fit(tissue, seed=0, progress=False)
    save_pretrained(head, tmp_path / "model")
    loaded = from_pretrained(tmp_path / "model")
    restored = getattr(loaded, "head", loaded)
    np.testing.assert_array_equal(head.embed(tissue)[0], restored.embed(tissue)[0])
