"""SpatialGlue head: simulation, preprocessing, graphs, network, AnnData API, config round trip, bad input, CLI."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from spfm.data.simulate.spatialglue import spatialglue_simulation
from spfm.errors import DataError
from spfm.heads.spatialglue import SpatialGlue, SpatialGlueModule
from spfm.heads.spatialglue import graphs as sg_graphs
from spfm.heads.spatialglue.model import pairs, spmm
from spfm.heads.spatialglue.preprocess import apply_modality, fit_modality

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_pair():
    """A 24 x 24 grid (576 spots) of the paper's simulation with fewer features, counts rounded to integers."""
    rna, protein = spatialglue_simulation(setting=1, seed=3, block=4, n_features=(120, 24))
    return rna, protein


def _fast(**kw) -> SpatialGlue:
    base = dict(datatype="SPOTS", epochs=25, lr=1e-3, n_comps=12, n_domains=5, seed=0)
    base.update(kw)
    return SpatialGlue(**base)


# ------------------------------------------------------------------------------------------------ simulation


def test_simulation_truth_and_modality_specific_factors():
    rna, protein = spatialglue_simulation(setting=2, seed=0)
    assert rna.shape == (1296, 1000) and protein.shape == (1296, 100)
    assert rna.obs_names.equals(protein.obs_names)
    counts = rna.obs["label"].value_counts().sort_index().tolist()
    assert counts == [432, 180, 288, 216, 180]  # 12, 5, 8, 6, 5 base cells of 36 spots
    label = rna.obs["label"].to_numpy()
    # Factor 2 (label 2) is visible in modality 2 only; factor 3 in modality 1 only (mean |difference| to background).
    def diff(X, lab):
        return np.abs(X[label == lab].mean(0) - X[label == 0].mean(0)).mean()

    assert diff(protein.X, 2) > 2 and diff(rna.X, 3) > 1  # loadings 11 (spatial) / 9 (non-spatial), NSF's split
    assert diff(rna.X, 2) < 0.2 * diff(protein.X, 2) and diff(protein.X, 3) < 0.5 * diff(rna.X, 3)
    # Zero inflation in modality 1 only: more values sit at the noise floor there.
    assert (rna.X < 4).mean() > (protein.X < 4).mean() + 0.1
    assert (rna.X >= 0).all()


def test_simulation_is_seeded_and_settings_change_background():
    a1, _ = spatialglue_simulation(1, seed=5, block=2)
    a2, _ = spatialglue_simulation(1, seed=5, block=2)
    b, _ = spatialglue_simulation(1, seed=6, block=2)
    np.testing.assert_array_equal(a1.X, a2.X)
    assert not np.array_equal(a1.X, b.X)
    assert a1.uns["simulation"]["background"] == 0.2
    # The spatial / non-spatial split of the expression mean changes the data (NSF's 0.55 by default).
    c, _ = spatialglue_simulation(1, seed=5, block=2, spatial_fraction=0.9)
    assert c.uns["simulation"]["spatial_fraction"] == 0.9 and not np.array_equal(a1.X, c.X)
    assert spatialglue_simulation(5, seed=5, block=2)[1].uns["simulation"]["background"] == 0.8
    with pytest.raises(DataError, match="setting"):
        spatialglue_simulation(6)


# ------------------------------------------------------------------------------------------------ preprocessing


def test_protein_preprocessing_is_clr_scale_pca_and_replays(small_pair):
    _, protein = small_pair
    x, fitted, arrays = fit_modality(protein, "protein", "protein", n_comps=8, scale=True, seed=0)
    X = protein.X.astype(np.float64)
    clr = np.log1p(X / np.exp(np.log1p(X).sum(1, keepdims=True) / X.shape[1]))
    z = (clr - clr.mean(0)) / clr.std(0, ddof=1)
    # PCA scores span the top principal subspace of the scaled CLR data.
    u, s, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    proj = x @ np.linalg.pinv(x) @ (u[:, :8] * s[:8])
    np.testing.assert_allclose(proj, u[:, :8] * s[:8], atol=1e-3 * s[0])
    np.testing.assert_allclose(apply_modality(protein, fitted, arrays), x, atol=1e-3)
    assert fitted.features == list(protein.var_names) and fitted.array_shapes["pca_components"] == [8, 24]


