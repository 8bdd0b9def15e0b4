"""Preprocessing: hand-computed values for normalise/CLR/TF-IDF, LSI against an exact SVD, HVGs on simulated
negative-binomial counts with planted overdispersion, PCA on sparse input, and bad input naming the key."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA

from spfm.data import preprocess as P
from spfm.errors import DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def adata_of(X, **obs) -> ad.AnnData:
    n = X.shape[0]
    return ad.AnnData(X, obs=pd.DataFrame(obs or None, index=[f"c{i}" for i in range(n)]),
                      var=pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])]))


def match_up_to_sign(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    """Columns of a and b agree up to a sign flip per column."""
    for j in range(a.shape[1]):
        err = min(np.abs(a[:, j] - b[:, j]).max(), np.abs(a[:, j] + b[:, j]).max())
        assert err < atol, f"column {j} differs by {err}"


# ------------------------------------------------------------------------------------------------- normalise


@pytest.mark.parametrize("sparse", [True, False])
def test_normalize_log1p_by_hand(sparse, caplog):
    counts = np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    a = adata_of(sp.csr_matrix(counts) if sparse else counts.copy())
    with caplog.at_level(logging.INFO, logger="spfm.data.preprocess"):
        P.normalize_log1p(a, target_sum=4)
    X = a.X.toarray() if sparse else a.X
    np.testing.assert_allclose(X, np.log1p([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]]), rtol=1e-6)
    assert sp.issparse(a.X) == sparse and a.X.dtype == np.float32
    kept = a.layers["counts"]
    np.testing.assert_array_equal(kept.toarray() if sparse else kept, counts)
    assert "layers['counts']" in caplog.text and "1 spot(s) with no counts" in caplog.text


def test_normalize_log1p_refuses_to_log_twice_but_restarts_from_counts():
    a = adata_of(sp.csr_matrix(np.array([[1.0, 3.0], [2.0, 6.0]])))
    P.normalize_log1p(a, target_sum=10)
    first = a.X.toarray()
    with pytest.raises(DataError, match=r'uns\["log1p"\]'):
        P.normalize_log1p(a)
    P.normalize_log1p(a, target_sum=10, layer="counts")
    np.testing.assert_allclose(a.X.toarray(), first)
    np.testing.assert_allclose(first[0], first[1])  # library size removed


def test_normalize_bad_input_names_the_key():
    with pytest.raises(DataError, match="^X: negative"):
        P.normalize_log1p(adata_of(np.array([[1.0, -1.0]])))
    a = adata_of(np.ones((2, 2)))
    a.layers["raw"] = np.array([[1.0, np.nan], [0.0, 1.0]])
    with pytest.raises(DataError, match=r'layers\["raw"\]: 1 NaN'):
        P.normalize_log1p(a, layer="raw")
    with pytest.raises(DataError, match=r'layers\["counts"\]: layer .counts. not found'):
        P.normalize_log1p(adata_of(np.ones((2, 2))), layer="counts")


# ------------------------------------------------------------------------------------------------- HVG


def nb_counts(n_cells: int, n_genes: int, planted: np.ndarray, seed: int = 0) -> np.ndarray:
    """NB counts with gene means spread over two decades; planted genes have dispersion r = 0.5, the rest r = 50."""
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.uniform(np.log(0.5), np.log(50), n_genes))
    r = np.full(n_genes, 50.0)
    r[planted] = 0.5
    return rng.negative_binomial(r, r / (r + mu), size=(n_cells, n_genes)).astype(np.float32)


def test_seurat_v3_finds_planted_overdispersed_genes():
    planted = np.arange(5, 200, 20)  # 10 genes across the mean range
    a = adata_of(sp.csr_matrix(nb_counts(400, 200, planted)), batch=np.repeat(["a", "b"], 200))
    P.highly_variable_genes(a, n_top_genes=10)
    assert set(np.flatnonzero(a.var["highly_variable"])) == set(planted)
    assert {"highly_variable_rank", "means", "variances", "variances_norm"} <= set(a.var.columns)
    b = a.copy()
    P.highly_variable_genes(b, n_top_genes=10, batch_key="batch", subset=True)
    assert b.n_vars == 10 and set(b.var_names) == {f"g{j}" for j in planted}
    assert "highly_variable_nbatches" in b.var


def test_seurat_v3_reads_the_counts_layer_after_normalisation_and_caps_at_the_panel():
    planted = np.array([3, 17, 29])
    a = adata_of(nb_counts(300, 40, planted, seed=1))
    P.normalize_log1p(a)
    with pytest.raises(DataError, match="^X: seurat_v3 HVG selection needs raw integer counts"):
        P.highly_variable_genes(a, n_top_genes=3)
    P.highly_variable_genes(a, n_top_genes=3, layer="counts")
    assert set(np.flatnonzero(a.var["highly_variable"])) == set(planted)
    P.highly_variable_genes(a, n_top_genes=3000, layer="counts")  # panel smaller than n_top_genes: all genes
    assert a.var["highly_variable"].all()


def test_hvg_bad_input_names_the_key():
    a = adata_of(nb_counts(50, 20, np.array([0])))
    with pytest.raises(DataError, match=r'layers\["counts"\]'):
        P.highly_variable_genes(a, layer="counts")
    with pytest.raises(DataError, match=r'obs\["sample"\]'):
        P.highly_variable_genes(a, batch_key="sample")
    a.X[0, 0] = 0.5
    with pytest.raises(DataError, match="non-integer"):
        P.highly_variable_genes(a)


# ------------------------------------------------------------------------------------------------- CLR


CLR_COUNTS = np.array([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
# Row 0: exp((log 2 + log 4) / 3) = 2; row 2: exp(3 log 3 / 3) = 3; the empty row stays 0.
CLR_EXPECTED = np.log1p(np.array([[0.5, 0.0, 1.5], [0.0, 0.0, 0.0], [2 / 3, 2 / 3, 2 / 3]]))


def test_clr_transform_by_hand_dense_and_sparse():
    np.testing.assert_allclose(P.clr_transform(CLR_COUNTS), CLR_EXPECTED, rtol=1e-12)
    out = P.clr_transform(sp.csr_matrix(CLR_COUNTS))
    assert sp.issparse(out) and out.nnz == np.count_nonzero(CLR_COUNTS)
    np.testing.assert_allclose(out.toarray(), CLR_EXPECTED, rtol=1e-12)


def test_clr_is_per_cell():
    scaled = CLR_COUNTS.copy()
    scaled[2] *= 10  # changing one cell leaves the others untouched
    out = P.clr_transform(scaled)
    np.testing.assert_allclose(out[:2], CLR_EXPECTED[:2])
    assert not np.allclose(out[2], CLR_EXPECTED[2])


def test_clr_on_adata_keeps_counts():
    a = adata_of(sp.csr_matrix(CLR_COUNTS))
    P.clr(a)
    np.testing.assert_allclose(a.X.toarray(), CLR_EXPECTED, rtol=1e-6)
    np.testing.assert_array_equal(a.layers["counts"].toarray(), CLR_COUNTS)
    assert a.uns["clr"] == {"axis": 1, "n_features": 3}


@pytest.mark.realdata
def test_clr_matches_the_reference_loop_on_skin_citeseq_protein():
    path = DATA / "skin_citeseq" / "protein.h5ad"
    if not path.is_file():
        pytest.skip("../shared/data/skin_citeseq not present")
    X = ad.read_h5ad(path).X
    dense = (X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float64)
    reference = np.apply_along_axis(lambda x: np.log1p(x / np.exp(np.log1p(x[x > 0]).sum() / len(x))), 1, dense)
    np.testing.assert_allclose(P.clr_transform(sp.csr_matrix(X)).toarray(), reference, rtol=1e-10)


# ------------------------------------------------------------------------------------------------- TF-IDF, LSI


def test_tfidf_by_hand():
    X = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 2.0, 2.0, 0.0]])
    # row sums 2, 4; column sums 1, 3, 2, 0 -> idf = 2 / colsum = 2, 2/3, 1, (0 for the empty peak)
    expected = np.array([[1.0, 1 / 3, 0.0, 0.0], [0.0, 1 / 3, 0.5, 0.0]])
    np.testing.assert_allclose(P.tfidf_transform(X), expected)
    np.testing.assert_allclose(P.tfidf_transform(sp.csr_matrix(X)).toarray(), expected)


def peak_counts(n: int = 150, p: int = 400, seed: int = 0) -> sp.csr_matrix:
    """Poisson peaks from three cell states with depth varying tenfold."""
    rng = np.random.default_rng(seed)
    state = rng.integers(0, 3, n)
    profiles = rng.gamma(0.3, 1.0, (3, p))
    depth = np.exp(rng.uniform(np.log(200), np.log(2000), n))
    rates = profiles[state] / profiles[state].sum(1, keepdims=True) * depth[:, None]
    return sp.csr_matrix(rng.poisson(rates).astype(np.float32))


def test_lsi_unscaled_equals_the_exact_svd_of_the_reference_steps():
    counts = peak_counts()
    a = adata_of(counts)
    P.lsi(a, n_components=3, drop_first=False, scale=False)  # three states: three well-separated components
    dense = counts.toarray().astype(np.float64)
    colsum = dense.sum(0)
    idf = np.divide(dense.shape[0], colsum, out=np.zeros_like(colsum), where=colsum > 0)  # empty peaks: 0
    tfidf = dense / dense.sum(1, keepdims=True) * idf
    X = np.log1p(tfidf / tfidf.sum(1, keepdims=True) * 1e4)
    U = np.linalg.svd(X, full_matrices=False)[0][:, :3]
    assert a.obsm["X_lsi"].shape == (150, 3) and a.obsm["X_lsi"].dtype == np.float32
    match_up_to_sign(a.obsm["X_lsi"], U, atol=1e-6)


def test_lsi_scales_rows_before_dropping_the_first_component():
    a = adata_of(peak_counts())
    P.lsi(a, n_components=5, drop_first=False, key_added="full")
    full = a.obsm["full"]
    np.testing.assert_allclose(full.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(full.std(1, ddof=1), 1, rtol=1e-5)
    P.lsi(a, n_components=4, drop_first=True)
    np.testing.assert_allclose(a.obsm["X_lsi"], full[:, 1:], rtol=1e-5, atol=1e-5)
    info = a.uns["lsi"]
    assert info["n_components"] == 4 and info["drop_first"] and len(info["depth_correlation"]) == 5
    # The dropped component is the one that tracks depth.
    assert abs(info["depth_correlation"][0]) > 0.9


def test_lsi_bad_input():
    counts = peak_counts(20, 50).toarray()
    counts[3] = 0
    with pytest.raises(DataError, match="^X: 1 spot"):
        P.lsi(adata_of(counts), n_components=3)
    with pytest.raises(DataError, match="n_components"):
        P.lsi(adata_of(peak_counts(20, 50)), n_components=20)


# ------------------------------------------------------------------------------------------------- PCA


def test_pca_on_sparse_matches_dense_sklearn():
    X = sp.random(120, 60, density=0.2, random_state=1, format="csr", dtype=np.float64)
    a = adata_of(X)
    a.var["keep"] = np.arange(60) < 40
    P.pca(a, n_comps=5)
    ref = PCA(n_components=5, svd_solver="full").fit_transform(X.toarray())
    match_up_to_sign(a.obsm["X_pca"], ref, atol=1e-4)
    assert sp.issparse(a.X) and a.varm["PCs"].shape == (60, 5)
    P.pca(a, n_comps=3, mask_var="keep", key_added="X_pca_keep")
    ref = PCA(n_components=3, svd_solver="full").fit_transform(X.toarray()[:, :40])
    match_up_to_sign(a.obsm["X_pca_keep"], ref, atol=1e-4)


def test_pca_bad_input_names_the_key():
    a = adata_of(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(DataError, match="n_comps"):
        P.pca(a, n_comps=4)
    with pytest.raises(DataError, match=r'var\["highly_variable"\]'):
        P.pca(a, n_comps=2, mask_var="highly_variable")
    a.X[1, 1] = np.inf
    with pytest.raises(DataError, match="^X: 1 NaN"):
        P.pca(a, n_comps=2)
