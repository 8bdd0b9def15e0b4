"""The HEST-Benchmark protocol: agreement with a hand-written reference, PCA cap, splits, signal vs noise, errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import tiny_adata, tissue_image

from spfm.data.hest import write_sample
from spfm.errors import DataError
from spfm.eval.hest_bench import (
    bench_hest,
    hest_benchmark,
    leave_one_patient_out,
    leave_one_sample_out,
    read_hest_splits,
    top_variance_genes,
)


def _data(n_samples=4, n_spots=60, n_genes=30, dim=16, seed=0, sparse=True):
    """Random counts with distinct per-gene scales (so the variance ranking has no ties) and random features."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    scale = np.linspace(0.2, 8.0, n_genes)
    features, expression = {}, {}
    for s in range(n_samples):
        counts = rng.poisson(scale, size=(n_spots, n_genes)).astype(np.float32)
        adata = ad.AnnData(sp.csr_matrix(counts) if sparse else counts, var=pd.DataFrame(index=genes))
        adata.obs_names = [f"s{s}_{i}" for i in range(n_spots)]
        expression[f"S{s}"] = adata
        features[f"S{s}"] = rng.normal(size=(n_spots, dim)).astype(np.float32)
    return features, expression


def _reference(features, expression, train, test, n_genes, pca_dim):
    """The protocol written out with NumPy alone: log1p targets, top-variance genes on train, z-score and PCA (SVD)
    fitted on train, closed-form ridge without intercept, Pearson per gene."""
    def dense(sid):
        X = expression[sid].X
        return np.log1p(X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64))

    Ytr = np.concatenate([dense(s) for s in train]).astype(np.float64)
    Yte = np.concatenate([dense(s) for s in test]).astype(np.float64)
    top = np.argsort(-Ytr.var(axis=0), kind="stable")[:n_genes]
    Ytr, Yte = Ytr[:, top], Yte[:, top]
    Xtr = np.concatenate([features[s] for s in train]).astype(np.float64)
    Xte = np.concatenate([features[s] for s in test]).astype(np.float64)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    Ztr, Zte = (Xtr - mu) / sd, (Xte - mu) / sd
    k = min(pca_dim, *Ztr.shape)
    centre = Ztr.mean(0)
    V = np.linalg.svd(Ztr - centre, full_matrices=False)[2][:k].T
    Ptr, Pte = (Ztr - centre) @ V, (Zte - centre) @ V
    alpha = 100 / (k * n_genes)
    W = np.linalg.solve(Ptr.T @ Ptr + alpha * np.eye(k), Ptr.T @ Ytr)
    pred = Pte @ W
    r = [np.corrcoef(Yte[:, g], pred[:, g])[0, 1] for g in range(n_genes)]
    return [f"G{i}" for i in top], np.array(r)


@pytest.mark.parametrize("solver", ["exact", "lsqr"])
def test_agrees_with_a_hand_written_reference(solver, monkeypatch):
    """With an exact ridge solver the protocol equals the reference to float32 precision (HEST casts the PCA output
    to float32); with HEST's lsqr, which stops at sklearn's tol=1e-4, to 1e-3."""
    import sklearn.linear_model

    if solver == "exact":
        ridge = sklearn.linear_model.Ridge
        monkeypatch.setattr(sklearn.linear_model, "Ridge", lambda **kw: ridge(**{**kw, "solver": "cholesky"}))
    atol = 1e-5 if solver == "exact" else 1e-3
    features, expression = _data()
    splits = [(["S0", "S1", "S2"], ["S3"]), (["S1", "S2", "S3"], ["S0"])]
    result = hest_benchmark(features, expression, splits, n_genes=10, pca_dim=8)
    means = []
    for split, (train, test) in zip(result["splits"], splits):
        genes, r = _reference(features, expression, train, test, 10, 8)
        assert split["genes"] == genes
        np.testing.assert_allclose(split["pearson"], r, atol=atol)
        assert split["alpha"] == pytest.approx(100 / (8 * 10))
        means.append(np.mean(r))
    assert result["pearson_mean"] == pytest.approx(np.mean(means), abs=atol)
    assert result["pearson_std"] == pytest.approx(np.std(means), abs=atol)
    json.dumps(result, allow_nan=False)  # JSON-able as it is


