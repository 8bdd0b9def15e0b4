from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_adata, tissue_image

from spfm.data.hest import list_samples, read_sample, write_sample
from spfm.errors import DataError

META = dict(organ="Breast", species="Homo sapiens", st_technology="Visium", patient="P1",
            pixel_size_um_estimated=0.5)


def _write(root, sid="S1", n=12, meta=None, **kw):
    rng = np.random.default_rng(0)
    xy = rng.uniform(50, 550, size=(n, 2))
    write_sample(root, sid, tiny_adata(n, ["A", "B", "C"], xy), tissue_image(600, 600), meta or META, **kw)
    return xy


def test_round_trip_and_listing(tmp_path):
    xy = _write(tmp_path)
    _write(tmp_path, "S2", meta=dict(META, organ="Brain", patient="P2", pixel_size_um_embedded=0.25))
    s = read_sample(tmp_path, "S1")
    assert s.adata.n_obs == 12
    np.testing.assert_allclose(s.adata.obsm["spatial"], xy)
    info = s.adata.uns["spfm"]
    assert info["sample_id"] == "S1" and info["pixel_size_um"] == 0.5 and info["pixel_size_source"] == "estimated"
    assert (info["organ"], info["technology"], info["patient"]) == ("Breast", "Visium", "P1")
    assert s.slide.dimensions == (600, 600)
    # the embedded pixel size wins over the estimate
    assert read_sample(tmp_path, "S2").pixel_size_um == 0.25
    table = list_samples(tmp_path)
    assert list(table.sample_id) == ["S1", "S2"]
    assert list(table.organ) == ["Breast", "Brain"] and table.has_slide.all() and not table.has_patches.any()
    assert list(table.n_spots) == [12, 12]


def test_missing_root_and_sample(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_sample(tmp_path / "nope", "S1")
    _write(tmp_path)
    with pytest.raises(DataError, match=r"'S9' not found.*samples here: S1"):
        read_sample(tmp_path, "S9")


@pytest.mark.parametrize("value", [0, -1.0, None, "abc"])
def test_bad_pixel_size(tmp_path, value):
    _write(tmp_path)
    meta_path = tmp_path / "metadata" / "S1.json"
    meta = json.loads(meta_path.read_text())
    meta["pixel_size_um_estimated"] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"S1\.json: pixel_size_um_estimated"):
        read_sample(tmp_path, "S1")


def test_bad_counts_and_barcodes(tmp_path):
    adata = tiny_adata(5, ["A", "B"], np.full((5, 2), 100.0))
    adata.X[0, 0] = np.nan
    with pytest.raises(DataError, match=r"X: 1 NaN"):
        write_sample(tmp_path, "S1", adata, tissue_image(300, 300), META)
    adata.X[0, 0] = -2
    with pytest.raises(DataError, match="X: negative"):
        write_sample(tmp_path, "S1", adata, tissue_image(300, 300), META)
    adata.X[0, 0] = 1
    adata.obs_names = ["a", "a", "b", "c", "d"]
    with pytest.raises(DataError, match=r"obs_names: 1 duplicated barcode"):
        write_sample(tmp_path, "S1", adata, tissue_image(300, 300), META)
    assert not (tmp_path / "metadata" / "S1.json").exists() and not (tmp_path / "st" / "S1.h5ad").exists()


def test_coordinates_outside_image(tmp_path):
    adata = tiny_adata(3, ["A"], np.array([[10.0, 10.0], [20.0, 20.0], [900.0, 10.0]]))
    with pytest.raises(DataError, match=r'obsm\["spatial"\]: 1 spot centre\(s\) lie outside the 300 x 300'):
        write_sample(tmp_path, "S1", adata, tissue_image(300, 300), META)


def test_existing_sample_is_kept(tmp_path):
    xy = _write(tmp_path)
    before = (tmp_path / "st" / "S1.h5ad").read_bytes()
    with pytest.raises(DataError, match="already exists"):
        _write(tmp_path, n=4)
    assert (tmp_path / "st" / "S1.h5ad").read_bytes() == before
    np.testing.assert_allclose(read_sample(tmp_path, "S1").adata.obsm["spatial"], xy)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_sample_id_with_dot_is_rejected(tmp_path):
    with pytest.raises(DataError, match="sample id 'a.b'"):
        _write(tmp_path, sid="a.b")


def test_atomic_files_get_the_usual_mode(tmp_path):
    import os

    from spfm.atomic import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode
