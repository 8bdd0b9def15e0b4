"""spfm embed: HEST roots and shards -> embeddings, with resumption, workers, precision and checkpoints."""

from __future__ import annotations

import json

import anndata as ad
import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_adata, tissue_image

from spfm.data.hest import read_sample, write_sample
from spfm.data.patches import PatchConfig, iter_patches
from spfm.errors import DataError
from spfm.models.backbones.registry import create_backbone, save_backbone
from spfm.models.embed import EMBED_UNS_KEY, embed

NAME = "vit_tiny_patch16_224"
SMALL = {"img_size": 32, "depth": 2}  # a 2-block ViT on 32 px images keeps CPU tests fast
META = {"pixel_size_um_estimated": 1.0, "organ": "Breast", "species": "Homo sapiens",
        "st_technology": "Visium"}


def _root(tmp_path, n_samples=2, n_spots=12):
    root = tmp_path / "hest"
    for s in range(n_samples):
        rng = np.random.default_rng(s)
        xy = rng.uniform(40, 260, size=(n_spots, 2))
        xy[0] = (2.0, 2.0)  # in the white border: the tissue mask drops it
        write_sample(root, f"S{s}", tiny_adata(n_spots, ["A", "B", "C"], xy, seed=s), tissue_image(300, 300, s),
                     {**META, "patient": f"P{s}"})
    return root


def _checkpoint(tmp_path, seed=0):
    torch.manual_seed(seed)
    path = tmp_path / f"ckpt{seed}"
    save_backbone(create_backbone(NAME, **SMALL), path)
    return path


