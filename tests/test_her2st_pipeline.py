"""The whole data path on real data: HER2ST legacy-ST sections (../shared/data/her2st; skipped when absent).

import (two sections from two patients) -> read -> patch -> shard -> verify -> load with spfm's loader and with
Hugging Face datasets; plus an interrupted shard run that resumes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from spfm.data import import_legacy_st, iter_patches, make_loader, read_sample, verify_shards, write_shards
from spfm.data import shards as shards_module
from spfm.data.loader import hf_data_files
from spfm.data.patches import PatchConfig

SECTIONS = {"B4": "B", "C2": "C"}  # section -> patient (HER2ST names sections by patient letter)
pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def her2st(shared_data, tmp_path_factory):
    src = shared_data / "her2st"
    if not src.is_dir():
        pytest.skip("../shared/data/her2st is not present")
    root = tmp_path_factory.mktemp("her2st") / "hest"
    for section, patient in SECTIONS.items():
        import_legacy_st(src / "cnts" / f"{section}.tsv.gz", src / "spots" / f"{section}_selection.tsv",
                         src / "img" / f"{section}.jpg", section, root, organ="Breast", species="Homo sapiens",
                         patient=patient)
    return src, root


@pytest.fixture(scope="module")
def shards(her2st, tmp_path_factory):
    _, root = her2st
    out = tmp_path_factory.mktemp("her2st_shards")
    return out, write_shards(root, out, progress=False)


def test_imported_spots_and_coordinates(her2st):
    src, root = her2st
    for section in SECTIONS:
        spots = pd.read_csv(src / "spots" / f"{section}_selection.tsv", sep="\t")
        counts = pd.read_csv(src / "cnts" / f"{section}.tsv.gz", sep="\t", index_col=0, usecols=[0])
        spots.index = [f"{x}x{y}" for x, y in zip(spots.x, spots.y)]
        joined = spots.loc[spots.index.intersection(counts.index)]
        adata = read_sample(root, section).adata
        assert adata.n_obs == len(joined)
        np.testing.assert_allclose(adata.obsm["spatial"], joined.loc[adata.obs_names, ["pixel_x", "pixel_y"]])


def test_patch_centre_lands_on_the_spot(her2st):
    """A patch cut from the imported pyramid matches the original JPEG around the spot better than any shift."""
    src, root = her2st
    sample = read_sample(root, "B4")
    config = PatchConfig(size_px=64, pixel_size_um=sample.pixel_size_um, min_tissue_fraction=0.0)  # no resize
    patch = next(iter_patches(sample, config))
    x, y = np.asarray(sample.adata.obsm["spatial"])[patch.index]
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(src / "img" / "B4.jpg") as im:
        original = np.asarray(im.crop((round(x) - 40, round(y) - 40, round(x) + 40, round(y) + 40)), dtype=float)
    errors = {(dx, dy): np.abs(original[8 + dy : 72 + dy, 8 + dx : 72 + dx] - patch.image).mean()
              for dx in range(-4, 5) for dy in range(-4, 5)}
    assert min(errors, key=errors.get) == (0, 0)


def test_shards_split_by_patient_and_verify(her2st, shards):
    _, root = her2st
    out, manifest = shards
    assert verify_shards(out) == []
    # two patients: one trains, the other is held out; no patient on both sides
    patients = {split: {manifest["samples"][s]["patient"] for s in ids} for split, ids in manifest["splits"].items()}
    assert len(patients["train"]) == 1 and not patients["train"] & (patients["val"] | patients["test"])
    for section in SECTIONS:
        kept = len(list(iter_patches(read_sample(root, section))))
        assert manifest["samples"][section]["n_records"] == kept > 150


def test_loader_and_datasets_read_every_record(her2st, shards):
    _, root = her2st
    out, manifest = shards
    train = manifest["splits"]["train"][0]
    adata = read_sample(root, train).adata
    genes = ["ERBB2", "KRT19", "NOT_A_GENE"]
    seen = {}
    for batch in make_loader(out, split="train", genes=genes, batch_size=64, shuffle=100):
        assert batch["image"].shape[1:] == (3, 224, 224)
        for key, meta, row, mask in zip(batch["key"], batch["meta"], batch["expression"], batch["mask"]):
            seen[key] = (meta, row.numpy(), mask.numpy())
    assert len(seen) == manifest["samples"][train]["n_records"]
    meta, row, mask = next(iter(seen.values()))
    expected = adata[meta["barcode"], ["ERBB2", "KRT19"]].X.toarray().ravel()
    np.testing.assert_array_equal(row[:2], expected)
    assert mask.tolist() == [True, True, False] and row[2] == 0
    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files=hf_data_files(out), split="train")
    assert len(ds) == len(seen)
    first = ds[0]
    assert first["jpg"].size == (224, 224) and first["json"]["sample_id"] == train
    assert np.asarray(first["counts.npy"]).sum() == adata[first["json"]["barcode"]].X.sum()


def test_interrupted_run_resumes_to_the_same_shards(her2st, shards, tmp_path, monkeypatch):
    _, root = her2st
    _, reference = shards
    out = tmp_path / "resumed"
    real = shards_module.iter_patches
    calls = {"n": 0}

    def dies_on_second_sample(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what a Ctrl-C or a killed job looks like from inside
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_module, "iter_patches", dies_on_second_sample)
    with pytest.raises(KeyboardInterrupt):
        write_shards(root, out, progress=False)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(shards_module, "iter_patches", real)
    manifest = write_shards(root, out, progress=False)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".tmp")]
    assert verify_shards(out) == []
