"""Domain clustering shared by the heads, and the label / neighbourhood / spatial metrics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from spfm.errors import DataError
from spfm.eval.metrics import cluster_morans_i, clustering_scores, knn_jaccard, morans_i
from spfm.heads.domains import cluster_embedding, tied_mixture_labels


def _blobs(seed: int = 0, n: int = 300, k: int = 4, d: int = 10):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(k, d))
    truth = rng.integers(0, k, n)
    return centres[truth] + rng.normal(size=(n, d)), truth


@pytest.mark.parametrize("method", ["gmm", "kmeans", "leiden"])
def test_clustering_recovers_separated_blobs(method):
    X, truth = _blobs()
    labels = cluster_embedding(X, 4, method=method, n_pcs=5)
    assert labels.shape == truth.shape and set(labels) == {0, 1, 2, 3}
    assert clustering_scores(truth, labels)["ari"] > 0.95


def test_clustering_is_seeded_and_labels_ordered_by_first_appearance():
    X, _ = _blobs(seed=1)
    a, b = cluster_embedding(X, 4, seed=3), cluster_embedding(X, 4, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a[0] == 0 and list(dict.fromkeys(a.tolist())) == [0, 1, 2, 3]


def test_gmm_multistart_keeps_the_best_mixture():
    # Eight blobs, some close: a single k-means-initialised mixture sometimes merges two and splits another.
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(8), 60)
    X = rng.normal(size=(8, 5))[truth] * 4 + rng.normal(size=(480, 5))
    single = [clustering_scores(truth, cluster_embedding(X, 8, n_pcs=None, seed=s))["nmi"] for s in range(8)]
    multi = [clustering_scores(truth, cluster_embedding(X, 8, n_pcs=None, seed=s, n_init=10))["nmi"]
             for s in range(8)]
    assert min(single) < max(single) - 0.02  # the fixture does have a bad single-start optimum
    assert min(multi) >= max(single) - 1e-9
    with pytest.raises(DataError, match="n_init"):
        cluster_embedding(X, 8, n_init=0)


@pytest.mark.parametrize("n_init", [1, 5])
@pytest.mark.parametrize("data", ["blobs", "overlapping", "noise"])
def test_tied_mixture_matches_scikit_learn(data, n_init):
    from sklearn.metrics import adjusted_rand_score
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(7)
    if data == "blobs":
        X, _ = _blobs(seed=2, n=500, k=6)
    elif data == "overlapping":  # close components: EM takes tens of iterations and starts disagree
        truth = rng.integers(0, 5, 800)
        X = rng.normal(size=(5, 6))[truth] * 1.5 + rng.normal(size=(800, 6))
    else:
        X = rng.normal(size=(400, 4))
    for seed in (0, 11):
        ours = tied_mixture_labels(X, 5, n_init=n_init, seed=seed, reg_covar=1e-6)
        ref = GaussianMixture(5, covariance_type="tied", n_init=n_init, random_state=seed,
                              reg_covar=1e-6).fit_predict(X)
        assert adjusted_rand_score(ref, ours) == pytest.approx(1.0)  # the same partition, up to label names


def test_clustering_bad_input_names_the_field():
    X, _ = _blobs()
    X[3, 2] = np.nan
    with pytest.raises(DataError, match='obsm\\["X_emb"\\].*NaN'):
        cluster_embedding(X, 4, field='obsm["X_emb"]')
    with pytest.raises(DataError, match="n_clusters"):
        cluster_embedding(np.ones((5, 2)), 9)
    with pytest.raises(DataError, match="unknown clustering method"):
        cluster_embedding(_blobs()[0], 3, method="dbscan")


def test_clustering_scores_known_values_and_missing_truth():
    truth = np.array(["a", "a", "b", "b", None, ""], dtype=object)
    assert clustering_scores(truth, np.array([1, 1, 0, 0, 5, 7]))["nmi"] == pytest.approx(1.0)
    swapped = clustering_scores(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))
    assert swapped["nmi"] == pytest.approx(0.0) and swapped["ari"] < 0


def test_knn_jaccard_is_one_for_the_same_space_and_low_for_noise():
    X, _ = _blobs(n=200)
    assert knn_jaccard(X, X * 3.0, k=10) == pytest.approx(1.0)
    noise = np.random.default_rng(5).normal(size=X.shape)
    assert knn_jaccard(X, noise, k=10) < 0.2


def test_morans_i_sign_on_a_chain():
    n = 50
    W = sp.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1], format="csr")
    smooth = np.arange(n, dtype=float)
    alternating = np.tile([1.0, -1.0], n // 2)
    values = morans_i(np.stack([smooth, alternating], 1), W)
    assert values[0] > 0.9 and values[1] < -0.9
    per_cluster = cluster_morans_i(np.repeat(["left", "right"], n // 2), W)
    assert set(per_cluster) == {"left", "right"} and min(per_cluster.values()) > 0.9
