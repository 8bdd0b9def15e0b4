"""HisToSGE head: modules, fitting, config round trip, tasks (recovery, denser lattice, embedding at new positions),
metrics and bad input."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from spfm.errors import DataError
from spfm.heads.histosge import HisToSGE, HisToSGEModel
from spfm.heads.histosge.metrics import gene_pearson, scores
from spfm.heads.histosge.tasks import check_positions, denser_positions, lattice_kind, recovery_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, G = 16, 12
SMALL = dict(heads=2, dim_head=8, mlp_dim=32, hidden=32, n_top_genes=G, seed=0, device="cpu", lr=3e-3)


def _reloaded(head: HisToSGE) -> HisToSGE:
    """The head rebuilt from its JSON-serialised config and its state dict (what the Hub round trip keeps)."""
    again = HisToSGE.from_config(json.loads(json.dumps(head.to_config())))
    again.module.load_state_dict(head.module.state_dict())
    return again


def slide(seed: int, rows: int = 10, cols: int = 10, genes: int = 30, hex_grid: bool = False,
          weights_seed: int = 100) -> ad.AnnData:
    """A lattice of spots whose counts are a smooth function of their (random) features, shared across slides."""
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    if hex_grid:
        cc = 2 * cc + (rr % 2)
    n = len(rr)
    feats = rng.normal(size=(n, D)).astype(np.float32)
    w = np.random.default_rng(weights_seed).normal(size=(D, genes))
    rate = np.exp(2.5 * np.tanh(feats @ w / 4) + 3.0)
    counts = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame({"array_row": rr + 2, "array_col": cc + 3}, index=[f"s{seed}_{i}" for i in range(n)])
    a = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))
    a.obsm["X_test"] = feats
    pitch = 100.0 if hex_grid else 200.0
    a.obsm["spatial"] = np.column_stack([100 + cc * pitch / (2 if hex_grid else 1), 80 + rr * pitch * 0.87]) / 0.5
    a.uns["spfm"] = {"pixel_size_um": 0.5, "technology": "Visium" if hex_grid else "Spatial Transcriptomics"}
    return a


# ----------------------------------------------------------------------------------------------- modules


def test_chunk_padding_does_not_leak():
    torch.manual_seed(0)
    m = HisToSGEModel(D, G, attention="chunk", heads=2, dim_head=8, mlp_dim=32).eval()
    feats = torch.randn(2, 6, D)
    xy = torch.randint(0, 20, (2, 6, 2)).float()
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    out = m.forward_chunks(feats, xy, pad)
    feats2 = feats.clone()
    feats2[1, 4:] = 100.0  # change only padded slots
    out2 = m.forward_chunks(feats2, xy, pad)
    assert out.shape == (2, 6, G)
    assert torch.allclose(out[1, :4], out2[1, :4], atol=1e-5)
    assert torch.allclose(out[0], out2[0])
    # the published positions are absolute: moving a chunk changes its output
    assert not torch.allclose(m.forward_chunks(feats, xy + 5, pad), out, atol=1e-4)


def test_knn_attention_is_local_and_translation_invariant():
    torch.manual_seed(0)
    m = HisToSGEModel(D, G, attention="knn", heads=2, dim_head=8, mlp_dim=32).eval()
    torch.nn.init.normal_(m.pos_proj.weight)  # zero-initialised: give positions an effect to test
    n = 20
    feats = torch.randn(n, D)
    xy = torch.rand(n, 2) * 1000
    nb = torch.stack([torch.randperm(n)[:4] for _ in range(n)])
    nb[0] = torch.tensor([1, 2, 3, 4])
    out = m.forward_knn(feats, xy, nb)
    assert out.shape == (n, G) and (out >= 0).all()  # ReLU output
    assert torch.allclose(m.forward_knn(feats, xy + torch.tensor([5000.0, -300.0]), nb), out, atol=1e-4)
    other = feats.clone()
    other[10:] += 3.0  # spots 10.. are not spot 0's context
    assert torch.allclose(m.forward_knn(other, xy, nb)[0], out[0], atol=1e-5)
    moved = xy.clone()
    moved[1] += 150.0  # a neighbour's offset changes spot 0's output
    assert not torch.allclose(m.forward_knn(feats, moved, nb)[0], out[0], atol=1e-5)


def test_fractional_array_coordinates_interpolate_embeddings():
    m = HisToSGEModel(D, G, attention="chunk", heads=2, dim_head=8, mlp_dim=32)
    c = torch.tensor([3.0, 3.5, 4.0])
    e = m._lookup(m.x_embed, c)
    assert torch.allclose(e[0], m.x_embed.weight[3]) and torch.allclose(e[2], m.x_embed.weight[4])
    assert torch.allclose(e[1], 0.5 * (m.x_embed.weight[3] + m.x_embed.weight[4]))


# ----------------------------------------------------------------------------------------------- fit / predict


@pytest.mark.parametrize("attention", ["chunk", "knn"])
def test_fit_predicts_held_out_slide(attention):
    train = [slide(0), slide(1)]
    test = slide(2)
    head = HisToSGE(attention=attention, epochs=150, chunk_size=20, n_neighbors=4, **SMALL)
    head.fit(train, progress=False)
    assert head.history[-1] < 0.5 * head.history[0]
    out = head.predict(test)
    assert out.shape == (test.n_obs, G) and list(out.var_names) == head.genes
    assert np.array_equal(out.X, out.layers["predicted"])
    trained = scores(out.layers["predicted"], out.layers["measured"])["pearson"]
    # an untrained head of the same shape does much worse: the score measures learning
    naive = HisToSGE.from_config(head.to_config())
    untrained = scores(naive.predict(test).layers["predicted"], out.layers["measured"])["pearson"]
    assert trained > 0.35 and trained > untrained + 0.25
    assert list(test.obsm["histosge_predicted"].columns) == head.genes


@pytest.mark.parametrize("attention", ["chunk", "knn"])
def test_config_round_trip(attention):
    head = HisToSGE(attention=attention, epochs=3, chunk_size=20, **SMALL).fit([slide(0)], progress=False)
    config = json.loads(json.dumps(head.to_config()))
    again = HisToSGE.from_config(config)
    again.module.load_state_dict(head.module.state_dict())
    test = slide(3)
    np.testing.assert_array_equal(again.predict(test).X, head.predict(test).X)
    assert config["genes"] == head.genes and config["dim"] == D and config["embedding_key"] == "X_test"


def test_chunk_option_without_positions():
    """positions="none" (an spfm option): no array tables, so array coordinates neither matter nor are needed."""
    head = HisToSGE(attention="chunk", positions="none", epochs=3, chunk_size=20, **SMALL).fit([slide(0)],
                                                                                              progress=False)
    assert not hasattr(head.module, "x_embed")
    test = slide(3)
    moved = test.copy()
    moved.obs["array_col"] += 40
    expected = head.predict(test).X
    np.testing.assert_array_equal(head.predict(moved).X, expected)
    no_array = ad.AnnData(test.X, obs=test.obs.drop(columns=["array_row", "array_col"]), var=test.var,
                          obsm=dict(test.obsm))
    np.testing.assert_array_equal(head.predict(no_array).X, expected)
    published = HisToSGE(attention="chunk", epochs=3, chunk_size=20, **SMALL).fit([slide(0)], progress=False)
    assert not np.allclose(published.predict(moved).X, published.predict(test).X, atol=1e-4)
    np.testing.assert_array_equal(_reloaded(head).predict(test).X, expected)
    with pytest.raises(DataError, match="positions"):
        HisToSGE(positions="relative")


def test_linear_output_option_has_no_final_relu_and_round_trips():
    """output="linear" (an spfm option): the gene head ends in a Linear, so no gene is stuck at a flat 0."""
    head = HisToSGE(attention="knn", output="linear", epochs=3, **SMALL).fit([slide(0)], progress=False)
    assert isinstance(head.module.gene_head.net[-1], torch.nn.Linear)
    published = HisToSGE(attention="knn", epochs=3, **SMALL).fit([slide(0)], progress=False)
    assert isinstance(published.module.gene_head.net[-1], torch.nn.ReLU)
    test = slide(3)
    expected = head.predict(test).X
    np.testing.assert_array_equal(_reloaded(head).predict(test).X, expected)
    with pytest.raises(DataError, match="output"):
        HisToSGE(output="softplus")


def test_seed_makes_fit_reproducible():
    a = HisToSGE(attention="knn", epochs=5, **SMALL).fit([slide(0)], progress=False)
    b = HisToSGE(attention="knn", epochs=5, **SMALL).fit([slide(0)], progress=False)
    np.testing.assert_array_equal(a.predict(slide(1)).X, b.predict(slide(1)).X)


def test_recovery_trains_on_kept_spots_only():
    a = slide(0)
    keep = recovery_mask(a.n_obs, 0.5, seed=1)
    assert keep.sum() == a.n_obs // 2
    head = HisToSGE(attention="knn", epochs=150, n_neighbors=4, **SMALL).fit(a, train_mask=keep, progress=False)
    out = head.predict(a)
    held = scores(out.layers["predicted"][~keep], out.layers["measured"][~keep])
    assert held["pearson"] > 0.35
    # the chunk model trains on the kept spots as their own slide: 50 kept spots are too few for chunks of 60
    with pytest.raises(DataError, match="too few"):
        HisToSGE(attention="chunk", chunk_size=60, epochs=1, **SMALL).fit(a, train_mask=keep, progress=False)


def test_genes_panel_given():
    head = HisToSGE(attention="knn", epochs=2, **{**SMALL, "n_top_genes": 5}, genes=["g3", "g1"])
    head.fit([slide(0)], progress=False)
    assert head.genes == ["g3", "g1"]
    with pytest.raises(DataError, match="panel gene"):
        HisToSGE(attention="knn", epochs=1, genes=["nope"], **SMALL).fit([slide(0)], progress=False)


# ----------------------------------------------------------------------------------------------- bad input


def test_missing_embeddings():
    a = slide(0)
    del a.obsm["X_test"]
    with pytest.raises(DataError, match="missing patch embeddings"):
        HisToSGE(epochs=1, **SMALL).fit([a], progress=False)
    with pytest.raises(DataError, match="obsm\\['X_other'\\]"):
        HisToSGE(epochs=1, embedding_key="X_other", **SMALL).fit([slide(0)], progress=False)


def test_gene_panel_mismatch_at_prediction():
    head = HisToSGE(attention="knn", epochs=2, **SMALL).fit([slide(0)], progress=False)
    test = slide(1)
    renamed = test[:, 1:].copy()  # one gene dropped
    renamed.var_names = [f"x{i}" for i in range(renamed.n_vars)]
    with pytest.raises(DataError, match="gene panel mismatch"):
        head.predict(renamed)
    out = head.predict(renamed, measured=False)  # predicting needs no genes
    assert "measured" not in out.layers
    no_genes = ad.AnnData(obs=test.obs.copy())
    no_genes.obsm["X_test"], no_genes.obsm["spatial"] = test.obsm["X_test"], test.obsm["spatial"]
    no_genes.uns["spfm"] = test.uns["spfm"]
    assert head.predict(no_genes).shape == (test.n_obs, G)


def test_embedding_dimension_mismatch():
    head = HisToSGE(attention="knn", epochs=2, **SMALL).fit([slide(0)], progress=False)
    test = slide(1)
    test.obsm["X_test"] = test.obsm["X_test"][:, :8]
    with pytest.raises(DataError, match="trained on 16"):
        head.predict(test)


def test_too_few_spots_for_chunk_size():
    with pytest.raises(DataError, match="too few for chunks of 500"):
        HisToSGE(attention="chunk", chunk_size=500, epochs=1, **SMALL).fit([slide(0)], progress=False)
    head = HisToSGE(attention="chunk", chunk_size=50, epochs=1, **SMALL).fit([slide(0)], progress=False)
    with pytest.raises(DataError, match="too few"):
        head.predict(slide(1)[:20])


def test_array_coordinates_outside_tables_and_missing():
    a = slide(0)
    a.obs["array_col"] = a.obs["array_col"] + 600
    with pytest.raises(DataError, match="outside the position tables"):
        HisToSGE(attention="chunk", chunk_size=20, epochs=1, **SMALL).fit([a], progress=False)
    b = slide(0)
    del b.obs["array_row"]
    with pytest.raises(DataError, match="array_row"):
        HisToSGE(attention="chunk", chunk_size=20, epochs=1, **SMALL).fit([b], progress=False)
    c = slide(0)
    del c.uns["spfm"]
    with pytest.raises(DataError, match="pixel_size_um"):
        HisToSGE(attention="knn", epochs=1, **SMALL).fit([c], progress=False)


def test_positions_outside_the_image():
    check_positions(np.array([[0.0, 0.0], [99.0, 49.0]]), (100, 50))
    with pytest.raises(DataError, match="outside the 100 x 50 px image"):
        check_positions(np.array([[10.0, 10.0], [120.0, 10.0]]), (100, 50))
    with pytest.raises(DataError, match="outside"):
        check_positions(np.array([[-1.0, 10.0]]), (100, 50))


def test_bad_options():
    with pytest.raises(DataError, match="attention"):
        HisToSGE(attention="global")
    with pytest.raises(TypeError, match="unknown"):
        HisToSGE(epoch=3)
    with pytest.raises(DataError, match="not fitted"):
        HisToSGE().predict(slide(0))


# ----------------------------------------------------------------------------------------------- tasks, metrics


def test_denser_square_lattice_midpoints():
    a = slide(0, rows=4, cols=5)
    assert lattice_kind(a) == "square"
    dense = denser_positions(a)
    new = dense[dense.obs["origin"] == "new"]
    # midpoints inside a 4 x 5 grid: (col + .5): 4 * 4, (row + .5): 3 * 5, both (diagonal centres): 3 * 4
    assert new.n_obs == 4 * 4 + 3 * 5 + 3 * 4
    assert dense.n_obs == a.n_obs + new.n_obs and list(dense.obs_names[: a.n_obs]) == list(a.obs_names)
    # a midpoint sits halfway between its two measured neighbours
    row = new.obs.query("array_row == 2.0 and array_col == 3.5")
    assert len(row) == 1
    p = dense.obsm["spatial"][dense.obs_names.get_loc(row.index[0])]
    ends = a.obsm["spatial"][(a.obs["array_row"] == 2).to_numpy() & a.obs["array_col"].isin([3, 4]).to_numpy()]
    np.testing.assert_allclose(p, ends.mean(axis=0), atol=1e-6)


def test_denser_hex_lattice_three_shifted_copies():
    a = slide(0, rows=6, cols=6, hex_grid=True)
    assert lattice_kind(a) == "hex"
    dense = denser_positions(a)
    new = dense.obs[dense.obs["origin"] == "new"]
    shifts = {(r % 1, (c - p) % 2) for r, c, p in zip(
        new["array_row"], new["array_col"], a.obs.loc[new["parent_spot"], "array_col"])}
    assert {s[0] for s in shifts} == {0.0, 0.5}
    # roughly 4x density inside the tissue (edges lose some copies)
    assert 2.5 * a.n_obs < dense.n_obs <= 4 * a.n_obs
    # every new position sits at half a pitch from its nearest measured spot
    from scipy.spatial import cKDTree

    d, _ = cKDTree(a.obsm["spatial"]).query(dense.obsm["spatial"][a.n_obs:])
    pitch = dense.uns["histosge_lattice"]["pitch_px"]
    np.testing.assert_allclose(d, pitch / 2, rtol=0.05)


def test_knn_head_predicts_at_denser_positions():
    head = HisToSGE(attention="chunk", chunk_size=20, epochs=2, **SMALL).fit([slide(0)], progress=False)
    dense = denser_positions(slide(1))
    dense.obsm["X_test"] = np.random.default_rng(0).normal(size=(dense.n_obs, D)).astype(np.float32)
    out = head.predict(dense)
    assert out.shape == (dense.n_obs, G) and "measured" not in out.layers
    assert np.isfinite(out.X).all()


def test_gene_pearson_matches_scipy_and_masks_constant():
    from scipy.stats import pearsonr

    rng = np.random.default_rng(0)
    t = rng.normal(size=(30, 4))
    p = t + rng.normal(size=(30, 4))
    t[:, 2] = 1.0
    r = gene_pearson(p, t)
    assert np.isnan(r[2])
    for g in (0, 1, 3):
        assert r[g] == pytest.approx(pearsonr(p[:, g], t[:, g])[0])
    s = scores(p, t)
    assert s["n_nan_genes"] == 1 and s["pearson"] == pytest.approx(np.nanmean(r))
    assert s["pearson_nan_as_zero"] == pytest.approx(np.nansum(r) / 4)
    assert s["mse"] == pytest.approx(((p - t) ** 2).mean())


def test_recovery_mask_bad_fraction():
    with pytest.raises(DataError, match="fraction"):
        recovery_mask(10, 1.0)