def test_top_variance_genes_sparse_equals_dense():
    _, sparse_expr = _data(n_genes=40)
    dense_expr = {k: ad.AnnData(v.X.toarray(), var=v.var) for k, v in sparse_expr.items()}
    names = list(sparse_expr["S0"].var_names)
    y = np.log1p(np.concatenate([sparse_expr[s].X.toarray() for s in ("S0", "S1")]).astype(np.float64))
    expected = [names[i] for i in np.argsort(-y.var(0), kind="stable")[:7]]
    assert top_variance_genes(sparse_expr, ["S0", "S1"], names, 7) == expected
    assert top_variance_genes(dense_expr, ["S0", "S1"], names, 7) == expected


def test_pca_dimension_is_capped_by_spots_and_features():
    features, expression = _data(n_spots=20, dim=64)
    splits = [(["S0", "S1"], ["S2"])]
    few_spots = hest_benchmark(features, expression, splits, n_genes=5)  # 40 training spots < 64 < 256
    assert few_spots["splits"][0]["pca_dim"] == 40
    assert few_spots["splits"][0]["alpha"] == pytest.approx(100 / (40 * 5))
    features, expression = _data(n_spots=100, dim=12)
    few_features = hest_benchmark(features, expression, splits, n_genes=5)
    assert few_features["splits"][0]["pca_dim"] == 12
    raw = hest_benchmark(features, expression, splits, n_genes=5, pca_dim=None)
    assert raw["splits"][0]["pca_dim"] is None and raw["splits"][0]["alpha"] == pytest.approx(100 / (12 * 5))


def test_leave_one_patient_out_never_splits_a_patient():
    patients = {"A1": "A", "A2": "A", "B1": "B", "C1": "C", "C2": "C", "X": None}
    splits = leave_one_patient_out(patients)
    assert len(splits) == 4  # A, B, C and the sample without a patient
    for train, test in splits:
        assert {patients[s] for s in test}.isdisjoint({patients[s] for s in train if patients[s]})
        assert sorted(train + test) == sorted(patients)
    assert sorted(s for _, test in splits for s in test) == sorted(patients)  # every sample tested once
    with pytest.raises(DataError, match="at least 2 patients"):
        leave_one_patient_out({"A1": "A", "A2": "A"})
    assert leave_one_sample_out(["b", "a"]) == [(["b"], ["a"]), (["a"], ["b"])]


def test_linear_features_score_near_one_and_random_near_zero():
    rng = np.random.default_rng(1)
    _, expression = _data(n_samples=3, n_spots=150, n_genes=60, seed=1)
    mixing = rng.normal(size=(60, 80))
    linear = {s: np.log1p(a.X.toarray()) @ mixing for s, a in expression.items()}
    noise = {s: rng.normal(size=(a.n_obs, 80)) for s, a in expression.items()}
    patients = {"S0": "p0", "S1": "p1", "S2": "p2"}
    good = hest_benchmark(linear, expression, patients=patients)
    bad = hest_benchmark(noise, expression, patients=patients)
    assert good["protocol"]["n_splits"] == 3 and len(good["splits"][0]["genes"]) == 50
    assert good["pearson_mean"] > 0.99
    assert abs(bad["pearson_mean"]) < 0.1


def test_constant_gene_propagates_nan_like_hest_or_is_omitted():
    features, expression = _data(n_samples=3, n_genes=6)
    test = expression["S2"].X.toarray()
    test[:, :] = 0  # every target constant on the test sample
    expression["S2"] = ad.AnnData(test, var=expression["S2"].var)
    splits = [(["S0", "S1"], ["S2"]), (["S0", "S2"], ["S1"])]
    hest = hest_benchmark(features, expression, splits, n_genes=3)
    assert hest["splits"][0]["n_undefined"] == 3 and hest["splits"][0]["pearson_mean"] is None
    assert hest["pearson_mean"] is None  # one undefined split makes the mean undefined, as np.mean in HEST
    omit = hest_benchmark(features, expression, splits, n_genes=3, nan_policy="omit")
    assert omit["splits"][0]["pearson_mean"] is None  # nothing defined to average
    assert omit["pearson_mean"] == pytest.approx(omit["splits"][1]["pearson_mean"])