def test_rna_hvgs_on_counts_and_lsi_matches_shared_lsi():
    from spfm.data.preprocess import lsi

    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(rng.gamma(0.5, 2.0, (300, 400))).astype(np.float32))
    a = ad.AnnData(counts, var=pd.DataFrame(index=[f"g{i}" for i in range(400)]))
    a.obs_names = [f"s{i}" for i in range(300)]
    x, fitted, _ = fit_modality(a, "rna", "rna", n_comps=10, scale=True, n_hvg=100, seed=0)
    assert x.shape == (300, 10) and len(fitted.selected) == 100
    peaks = a.copy()
    xa, fa, arrays = fit_modality(peaks, "atac", "atac", n_comps=10, scale=True, seed=0)
    lsi(peaks, n_components=10, random_state=0)
    np.testing.assert_allclose(np.abs(xa), np.abs(peaks.obsm["X_lsi"]), atol=1e-4)
    np.testing.assert_allclose(apply_modality(a, fa, arrays), xa, atol=1e-3)


# ------------------------------------------------------------------------------------------------ graphs + model


def test_adjacency_is_symmetric_gcn_normalisation():
    xy = np.array([[0, 0], [1, 0], [3, 0], [0, 2], [5, 5]], dtype=float)
    A = sg_graphs.spatial_adjacency(xy, 1).to_dense().numpy()
    # 1-NN directed: 0<->1, 2->1, 3->0, 4->2; symmetrised, + I, D^-1/2 (A + I) D^-1/2.
    B = np.zeros((5, 5))
    for i, j in [(0, 1), (2, 1), (3, 0), (4, 2)]:
        B[i, j] = B[j, i] = 1
    B += np.eye(5)
    d = B.sum(1) ** -0.5
    np.testing.assert_allclose(A, d[:, None] * B * d[None, :], rtol=1e-6)


def test_symmetric_spmm_gradient_matches_dense():
    xy = np.random.default_rng(0).random((40, 2))
    A = sg_graphs.spatial_adjacency(xy, 3)
    X = torch.randn(40, 5, dtype=torch.float32, requires_grad=True)
    G = torch.randn(40, 5)
    (spmm(A, X) * G).sum().backward()
    Xd = X.detach().clone().requires_grad_(True)
    (A.to_dense() @ Xd * G).sum().backward()
    torch.testing.assert_close(X.grad, Xd.grad)


def test_module_initialises_in_reference_order_and_shares_encoder_weights():
    torch.manual_seed(7)
    module = SpatialGlueModule([10, 6], 8)
    torch.manual_seed(7)
    expected = []
    for shape in [(10, 8), (8, 10), (6, 8), (8, 6), (8, 8), (8, 1), (8, 8), (8, 1), (8, 8), (8, 1)]:
        expected.append(torch.nn.init.xavier_uniform_(torch.empty(shape)))
    got = [module.encoders[0].weight, module.decoders[0].weight, module.encoders[1].weight, module.decoders[1].weight,
           module.within[0].w_omega, module.within[0].u_omega, module.within[1].w_omega, module.within[1].u_omega,
           module.cross.w_omega, module.cross.u_omega]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.detach(), e)
    # The encoder is one linear map for both graphs: with identity graphs both views equal X W.
    n = 12
    eye = torch.eye(n).to_sparse_csr()
    X = [torch.randn(n, 10), torch.randn(n, 6)]
    out = module(X, eye, [eye, eye])
    torch.testing.assert_close(out["latent"][0], X[0] @ module.encoders[0].weight)
    assert set(out["across"]) == {(0, 1), (1, 0)}


def test_three_modalities_attention_weights_sum_to_one():
    module = SpatialGlueModule([5, 4, 3], 8)
    n = 30
    xy = np.random.default_rng(1).random((n, 2))
    A = sg_graphs.spatial_adjacency(xy, 3)
    out = module([torch.randn(n, d) for d in (5, 4, 3)], A, [A, A, A])
    assert out["beta"].shape == (n, 3)
    torch.testing.assert_close(out["beta"].sum(1), torch.ones(n))
    for a in out["alpha"]:
        torch.testing.assert_close(a.sum(1), torch.ones(n))
    assert len(out["across"]) == 6 and pairs(3)[0] == (0, 1)
    X = [torch.randn(n, d) for d in (5, 4, 3)]
    loss, terms = module.loss(module(X, A, [A, A, A]), X, [1.0] * 9)
    assert len(terms) == 9 and torch.isclose(loss, torch.tensor(sum(terms.values())), rtol=1e-5)


