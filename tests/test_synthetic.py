"""The synthetic corpus: HEST layout as designed, determinism, tissue filter work, and expression predictable from
the image through the shared latent programmes (and not once the patch -> spot pairing is shuffled)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy.spatial import cKDTree
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from spfm.data.hest import list_samples, read_sample
from spfm.data.patches import PatchConfig, PatchStats, iter_patches
from spfm.data.synthetic import (
    PROGRAMMES,
    SOURCE,
    corpus_plan,
    make_synthetic_corpus,
    synthesize_sample,
)
from spfm.errors import DataError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The default corpus (4 samples, seed 0)."""
    return make_synthetic_corpus(tmp_path_factory.mktemp("synthetic") / "hest")


@pytest.fixture(scope="module")
def patch_data(corpus):
    """Per sample: features (N, 7) and log1p normalised expression (N, G) of the N kept patches, gene names, the
    patching stats and the sample's AnnData (all spots)."""
    out = {}
    for sid in list_samples(corpus).sample_id:
        sample = read_sample(corpus, sid)
        stats = PatchStats()
        feats, rows = [], []
        for patch in iter_patches(sample, PatchConfig(), stats):
            feats.append(_features(patch.image))
            rows.append(patch.index)
        counts = sample.adata.X[rows].toarray()
        expr = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
        out[sid] = dict(features=np.array(feats), expr=expr, genes=list(sample.adata.var_names), stats=stats,
                        adata=sample.adata)
        sample.close()
    return out


def _features(image: np.ndarray) -> np.ndarray:
    """Colour and texture of an (H, W, 3) uint8 patch: mean RGB, std RGB, fraction of dark (nucleus) pixels."""
    img = image.astype(np.float32)
    return np.concatenate([img.mean(axis=(0, 1)), img.std(axis=(0, 1)), [(img.mean(axis=2) < 120).mean()]])


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_as_designed(corpus):
    table = list_samples(corpus).set_index("sample_id")
    assert list(table.index) == ["SYN00", "SYN01", "SYN02", "SYN03"]
    assert set(table.organ) == {"Breast", "Brain"}
    assert set(table.technology) == {"Visium", "Spatial Transcriptomics"}
    assert dict(zip(table.organ, table.species)) == {"Breast": "Homo sapiens", "Brain": "Mus musculus"}
    per_patient = table.groupby("patient").size()
    assert len(per_patient) >= 3 and per_patient.max() == 2  # patient-level splits possible, one patient with two
    assert (table.pixel_size_um == 1.0).all() and table.has_slide.all()
    vocab = {}
    for sid, row in table.iterrows():
        sample = read_sample(corpus, sid)  # validates counts, barcodes and that every centre lies on the slide
        a = sample.adata
        assert 150 <= a.n_obs <= 400
        assert a.uns["spfm"]["technology"] == row.technology and a.uns["spfm"]["patient"] == row.patient
        assert a.uns["source"] == SOURCE and sample.metadata["source"] == SOURCE
        assert sample.metadata["synthetic"]["seed"] == 0 and sample.metadata["pixel_size_um_embedded"] == 1.0
        x = a.X.toarray()
        assert x.min() >= 0 and np.array_equal(x, np.round(x)) and x.sum(axis=1).min() > 0
        w, h = sample.slide.dimensions
        xy = np.asarray(a.obsm["spatial"])
        assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
        # neighbouring spots sit one pitch apart: 100 um (Visium hex), 200 um (legacy ST square), at 1 um/px
        pitch = 100.0 if row.technology == "Visium" else 200.0
        dist, _ = cKDTree(xy).query(xy, k=2)
        assert np.median(dist[:, 1]) == pytest.approx(pitch, rel=1e-6)
        assert {"array_row", "array_col", "in_tissue"} <= set(a.obs)
        # ground-truth programmes: proportions under tissue, zero on bare glass
        prog = np.asarray(a.obsm["programmes"])
        assert prog.shape == (a.n_obs, len(PROGRAMMES))
        on = a.obs["in_tissue"].to_numpy() == 1
        assert np.allclose(prog[on].sum(axis=1), 1, atol=1e-5) and not prog[~on].any()
        assert 0 < (~on).sum() < 0.1 * a.n_obs
        vocab[sid] = set(a.var_names)
        sample.close()
    union, common = set.union(*vocab.values()), set.intersection(*vocab.values())
    assert len(common) < len(vocab["SYN00"]) < len(union)  # organs measure different panels


def test_ambient_counts_off_tissue(corpus):
    a = read_sample(corpus, "SYN00").adata
    depth = np.asarray(a.X.sum(axis=1)).ravel()
    on = a.obs["in_tissue"].to_numpy() == 1
    assert depth[~on].max() < 0.2 * np.median(depth[on])


def test_same_seed_same_bytes(corpus, tmp_path):
    # sample i does not depend on n_samples, so a 2-sample corpus must reproduce the first two files byte for byte
    again = make_synthetic_corpus(tmp_path / "again", n_samples=2, seed=0)
    for sid in ("SYN00", "SYN01"):
        for sub, suffix in (("st", "h5ad"), ("wsis", "tif"), ("metadata", "json")):
            assert _sha(again / sub / f"{sid}.{suffix}") == _sha(corpus / sub / f"{sid}.{suffix}"), (sid, sub)
    a, b = read_sample(corpus, "SYN00"), read_sample(again, "SYN00")
    w, h = a.slide.dimensions
    assert np.array_equal(a.slide.read_region(0, 0, w, h), b.slide.read_region(0, 0, w, h))
    a.close()
    b.close()