def test_bad_inputs():
    features, expression = _data(n_samples=3)
    splits = [(["S0", "S1"], ["S2"])]
    with pytest.raises(DataError, match="no embedding for sample 'S2'"):
        hest_benchmark({k: v for k, v in features.items() if k != "S2"}, expression, splits)
    with pytest.raises(DataError, match="lacks 1 target gene") as err:
        hest_benchmark(features, expression, splits, genes=["G1", "NOPE"])
    assert err.value.field == "expression['S0'].var_names"
    renamed = expression["S2"].copy()
    renamed.var_names = [f"X{i}" for i in range(renamed.n_vars)]
    with pytest.raises(DataError, match="share no gene"):
        hest_benchmark(features, {**expression, "S2": renamed}, splits)
    with pytest.raises(DataError, match="align them by barcode"):
        hest_benchmark({**features, "S2": features["S2"][:-1]}, expression, splits)
    with pytest.raises(DataError, match="both sides"):
        hest_benchmark(features, expression, [(["S0", "S1"], ["S1"])])
    with pytest.raises(DataError, match="needs patients"):
        hest_benchmark(features, expression, "leave_one_patient_out")


# ----------------------------------------------------------------------------------------------------------------
# On a HEST root, with spfm embed's output


def test_bench_hest_reads_split_files_and_embeddings(tmp_path):
    """bench_hest aligns embeddings to the root's counts by barcode and reads HEST's split files."""
    from spfm.models.embed import EMBED_UNS_KEY

    root, emb_dir = tmp_path / "hest", tmp_path / "emb"
    emb_dir.mkdir()
    features, expression = {}, {}
    rng = np.random.default_rng(0)
    for s in range(3):
        xy = rng.uniform(40, 160, size=(30, 2))
        adata = tiny_adata(30, [f"G{i}" for i in range(8)], xy, seed=s)
        write_sample(root, f"S{s}", adata, tissue_image(200, 200, s),
                     {"pixel_size_um_estimated": 1.0, "patient": f"P{s}"})
        kept = adata[::-1][:25]  # embeddings in another order, five spots dropped
        out = kept.copy()
        out.obsm["X_test"] = rng.normal(size=(25, 6)).astype(np.float32)
        out.uns[EMBED_UNS_KEY] = {"key": "X_test"}
        out.write_h5ad(emb_dir / f"S{s}.h5ad")
        features[f"S{s}"], expression[f"S{s}"] = out.obsm["X_test"], kept
    (root / "splits").mkdir()
    for i, (train, test) in enumerate([(["S0", "S1"], ["S2"]), (["S1", "S2"], ["S0"])]):
        pd.DataFrame({"sample_id": train}).to_csv(root / "splits" / f"train_{i}.csv", index=False)
        pd.DataFrame({"sample_id": test}).to_csv(root / "splits" / f"test_{i}.csv", index=False)
    (root / "var_50genes.json").write_text(json.dumps({"genes": ["G3", "G1", "G5"]}))
    result = bench_hest(root, emb_dir)
    direct = hest_benchmark(features, expression, read_hest_splits(root / "splits"), genes=["G3", "G1", "G5"])
    assert result["splits"][0]["genes"] == ["G3", "G1", "G5"] and result["embedding_key"] == "X_test"
    assert result["pearson_mean"] == pytest.approx(direct["pearson_mean"], abs=1e-12)
    lopo = bench_hest(root, emb_dir, genes=None, n_genes=4, splits="leave_one_patient_out")
    assert lopo["protocol"]["n_splits"] == 3 and len(lopo["splits"][0]["genes"]) == 4
    # One fold given explicitly scores exactly as that fold of the rule (and reads only its samples' embeddings)
    fold = bench_hest(root, emb_dir, genes=None, n_genes=4, splits=[(["S1", "S2"], ["S0"])])
    assert fold["split_source"] == "given" and fold["protocol"]["n_splits"] == 1
    assert fold["pearson_mean"] == pytest.approx(lopo["mean_per_split"][0], abs=1e-12)
    (root / "splits" / "test_1.csv").unlink()
    with pytest.raises(DataError, match="test_1.csv is missing"):
        bench_hest(root, emb_dir)
    (emb_dir / "S1.h5ad").unlink()
    with pytest.raises(DataError, match="no embedding for sample 'S1'"):
        bench_hest(root, emb_dir, splits="leave_one_sample_out")