@pytest.mark.parametrize("dims", [[7, 5], [6, 4, 3]])
def test_fused_step_gradients_equal_autograd(dims):
    from spfm.heads.spatialglue.fused import loss_and_grads

    torch.manual_seed(0)
    n, rng = 50, np.random.default_rng(0)
    A = sg_graphs.spatial_adjacency(rng.random((n, 2)), 3).to(torch.float64)
    X = [torch.randn(n, d, dtype=torch.float64) for d in dims]
    Af = [sg_graphs.feature_adjacency(x.numpy(), 5).to(torch.float64) for x in X]
    module = SpatialGlueModule(dims, 8).double()
    weights = [0.7 * (i + 1) for i in range(len(dims) ** 2)]  # distinct, so a swapped term would show
    loss, terms = module.loss(module(X, A, Af), X, weights)
    loss.backward()
    expected = {k: p.grad.clone() for k, p in module.named_parameters()}
    total, fused_terms = loss_and_grads(module, X, A, Af, weights)
    assert total == pytest.approx(loss.item(), rel=1e-12)
    assert fused_terms == pytest.approx(terms, rel=1e-12)
    for k, p in module.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=1e-10, atol=1e-12, msg=k)


# ------------------------------------------------------------------------------------------------ AnnData head


def test_fit_writes_results_and_recovers_domains(small_pair):
    rna, protein = (a.copy() for a in small_pair)
    head = _fast(epochs=150)
    res = head.fit_transform({"rna": rna, "protein": protein}, progress=False)
    Z = res.obsm["X_spatialglue"]
    assert Z.shape == (rna.n_obs, 64)
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, atol=1e-5)
    for name in ("rna", "protein"):
        assert res.obsm[f"X_spatialglue_{name}"].shape == (rna.n_obs, 64)
        np.testing.assert_allclose(res.obsm[f"spatialglue_alpha_{name}"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(res.obsm["spatialglue_beta"].sum(1), 1.0, atol=1e-5)
    assert res.obs["domain"].nunique() == 5
    assert head.history_[-1] < head.history_[0]
    # Written back into the inputs (same spots).
    assert "X_spatialglue" in rna.obsm and "domain" in protein.obs
    np.testing.assert_array_equal(rna.obsm["X_spatialglue"], Z)
    # Integration recovers more of the truth than chance (5 classes, 576 spots).
    from spfm.eval.metrics import clustering_scores

    assert clustering_scores(rna.obs["label"].to_numpy(), res.obs["domain"].to_numpy())["nmi"] > 0.3


def test_fused_and_autograd_training_agree(small_pair):
    rna, protein = small_pair
    runs = [_fast(epochs=30, n_domains=None).fit({"rna": rna, "protein": protein}, progress=False, device="cpu",
                                                 backward=b) for b in ("fused", "autograd")]
    np.testing.assert_allclose(runs[0].history_, runs[1].history_, rtol=1e-4)
    np.testing.assert_allclose(runs[0].result_.obsm["X_spatialglue"], runs[1].result_.obsm["X_spatialglue"],
                               atol=1e-3)
    with pytest.raises(DataError, match="backward"):
        _fast(epochs=1).fit({"rna": rna, "protein": protein}, progress=False, backward="numeric")


def test_config_round_trip_gives_identical_outputs(small_pair):
    import json

    rna, protein = small_pair
    head = _fast(epochs=5, n_domains=None)
    head.fit({"rna": rna, "protein": protein}, progress=False)
    config = json.loads(json.dumps(head.to_config()))
    state = {k: v.clone() for k, v in head.module.state_dict().items()}
    assert any(k.startswith("prep_0_pca") for k in state)
    clone = SpatialGlue.from_config(config)
    with pytest.raises(DataError, match="never loaded"):  # the state dict is part of a fitted head
        clone.transform({"rna": rna.copy(), "protein": protein.copy()}, device="cpu")
    clone.module.load_state_dict(state)
    a = head.transform({"rna": rna.copy(), "protein": protein.copy()}, device="cpu")
    b = clone.transform({"rna": rna.copy(), "protein": protein.copy()}, device="cpu")
    for key in ("X_spatialglue", "X_spatialglue_rna", "spatialglue_beta", "spatialglue_alpha_protein"):
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])
    # Applying to the training spots reproduces the fitted embedding.
    np.testing.assert_allclose(a.obsm["X_spatialglue"], head.result_.obsm["X_spatialglue"], atol=1e-4)