def _reference(root, sid, ckpt, config):
    """Embeddings computed by hand: patches in obs order, normalised, one forward pass in float32."""
    model = create_backbone(NAME, checkpoint=ckpt, **SMALL).eval()
    patches = sorted(iter_patches(read_sample(root, sid), config), key=lambda p: p.index)
    x = torch.from_numpy(np.stack([p.image for p in patches])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return [p.barcode for p in patches], model(model.normalize(x)).numpy()


def test_hest_root_embeddings_match_a_direct_forward_pass(tmp_path):
    root, ckpt = _root(tmp_path), _checkpoint(tmp_path)
    out = embed(root, tmp_path / "emb", checkpoint=ckpt, backbone=NAME, backbone_kwargs=SMALL, batch_size=5,
                progress=False)
    config = PatchConfig(size_px=32, pixel_size_um=0.5)
    for sid in ("S0", "S1"):
        adata = ad.read_h5ad(out / f"{sid}.h5ad")
        barcodes, expected = _reference(root, sid, ckpt, config)
        assert list(adata.obs_names) == barcodes  # obs order of the sample, dropped spots removed
        np.testing.assert_allclose(adata.obsm[f"X_{NAME}"], expected, atol=1e-5)
        assert adata.obsm[f"X_{NAME}"].dtype == np.float32
        info = adata.uns[EMBED_UNS_KEY]
        assert list(info["dropped"]) == ["spot0"] and info["n_spots"] == 12 and info["n_kept"] == 11
        # counts and coordinates travel with the embeddings, for heads
        source = read_sample(root, sid).adata
        np.testing.assert_array_equal(adata.X, source[barcodes].X)
        np.testing.assert_array_equal(adata.obsm["spatial"], source[barcodes].obsm["spatial"])
    summary = json.loads((out / "embed.json").read_text())
    assert summary["outputs"]["S0"] == {"n_spots": 12, "n_kept": 11, "n_dropped": 1}
    # the HEST protocol reads this output as it is, aligned to the root's counts by barcode
    from spfm.eval.hest_bench import bench_hest

    bench = bench_hest(root, out, splits="leave_one_sample_out", genes=None, n_genes=2)
    assert bench["embedding_key"] == f"X_{NAME}"
    assert [(s["n_train"], s["n_test"], s["pca_dim"]) for s in bench["splits"]] == [(11, 11, 11)] * 2


def test_workers_and_bf16_agree_with_one_process(tmp_path):
    root, ckpt = _root(tmp_path, n_samples=1), _checkpoint(tmp_path)
    common = dict(checkpoint=ckpt, backbone_kwargs=SMALL, batch_size=4, progress=False)
    one = ad.read_h5ad(embed(root, tmp_path / "a", **common) / "S0.h5ad")
    two = ad.read_h5ad(embed(root, tmp_path / "b", num_workers=2, **common) / "S0.h5ad")
    half = ad.read_h5ad(embed(root, tmp_path / "c", precision="bf16", **common) / "S0.h5ad")
    assert list(two.obs_names) == list(one.obs_names)
    np.testing.assert_allclose(two.obsm[f"X_{NAME}"], one.obsm[f"X_{NAME}"], atol=1e-5)
    ref = one.obsm[f"X_{NAME}"]
    err = np.abs(half.obsm[f"X_{NAME}"] - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05  # bf16 really ran (not bit-identical) and stayed close


def test_resume_skips_matching_outputs_and_refuses_other_configs(tmp_path):
    root, ckpt = _root(tmp_path), _checkpoint(tmp_path)
    out = tmp_path / "emb"
    common = dict(checkpoint=ckpt, backbone_kwargs=SMALL, progress=False)
    embed(root, out, samples=["S0"], **common)
    before = (out / "S0.h5ad").stat().st_mtime_ns
    embed(root, out, **common)  # S0 is done: only S1 is computed
    assert (out / "S0.h5ad").stat().st_mtime_ns == before and (out / "S1.h5ad").is_file()
    assert json.loads((out / "embed.json").read_text())["outputs"]["S0"] == {"skipped": True}
    other = _checkpoint(tmp_path, seed=1)
    with pytest.raises(DataError, match="another configuration"):
        embed(root, out, checkpoint=other, backbone_kwargs=SMALL, progress=False)
    embed(root, out, checkpoint=other, backbone_kwargs=SMALL, overwrite=True, progress=False)
    assert (out / "S0.h5ad").stat().st_mtime_ns != before


def test_checkpoint_config_names_the_backbone(tmp_path):
    """spfm train's final folder (config.json with backbone and img_size) loads without options."""
    root, ckpt = _root(tmp_path, n_samples=1), _checkpoint(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_args"].pop("img_size")
    (ckpt / "config.json").write_text(json.dumps({**config, "backbone": NAME, "img_size": 32}))
    out = embed(root, tmp_path / "emb", checkpoint=ckpt, backbone_kwargs={"depth": 2}, progress=False)
    assert ad.read_h5ad(out / "S0.h5ad").obsm[f"X_{NAME}"].shape == (11, 192)


def test_shards_one_file_per_split(tmp_path):
    from spfm.data.loader import make_dataset
    from spfm.data.shards import write_shards

    root, ckpt = _root(tmp_path, n_samples=3), _checkpoint(tmp_path)
    shards = tmp_path / "shards"
    write_shards(root, shards, patch=PatchConfig(size_px=32, pixel_size_um=0.5), progress=False)
    out = embed(shards, tmp_path / "emb", checkpoint=ckpt, backbone_kwargs=SMALL, batch_size=4, progress=False)
    model = create_backbone(NAME, checkpoint=ckpt, **SMALL).eval()
    for split in ("train", "test"):
        with h5py.File(out / f"{split}.h5", "r") as f:
            keys = [k.decode() for k in f["keys"][:]]
            emb = f["embeddings"][:]
        records = list(make_dataset(shards, split=split, shuffle=0))
        assert keys == [r["key"] for r in records]
        x = torch.stack([r["image"] for r in records]).float() / 255
        with torch.no_grad():
            np.testing.assert_allclose(emb, model(model.normalize(x)).numpy(), atol=1e-5)


def test_bad_inputs(tmp_path):
    root = _root(tmp_path, n_samples=1)
    with pytest.raises(DataError, match="neither a HEST root"):
        embed(tmp_path, tmp_path / "emb", progress=False)
    with pytest.raises(DataError, match="do not fit"):
        embed(root, tmp_path / "emb", backbone_kwargs=SMALL, patch=PatchConfig(size_px=48), progress=False)
    with pytest.raises(DataError, match="precision"):
        embed(root, tmp_path / "emb", backbone_kwargs=SMALL, precision="fp8", progress=False)
    with pytest.raises(DataError, match="not found"):
        embed(root, tmp_path / "emb", backbone_kwargs=SMALL, samples=["nope"], progress=False)
    # a checkpoint of another architecture fails to load, naming the mismatch
    torch.manual_seed(0)
    save_backbone(create_backbone("vit_small_patch16_224", img_size=32, depth=2), tmp_path / "small")
    with pytest.raises(Exception, match="(?i)size|shape|mismatch"):
        embed(root, tmp_path / "emb2", backbone=NAME, checkpoint=tmp_path / "small", backbone_kwargs=SMALL,
              progress=False)
