"""soScope head: layouts, losses (dense vs sampled), model, fit/enhance, round trip, mini-batches, bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from spfm.errors import DataError
from spfm.heads.soscope import Layout, SoScope
from spfm.heads.soscope.losses import exp_schedule, kl_standard_normal, pair_bce
from spfm.heads.soscope.model import EnhancementDecoder, gaussian_sd, subspot_mean

FAST = dict(stage1_epochs=3, stage2_epochs=3, z_dim=16, hidden_dim=16)


def grid_spots(side: int = 6, genes: int = 4, seed: int = 0, counts: bool = True) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    r, c = np.divmod(np.arange(side * side), side)
    X = rng.poisson(6.0, (side * side, genes)).astype(np.float32) if counts else rng.normal(size=(side * side, genes))
    a = ad.AnnData(X.astype(np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(side * side)]),
                   var=pd.DataFrame(index=[f"g{i}" for i in range(genes)]))
    a.obs["array_row"], a.obs["array_col"] = r, c
    a.obsm["spatial"] = np.stack([c * 100.0, r * 100.0], axis=1)
    return a


# ----------------------------------------------------------------------------------------------------- layouts


def test_layouts_parse_and_geometry():
    sq = Layout.parse("square:3")
    assert sq.K == 9 and np.allclose(sq.offsets().mean(axis=0), 0)
    assert np.allclose(np.sort(np.unique(sq.offsets()[:, 0])), [-1 / 3, 0, 1 / 3])
    ref = Layout.parse("square:3:reference")
    assert np.allclose(ref.offsets()[-1], 0)  # the centre subspot is last in the reference's order
    assert Layout.parse("square:2:reference").spec == "square:2:reference"
    for name in ("visium7", "visium_split"):
        lay = Layout.parse(name)
        off = lay.offsets()
        assert lay.K == 7 and np.allclose(off[-1], 0)
        # Six outer subspots on a ring, neighbours one subspot pitch apart (hexagonal packing).
        r = np.hypot(off[:6, 0], off[:6, 1])
        assert np.allclose(r, lay.subspot_pitch())
        assert np.isclose(np.hypot(*(off[0] - off[1])), lay.subspot_pitch())
    for bad in ("square", "square:1", "square:x", "square:3:diag", "hex", ""):
        with pytest.raises(DataError, match="layout"):
            Layout.parse(bad)


# ----------------------------------------------------------------------------------------------------- losses


def _ring_w(M: int, seed: int = 0):
    i = torch.arange(M)
    idx = torch.cat([torch.stack([i, i]), torch.stack([i[:-1], i[1:]]), torch.stack([i[1:], i[:-1]])], dim=1)
    w = torch.cat([torch.ones(M), torch.rand(2 * M - 2, generator=torch.Generator().manual_seed(seed))])
    return idx, w


def test_dense_pair_bce_is_the_reference_bce():
    torch.manual_seed(0)
    M = 60
    R = torch.randn(M, 5)
    idx, w = _ring_w(M)
    Wd = torch.zeros(M, M)
    Wd[idx[0], idx[1]] = w
    ref = F.binary_cross_entropy(torch.sigmoid(R @ R.T), Wd)
    assert torch.allclose(pair_bce([R], idx, w, mode="dense"), ref, rtol=1e-5)
    # Two modalities: Lambda = Lp + Lg - Lp Lg.
    R2 = torch.randn(M, 3)
    lp, lg = torch.sigmoid(R @ R.T), torch.sigmoid(R2 @ R2.T)
    ref2 = F.binary_cross_entropy(lp + lg - lp * lg, Wd)
    assert torch.allclose(pair_bce([R, R2], idx, w, mode="dense"), ref2, rtol=1e-4)


def test_sampled_pair_bce_agrees_with_dense_in_expectation():
    torch.manual_seed(1)
    M = 120
    R = [torch.randn(M, 6) * 0.8, torch.randn(M, 2) * 0.5]
    idx, w = _ring_w(M, seed=2)
    dense = pair_bce(R, idx, w, mode="dense")
    gen = torch.Generator().manual_seed(3)
    est = torch.stack([pair_bce(R, idx, w, mode="sampled", n_negatives=2000, generator=gen) for _ in range(100)])
    sem = est.std() / np.sqrt(len(est))
    assert abs(float(est.mean() - dense)) < 4 * float(sem) + 1e-4
    # Gradients agree in expectation too (the estimator is linear in the sampled terms).
    Rg = [r.clone().requires_grad_(True) for r in R]
    pair_bce(Rg, idx, w, mode="dense").backward()
    g_dense = Rg[0].grad.clone()
    grads = []
    for _ in range(50):
        Rs = [r.clone().requires_grad_(True) for r in R]
        pair_bce(Rs, idx, w, mode="sampled", n_negatives=4000, generator=gen).backward()
        grads.append(Rs[0].grad)
    g_mean = torch.stack(grads).mean(0)
    cos = F.cosine_similarity(g_mean.ravel(), g_dense.ravel(), dim=0)
    assert cos > 0.95


def test_kl_and_schedules():
    mu, sigma = torch.zeros(3, 4), torch.ones(3, 4)
    z = torch.randn(3, 4)
    assert torch.allclose(kl_standard_normal(mu, sigma, z), torch.zeros(3), atol=1e-6)
    assert exp_schedule(0, 1.0, 0.01, 100) == 1.0
    assert np.isclose(exp_schedule(100, 1.0, 0.01, 100), 0.01)
    assert np.isclose(exp_schedule(50, 1.0, 0.01, 100), 0.1)
    assert exp_schedule(10, 1e-3, 1.0, 100, start_step=20) == 1e-3


def test_decoder_input_and_parameterisations():
    dec = EnhancementDecoder(z_dim=4, image_dim=3, out_dim=2, hidden=8)
    z, y, k = torch.randn(5, 4), torch.randn(5, 3), torch.full((5,), 4.0)
    seen = {}
    dec.inp.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    assert dec(z, y, k).shape == (5, 4)
    assert torch.allclose(seen["x"], torch.cat([z / 4, 1.75 * y], dim=1))
    a, b = torch.randn(5, 2), torch.randn(5, 2)
    assert torch.allclose(subspot_mean("nb", a, b), (F.softplus(b) + 1e-7) * torch.exp(a))
    assert torch.allclose(subspot_mean("poisson", a, b), F.softplus(b) + 1e-7)
    sd = gaussian_sd(torch.tensor([[-50.0, 0.0, 500.0]]), torch.tensor([4.0]), scale=2.0)
    assert torch.allclose(sd, torch.tensor([[0.5, max(0.5, float(F.softplus(torch.tensor(0.0)))), 50.0]]))


# ----------------------------------------------------------------------------------------------------- head


def test_fit_enhance_writes_subspots():
    spots = grid_spots()
    feats = np.random.default_rng(0).normal(size=(36 * 4, 5)).astype(np.float32)
    head = SoScope(omics="nb", layout="square:2", **FAST).fit(spots, image_features=feats, progress=False)
    out = head.enhance()
    assert out.n_obs == 36 * 4 and list(out.var_names) == list(spots.var_names)
    assert list(out.obs["parent_spot"][:4]) == ["s0"] * 4 and list(out.obs["subspot"][:4]) == [0, 1, 2, 3]
    assert out.obsm["spatial"].shape == (144, 2)
    assert np.allclose(out.obsm["spatial"][:4], [[-25, -25], [25, -25], [-25, 25], [25, 25]])
    assert np.all(np.isfinite(out.X)) and out.X.min() >= 0
    assert out.uns["soscope"]["K"] == 4


@pytest.mark.slow
def test_enhancement_learns_image_driven_split_and_keeps_spot_sums():
    # Each spot's counts sit in its subspots whose image feature is 1 (a "cell"); empty subspots hold nothing.
    rng = np.random.default_rng(0)
    side, K, G = 5, 4, 3
    N = side * side
    occupied = rng.random((N, K)) < 0.5
    occupied[np.arange(N), rng.integers(0, K, N)] = True
    truth = occupied[:, :, None] * rng.poisson(8.0, (N, K, G)) + occupied[:, :, None]
    spots = grid_spots(side, G)
    spots.X = truth.sum(axis=1).astype(np.float32)
    feats = occupied.reshape(-1, 1).astype(np.float32)
    head = SoScope(omics="nb", layout="square:2", stage1_epochs=50, stage2_epochs=250, stage2_lr=2e-3,
                   z_dim=32, hidden_dim=32, normalize="feature", encoder_input="log1p", gamma_schedule="run",
                   pair_link="logits", seed=0)
    out = head.fit(spots, image_features=feats, progress=False).enhance().X.reshape(N, K, G)
    # Within spots, the enhanced profile follows the truth (parent copy scores 0 here: constant within spots).
    t = truth.astype(np.float64)
    within = [np.corrcoef(out[n].sum(1), t[n].sum(1))[0, 1] for n in range(N) if 0 < occupied[n].sum() < K]
    assert np.nanmean(within) > 0.6
    rel = np.abs(out.sum(axis=1) - spots.X).sum() / spots.X.sum()
    assert rel < 0.35


def test_round_trip_config_state_dict():
    spots = grid_spots(seed=3)
    feats = np.random.default_rng(1).normal(size=(144, 3)).astype(np.float32)
    head = SoScope(omics="poisson", layout="square:2", normalize="feature", **FAST)
    head.fit(spots, image_features=feats, progress=False)
    cfg = head.to_config()
    import json

    cfg = json.loads(json.dumps(cfg))
    sd = {k: v.clone() for k, v in head.module.state_dict().items()}
    assert "feature_scale" in sd
    again = SoScope.from_config(cfg)
    again.module.load_state_dict(sd)
    a = head.enhance(spots, image_features=feats).X
    b = again.enhance(spots, image_features=feats).X
    assert np.array_equal(a, b)
    with pytest.raises(DataError, match="image features have 5 columns"):
        again.enhance(spots, image_features=np.zeros((144, 5), np.float32))
    other = spots.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(DataError, match="var_names"):
        again.enhance(other, image_features=feats)


def test_multiomics_gaussian_and_subspot_graph():
    rna, prot = grid_spots(seed=1), grid_spots(genes=6, seed=2)
    prot.var_names = [f"p{i}" for i in range(6)]
    M = 36 * 4
    W = sp.random(M, M, density=0.02, random_state=0, format="csr")
    W = ((W + W.T) > 0).astype(np.float32) * 0.5
    head = SoScope(omics=["nb", "poisson"], modalities=["rna", "protein"], layout="square:2", **FAST)
    out = head.fit([rna, prot], subspot_graph=W, progress=False).enhance()
    assert out.n_vars == 10 and list(out.var["modality"]) == ["rna"] * 4 + ["protein"] * 6
    assert np.all(np.isfinite(out.X))
    g = grid_spots(counts=False)
    out = SoScope(omics="gaussian", layout="square:3:reference", no_image="offset", **FAST).fit(
        g, progress=False).enhance()
    assert out.n_obs == 36 * 9 and out.X.min() < 0  # Gaussian outputs are not clamped
    with pytest.raises(DataError, match="same spots"):
        SoScope(omics=["nb", "nb"], layout="square:2", **FAST).fit([rna, prot[::-1].copy()], progress=False)


def test_cells_layout_with_assignment():
    spots = grid_spots(side=4)
    rng = np.random.default_rng(0)
    parent = np.concatenate([np.arange(16), rng.integers(0, 16, 30)])
    cell_xy = spots.obsm["spatial"][parent] + rng.uniform(-40, 40, (len(parent), 2))
    A = sp.csr_matrix((np.ones(len(parent)), (parent, np.arange(len(parent)))), shape=(16, len(parent)))
    head = SoScope(omics="nb", layout="cells", **FAST)
    out = head.fit(spots, assignment=A, subspot_xy=cell_xy, progress=False).enhance()
    assert out.n_obs == len(parent)
    assert list(out.obs["parent_spot"].astype(str)) == list(spots.obs_names[parent])
    A2 = A.tolil()
    A2[1, 0] = 1  # cell 0 in two regions
    with pytest.raises(DataError, match="exactly one region"):
        SoScope(omics="nb", layout="cells", **FAST).fit(spots, assignment=A2.tocsr(), subspot_xy=cell_xy,
                                                        progress=False)


def test_minibatch_latents_are_exact_and_training_runs():
    from spfm.heads.soscope.head import _Batcher

    spots = grid_spots(side=8)
    head = SoScope(omics="nb", layout="square:2", batch_spots=10, **{**FAST, "stage1_epochs": 1, "stage2_epochs": 1})
    head.fit(spots, progress=False)
    prob = head._problem
    mod = head.module.eval()
    batcher = _Batcher(prob, 10, torch.Generator().manual_seed(0))
    assert batcher.n_batches == 7
    b = next(iter(batcher.epoch()))
    with torch.no_grad():
        mu_full, _ = mod.encode(prob.x, prob.edge_index)
        mu_b, _ = mod.encode(b.x, b.edge_index)
    assert b.core.numel() == 10 and b.ctx.numel() > 10
    # The batch's core spots see their full 3-hop neighbourhood, so their latents equal the full-graph ones.
    assert torch.allclose(mu_b[b.core], mu_full[b.ctx[b.core]], atol=1e-5)
    assert b.parent.max() < b.x.shape[0] and b.y.shape[0] == 40


def test_bad_input_errors():
    spots = grid_spots()
    frac = spots.copy()
    frac.X = frac.X + 0.5
    with pytest.raises(DataError, match="non-integer"):
        SoScope(omics="nb", layout="square:2", **FAST).fit(frac, progress=False)
    with pytest.raises(DataError, match="non-integer"):
        SoScope(omics="poisson", layout="square:2", **FAST).fit(frac, progress=False)
    SoScope(omics="nb", layout="square:2", rounding=True, **FAST).fit(frac, progress=False)
    neg = spots.copy()
    neg.X[0, 0] = -1
    with pytest.raises(DataError, match="< 0"):
        SoScope(omics="nb", layout="square:2", **FAST).fit(neg, progress=False)
    with pytest.raises(DataError, match="image_features"):
        SoScope(omics="nb", layout="square:2", **FAST).fit(spots, image_features=np.zeros((36 * 9, 4)),
                                                           progress=False)
    hexa = spots.copy()
    hexa.obs["array_col"] = 2 * hexa.obs["array_col"] + hexa.obs["array_row"] % 2
    with pytest.raises(DataError, match="hexagonal"):
        SoScope(omics="nb", layout="square:2", **FAST).fit(hexa, progress=False)
    with pytest.raises(DataError, match="visium_split"):
        SoScope(omics="nb", layout="visium_split", **FAST).fit(spots, progress=False)
    lonely = ad.concat([spots, spots[:1]])
    lonely.obs_names_make_unique()
    lonely.obs.loc[lonely.obs_names[-1], ["array_row", "array_col"]] = [40, 40]
    lonely.obsm["spatial"][-1] = [4000.0, 4000.0]
    with pytest.raises(DataError, match="disconnected"):
        SoScope(omics="nb", layout="square:2", **FAST).fit(lonely, progress=False)
    nogrid = spots.copy()
    del nogrid.obs["array_row"], nogrid.obs["array_col"]
    nogrid.obsm["spatial"][0] = [9000.0, 9000.0]
    with pytest.raises(DataError, match="disconnected"):
        SoScope(omics="nb", layout="square:2", **FAST).fit(nogrid, progress=False)
    with pytest.raises(DataError, match="omics"):
        SoScope(omics="zinb")
    with pytest.raises(DataError, match="assignment"):
        SoScope(omics="nb", layout="cells", **FAST).fit(spots, progress=False)


def test_visium_split_layout_on_hex_coordinates():
    rows, cols = [], []
    for r in range(6):
        for c in range(r % 2, 12, 2):
            rows.append(r)
            cols.append(c)
    n = len(rows)
    a = ad.AnnData(np.random.default_rng(0).poisson(5, (n, 3)).astype(np.float32),
                   obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"v{i}" for i in range(n)]))
    a.obsm["spatial"] = np.stack([np.array(cols) * 50.0, np.array(rows) * 50.0 * np.sqrt(3)], axis=1)
    out = SoScope(omics="nb", layout="visium_split", **FAST).fit(a, progress=False).enhance()
    assert out.n_obs == 7 * n
    d = out.obsm["spatial"][:7] - a.obsm["spatial"][0]
    assert np.allclose(np.hypot(d[:6, 0], d[:6, 1]), 100 * 0.55 / 3) and np.allclose(d[6], 0)


def test_subspot_image_features_from_registry_backbone():
    from spfm.heads.soscope.image import subspot_image_features

    img = np.random.default_rng(0).integers(0, 255, (80, 90, 3), dtype=np.uint8)
    xy = np.array([[10.0, 10.0], [45.0, 40.0], [89.0, 79.0]])
    f = subspot_image_features(img, xy, 16, img_size=32, batch_size=2)
    assert f.shape[0] == 3 and f.shape[1] > 0 and np.all(np.isfinite(f))
    assert not np.allclose(f[0], f[1])
    with pytest.raises(DataError, match="sub_xy"):
        subspot_image_features(img, np.zeros(3), 16, img_size=32)


def test_subspot_image_features_use_the_checkpoints_normalisation(tmp_path):
    """A saved backbone (vit_tiny: mean = std = 0.5, not ImageNet's) embeds the patch exactly as the backbone's own
    normalize + forward does."""
    import torch

    from spfm.heads.soscope.image import subspot_image_features
    from spfm.models.backbones import create_backbone, save_backbone

    torch.manual_seed(0)
    net = create_backbone("vit_tiny_patch16_224", img_size=32).eval()
    assert net.mean != (0.485, 0.456, 0.406)
    save_backbone(net, tmp_path / "bb")
    img = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    f = subspot_image_features(img, np.array([[20.0, 20.0]]), 32, img_size=32, checkpoint=str(tmp_path / "bb"))
    with torch.no_grad():
        x = torch.as_tensor(img[4:36, 4:36]).permute(2, 0, 1)[None].float() / 255.0
        expected = net(net.normalize(x)).numpy()
    np.testing.assert_allclose(f, expected, rtol=1e-4, atol=1e-5)


def test_cli_enhance_and_plot(tmp_path, capsys):
    from spfm.cli import main

    spots = grid_spots()
    spots.write_h5ad(tmp_path / "spots.h5ad")
    feats = np.random.default_rng(0).normal(size=(144, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    out = tmp_path / "sub.h5ad"
    code = main(["enhance", str(tmp_path / "spots.h5ad"), "-o", str(out), "--layout", "square:2", "--omics", "nb",
                 "--image-features", str(tmp_path / "f.npy"), "--stage1-epochs", "2", "--stage2-epochs", "2",
                 "--no-progress", "--plots", "g0,g1"])
    assert code == 0
    sub = ad.read_h5ad(out)
    assert sub.n_obs == 144 and "parent_spot" in sub.obs
    assert (tmp_path / "sub_enhanced.png").stat().st_size > 1000
    code = main(["enhance", str(tmp_path / "spots.h5ad"), "-o", str(out), "--omics", "nb", "poisson"])
    assert code == 2 and "--omics" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", feats[:100])
    code = main(["enhance", str(tmp_path / "spots.h5ad"), "-o", str(out), "--image-features",
                 str(tmp_path / "bad.npy"), "--stage1-epochs", "1", "--stage2-epochs", "1", "--no-progress"])
    assert code == 2 and "image_features" in capsys.readouterr().err


def test_divergence_is_reported():
    spots = grid_spots()
    with pytest.raises(FloatingPointError, match="normalize='feature'"):
        SoScope(omics="nb", layout="square:2", stage1_lr=1e30, **FAST).fit(spots, progress=False)


@pytest.mark.slow
def test_run_demo_soscope(tmp_path):
    from spfm.heads.soscope import run_demo_soscope

    res = run_demo_soscope(tmp_path, seed=0)
    assert res["subspots"] == 4 * res["spots"]
    assert 0 < res["soscope_pearson"] <= 1 and (tmp_path / "soscope_enhanced.png").exists()


# ----------------------------------------------------------------------------------------------------- fidelity fixes


def test_reference_link_is_bounded_on_raw_count_residuals():
    # Residuals of raw counts (hundreds): every pair saturates. The reference's BCE (sigmoid, logs clamped at -100)
    # stays finite with finite gradients; the log-space variant's gradient grows with |s|.
    torch.manual_seed(0)
    M = 40
    idx, w = _ring_w(M)
    R = (torch.randn(M, 6) * 300.0).requires_grad_(True)
    for mode in ("dense", "sampled"):
        loss = pair_bce([R], idx, w, mode=mode, n_negatives=400, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and float(loss.detach()) <= 100.0 + 1e-3
        (g,) = torch.autograd.grad(loss, R)
        assert torch.isfinite(g).all()
    # A W pair with s = -92 (t = softplus(s) denormal): the log-space gradient overflows to inf/NaN -- what sent the
    # faithful osmFISH/HER2ST runs to NaN -- while the reference's is finite.
    Rd = torch.tensor([[9.6, 0.0], [-9.6, 0.0]], requires_grad=True)
    i2, w2 = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1]]), torch.ones(4)
    (g_ref,) = torch.autograd.grad(pair_bce([Rd], i2, w2, mode="dense", link="reference"), Rd)
    (g_log,) = torch.autograd.grad(pair_bce([Rd], i2, w2, mode="dense", link="logits"), Rd)
    assert torch.isfinite(g_ref).all() and not torch.isfinite(g_log).all()
    # On moderate values the two links agree (the same BCE).
    Rm = torch.randn(M, 4) * 0.5
    assert torch.allclose(pair_bce([Rm], idx, w, mode="dense", link="logits"),
                          pair_bce([Rm], idx, w, mode="dense", link="reference"), rtol=1e-4)
    with pytest.raises(ValueError, match="link"):
        pair_bce([Rm], idx, w, mode="dense", link="probit")


def test_reference_gamma_schedule_keeps_the_learning_rate_until_beta_start():
    spots = grid_spots()
    feats = np.random.default_rng(0).normal(size=(144, 3)).astype(np.float32)
    lrs = {}
    for sched in ("reference", "run"):
        head = SoScope(omics="nb", layout="square:2", gamma_schedule=sched, **FAST)
        seen = []
        orig = torch.optim.Adam.step

        def step(opt, *a, _seen=seen, **k):
            _seen.append(opt.param_groups[0]["lr"])
            return orig(opt, *a, **k)

        torch.optim.Adam.step = step
        try:
            head.fit(spots, image_features=feats, progress=False)
        finally:
            torch.optim.Adam.step = orig
        lrs[sched] = seen[-FAST["stage2_epochs"]:]
    # The reference ties gamma to beta's start (step 5000): no decay in a short stage 2; "run" decays over it.
    assert lrs["reference"] == [5e-4] * FAST["stage2_epochs"]
    assert lrs["run"][-1] < lrs["run"][0]


def test_faithful_settings_stay_finite_on_large_raw_counts():
    # Counts in the hundreds per spot drove the log-space image BCE to NaN; the reference's BCE stays finite.
    spots = grid_spots(genes=5)
    spots.X = (spots.X * 60.0).astype(np.float32)
    feats = np.random.default_rng(0).normal(size=(144, 3)).astype(np.float32)
    head = SoScope(omics="nb", layout="square:2", stage1_epochs=20, stage2_epochs=20, z_dim=16, hidden_dim=16)
    out = head.fit(spots, image_features=feats, progress=False).enhance()
    assert np.all(np.isfinite(out.X))
    assert all(np.isfinite(v) for v in head.history["stage1"] + head.history["stage2"])


def test_project_aggregate_makes_subspots_sum_to_the_spot():
    from spfm.heads.soscope.head import project_to_spots

    spots = grid_spots()
    feats = np.random.default_rng(0).normal(size=(144, 3)).astype(np.float32)
    head = SoScope(omics="nb", layout="square:2", **FAST).fit(spots, image_features=feats, progress=False)
    raw = head.enhance().X.reshape(36, 4, -1)
    head.hparams["project"] = "aggregate"
    proj = head.enhance().X.reshape(36, 4, -1)
    assert np.allclose(proj.sum(axis=1), spots.X, rtol=1e-4, atol=1e-4)
    assert proj.min() >= 0
    # Within a spot the model's proportions are kept.
    nz = raw.sum(axis=1, keepdims=True) > 0
    share_raw = np.where(nz, raw / np.where(nz, raw.sum(axis=1, keepdims=True), 1), 0)
    share_proj = np.where(nz, proj / np.where(nz, proj.sum(axis=1, keepdims=True), 1), 0)
    assert np.allclose(share_raw, share_proj, atol=1e-4)
    # Gaussian features are shifted to average to the spot; an all-zero count spot is split evenly.
    sub = np.array([[1.0, 0.0], [3.0, 0.0], [5.0, 0.0], [7.0, 0.0]])
    out = project_to_spots(sub, np.array([[10.0, 8.0]]), np.zeros(4, dtype=np.int64), ["gaussian", "nb"])
    assert np.allclose(out[:, 0], [7, 9, 11, 13]) and np.allclose(out[:, 1], 2.0)
    with pytest.raises(DataError, match="project"):
        SoScope(project="sum")


def test_no_image_interp_builds_decoder_input_and_round_trips():
    spots = grid_spots(genes=6)
    head = SoScope(omics="poisson", layout="square:2", no_image="interp", **FAST).fit(spots, progress=False)
    assert head.fitted["image_dim"] == 6 and sorted(head.fitted["interp_index"]) == list(range(6))
    y = head._problem.y.numpy()
    assert np.allclose(y.mean(axis=0), 0, atol=1e-4) and np.allclose(y.std(axis=0), 1, atol=1e-2)
    # W is weighted by the interpolated profiles' similarity (not all ones off the diagonal).
    off = head._problem.w_index[0] != head._problem.w_index[1]
    assert head._problem.w_value[off].std() > 0
    out = head.enhance().X
    twin = SoScope.from_config(head.to_config())
    twin.module.load_state_dict(head.module.state_dict())
    assert np.allclose(twin.enhance(spots).X, out, atol=1e-5)