def test_three_modalities_fit(small_pair):
    rna, protein = small_pair
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (rna.n_obs, 60)).astype(np.float32) + (rna.obs["label"].to_numpy() == 1)[:, None]
    peaks = ad.AnnData(counts, obs=rna.obs[[]].copy(), var=pd.DataFrame(index=[f"p{i}" for i in range(60)]))
    head = _fast(epochs=5, kinds=["rna", "protein", "atac"], n_domains=3)
    res = head.fit_transform([rna, protein, peaks], progress=False)
    assert res.obsm["spatialglue_beta"].shape == (rna.n_obs, 3)
    assert res.uns["spatialglue"]["modalities"] == ["rna", "protein", "atac"]
    assert len(res.uns["spatialglue"]["loss_terms"]) == 9


# ------------------------------------------------------------------------------------------------ bad input


def test_spot_sets_empty_overlap_errors_and_partial_warns(small_pair):
    rna, protein = small_pair
    other = protein.copy()
    other.obs_names = [f"x{i}" for i in range(other.n_obs)]
    with pytest.raises(DataError, match="share no spot"):
        _fast().fit([rna, other], progress=False)
    part = protein[: protein.n_obs - 50].copy()
    with pytest.warns(UserWarning, match=f"share {rna.n_obs - 50} spots"):
        res = _fast(epochs=2, n_domains=None).fit_transform([rna.copy(), part], progress=False)
    assert res.n_obs == rna.n_obs - 50