def test_in_memory_determinism_and_seed_matters():
    spec = corpus_plan(1)[0]
    small = dict(spots_per_sample=(40, 50), n_genes=40)
    one, two = synthesize_sample(spec, seed=5, **small), synthesize_sample(spec, seed=5, **small)
    assert np.array_equal(one.image, two.image)
    assert (one.adata.X != two.adata.X).nnz == 0 and list(one.adata.obs_names) == list(two.adata.obs_names)
    other = synthesize_sample(spec, seed=6, **small)
    assert one.image.shape != other.image.shape or not np.array_equal(one.image, other.image)
    assert one.adata.shape != other.adata.shape or (one.adata.X != other.adata.X).nnz > 0


def test_tissue_filter_drops_exactly_the_off_tissue_spots(patch_data):
    padded = 0
    for sid, d in patch_data.items():
        a, stats = d["adata"], d["stats"]
        off = set(a.obs_names[a.obs["in_tissue"] == 0])
        assert set(stats.dropped) == off and stats.n_dropped_tissue == len(off) > 0, sid
        padded += stats.n_padded
    assert padded > 0  # some spots sit near the slide edge, so their patches reach past it


def test_expression_is_predictable_from_the_image(patch_data):
    """Ridge from 7 colour/texture features to log expression, trained on three samples, tested on the held-out
    patient's sample (another technology): clearly positive per-gene Pearson; near zero once the patch -> spot
    pairing is shuffled, so the signal is the image-programme link and not anything else about the samples."""
    train, test = ["SYN00", "SYN01", "SYN02"], "SYN03"
    genes = sorted(set.intersection(*(set(patch_data[s]["genes"]) for s in train + [test])))

    def arrays(sid, rng=None):
        d = patch_data[sid]
        feats, expr = d["features"], d["expr"][:, [d["genes"].index(g) for g in genes]]
        if rng is not None:
            feats = feats[rng.permutation(len(feats))]
        # centre per sample: slide-wide stain strength and organ/patient expression offsets are constant within a
        # sample, and a 7-feature linear model would otherwise fit them to each other across samples
        return feats - feats.mean(axis=0), expr - expr.mean(axis=0)

    def mean_pearson(rng=None):
        parts = [arrays(s, rng) for s in train]
        x_train, y_train = np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])
        top = np.argsort(y_train.var(axis=0))[::-1][:30]  # the most variable genes within samples
        model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x_train, y_train[:, top])
        x_test, y_test = arrays(test, rng)
        pred = model.predict(x_test)
        return float(np.mean([np.corrcoef(pred[:, j], y_test[:, g])[0, 1] for j, g in enumerate(top)]))

    assert len(genes) >= 100
    real = mean_pearson()
    shuffled = mean_pearson(np.random.default_rng(0))
    assert real > 0.35, real
    assert abs(shuffled) < 0.1, shuffled


def test_existing_samples_are_not_clobbered(tmp_path):
    small = dict(n_samples=1, spots_per_sample=(30, 40), n_genes=30)
    root = make_synthetic_corpus(tmp_path / "hest", **small)
    before = _sha(root / "st" / "SYN00.h5ad")
    with pytest.raises(DataError) as err:
        make_synthetic_corpus(root, seed=1, **small)
    assert "SYN00.json" in str(err.value) and "overwrite" in str(err.value)
    assert _sha(root / "st" / "SYN00.h5ad") == before
    make_synthetic_corpus(root, seed=1, overwrite=True, **small)
    assert _sha(root / "st" / "SYN00.h5ad") != before


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_samples=0), "n_samples"),
        (dict(n_genes=5), "n_genes"),
        (dict(seed=-1), "seed"),
        (dict(pixel_size_um=0.0), "pixel_size_um"),
        (dict(spots_per_sample=(300, 100)), "spots_per_sample"),
    ],
)
def test_bad_options(tmp_path, kwargs, field):
    with pytest.raises(DataError) as err:
        make_synthetic_corpus(tmp_path / "hest", **kwargs)
    assert err.value.field == field
    assert not (tmp_path / "hest").exists()


def test_output_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(DataError) as err:
        make_synthetic_corpus(target)
    assert err.value.path == str(target)


def test_image_does_not_depend_on_the_render_band(monkeypatch):
    import spfm.data.synthetic as synthetic

    spec = corpus_plan(4)[3]  # the legacy-ST sample: the largest slide, several bands
    small = dict(spots_per_sample=(40, 50), n_genes=30)
    banded = synthesize_sample(spec, **small).image
    assert banded.shape[0] > 2 * synthetic.RENDER_ROWS
    monkeypatch.setattr(synthetic, "RENDER_ROWS", 10**6)
    whole = synthesize_sample(spec, **small).image
    assert np.array_equal(banded, whole)