def test_too_few_features_constant_features_and_nans(small_pair):
    rna, protein = small_pair
    with pytest.raises(DataError, match="too few for 30 dimensions"):
        _fast(n_comps=30).fit([rna, protein], progress=False)
    const = protein.copy()
    const.X[:, 3] = 7.0
    with pytest.raises(DataError, match=r"1 constant feature\(s\) in modality 'protein' \(e.g. P3\)"):
        _fast(drop_constant=False).fit([rna, const], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = _fast(epochs=2, n_domains=None).fit([rna, const], progress=False)
    assert "P3" not in head.fitted_[1].features
    nan = protein.copy()
    nan.X[5, 2] = np.nan
    with pytest.raises(DataError, match="NaN") as info:
        _fast().fit([rna, nan], progress=False)
    assert "protein" in str(info.value)


def test_bad_arguments():
    with pytest.raises(DataError, match="datatype"):
        SpatialGlue(datatype="merfish")
    with pytest.raises(DataError, match="kinds"):
        SpatialGlue(kinds=["rna", "image"])
    rna, protein = spatialglue_simulation(1, seed=0, block=1, n_features=(20, 10))
    with pytest.raises(DataError, match="kinds"):
        SpatialGlue().fit([rna, protein, protein], progress=False)
    with pytest.raises(DataError, match="4 loss weights"):
        SpatialGlue(weights=[1, 2, 3], n_comps=4).fit([rna, protein], progress=False)
    no_xy = rna.copy()
    del no_xy.obsm["spatial"]
    p2 = protein.copy()
    del p2.obsm["spatial"]
    with pytest.raises(DataError, match="spatial"):
        SpatialGlue(n_comps=4).fit([no_xy, p2], progress=False)
    with pytest.raises(DataError, match="not fitted"):
        SpatialGlue().transform([rna, protein])


def test_transform_names_missing_features(small_pair):
    rna, protein = small_pair
    head = _fast(epochs=1, n_domains=None).fit([rna, protein], progress=False)
    with pytest.raises(DataError, match="lacks 1 feature"):
        head.transform([rna, protein[:, 1:].copy()])


# ------------------------------------------------------------------------------------------------ CLI + plots


def test_cli_integrate_writes_keys_and_figures(tmp_path, small_pair, capsys):
    from spfm.cli import main

    rna, protein = small_pair
    rna.write_h5ad(tmp_path / "rna.h5ad")
    protein.write_h5ad(tmp_path / "protein.h5ad")
    out = tmp_path / "out" / "joint.h5ad"
    code = main(["integrate", str(tmp_path / "rna.h5ad"), str(tmp_path / "protein.h5ad"), "-o", str(out),
                 "--datatype", "SPOTS", "--n-domains", "4", "--epochs", "3", "--n-comps", "10", "--kinds", "rna",
                 "protein", "--plots", "--no-progress"])
    assert code == 0
    res = ad.read_h5ad(out)
    assert res.obs["domain"].nunique() == 4 and "spatialglue_alpha_protein" in res.obsm
    assert (tmp_path / "out" / "joint_domains.png").stat().st_size > 0
    assert (tmp_path / "out" / "joint_weights.png").stat().st_size > 0
    assert main(["integrate", str(tmp_path / "rna.h5ad"), str(tmp_path / "missing.h5ad"), "-o", str(out)]) == 2
    assert "missing.h5ad: MOD: modality file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_skin_citeseq_pair_integrates(shared_data):
    rna = ad.read_h5ad(shared_data / "skin_citeseq" / "rna.h5ad")
    protein = ad.read_h5ad(shared_data / "skin_citeseq" / "protein.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = SpatialGlue(datatype="10x", n_comps=9, epochs=10, n_domains=6).fit_transform(
            {"rna": rna, "protein": protein}, progress=False)
    assert res.n_obs == 1618 and res.obs["domain"].nunique() == 6
    assert np.isfinite(res.obsm["X_spatialglue"]).all()


# ------------------------------------------------------------------------------------------------ recipes + demo


def test_shipped_recipes_are_valid_and_a_recipe_runs(tmp_path, small_pair):
    from conftest import PROJECT_ROOT

    from spfm.heads.spatialglue.recipe import load_recipe, run_recipe

    shipped = sorted((PROJECT_ROOT / "recipes").glob("spatialglue_*.yaml"))
    assert len(shipped) >= 3
    for path in shipped:
        recipe = load_recipe(path)
        SpatialGlue(**recipe["params"])  # every parameter is a real one, with valid values
    rna, protein = small_pair
    rna.write_h5ad(tmp_path / "rna.h5ad")
    protein.write_h5ad(tmp_path / "protein.h5ad")
    path = tmp_path / "r.yaml"
    path.write_text(f"head: SpatialGlue\nmodalities:\n  rna: {tmp_path / 'rna.h5ad'}\n  protein: "
                    f"{tmp_path / 'protein.h5ad'}\nparams:\n  datatype: SPOTS\n  n_comps: 10\n  epochs: 2\n"
                    f"  n_domains: 3\noutput: {tmp_path / 'o.h5ad'}\nplots: true\n")
    res = run_recipe(path, progress=False)
    assert res.obs["domain"].nunique() == 3 and (tmp_path / "o_weights.png").is_file()
    path.write_text(path.read_text().replace("  epochs: 2\n", "  epoch: 2\n"))
    with pytest.raises(DataError, match="params.epoch"):
        load_recipe(path)


@pytest.mark.slow
def test_demo_runs_and_improvement_recovers_the_simulation(tmp_path):
    from spfm.heads.spatialglue import run_demo_spatialglue

    metrics = run_demo_spatialglue(tmp_path, seed=0)
    assert (tmp_path / "spatialglue_domains.png").is_file() and (tmp_path / "spatialglue.h5ad").is_file()
    assert metrics["nmi_improved"] > 0.8


@pytest.mark.slow
def test_approx_feature_graph_matches_exact_and_keeps_torch_threads():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 12)).astype(np.float32)
    torch.set_num_threads(1)
    exact = sg_graphs.feature_adjacency(X, 10, method="exact").to_sparse_coo().coalesce().indices()
    approx = sg_graphs.feature_adjacency(X, 10, method="approx").to_sparse_coo().coalesce().indices()
    assert torch.get_num_threads() == 1  # numba's OpenMP start-up must not leave torch on all cores
    e = {tuple(p) for p in exact.T.tolist()}
    a = {tuple(p) for p in approx.T.tolist()}
    assert len(e & a) / len(e) > 0.95
