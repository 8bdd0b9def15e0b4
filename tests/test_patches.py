from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_adata, tissue_image

from spfm.data.hest import read_sample, write_sample
from spfm.data.patches import PatchConfig, PatchStats, iter_patches, tissue_fraction, write_patches_h5
from spfm.errors import DataError


def _marked_sample(root, pixel_size=0.25, size=1200):
    """A slide with a black 6x6 px dot at each spot centre, so a centred patch has a dark centre."""
    img = tissue_image(size, size, seed=2)
    xy = np.array([[300.0, 400.0], [700.0, 650.0], [905.0, 300.0], [5.0, 600.0]])
    for x, y in xy.astype(int):
        img[y - 3 : y + 3, x - 3 : x + 3] = 0
    meta = dict(organ="Breast", species="Homo sapiens", st_technology="Visium", patient="P1",
                pixel_size_um_embedded=pixel_size)
    write_sample(root, "S1", tiny_adata(len(xy), ["A", "B"], xy), img, meta)
    return read_sample(root, "S1")


@pytest.mark.parametrize("pixel_size", [0.25, 0.5, 0.8])
def test_patch_centre_lands_on_spot(tmp_path, pixel_size):
    sample = _marked_sample(tmp_path, pixel_size)
    config = PatchConfig(size_px=64, pixel_size_um=0.5, min_tissue_fraction=0.0)
    stats = PatchStats()
    patches = {p.barcode: p for p in iter_patches(sample, config, stats)}
    assert set(patches) == {"spot0", "spot1", "spot2", "spot3"}
    # at 0.25 um/px the slide is read from its 2x level; the dot (6 px at level 0) shrinks accordingly
    assert stats.level == (1 if pixel_size == 0.25 else 0)
    for p in patches.values():
        assert p.image.shape == (64, 64, 3) and p.image.dtype == np.uint8
        centre = p.image[30:34, 30:34].astype(int).sum(axis=2).mean()
        corner = p.image[:8, 40:48].astype(int).sum(axis=2).mean()
        assert centre < 0.6 * corner, (p.barcode, centre, corner)


def test_edge_pad_and_drop(tmp_path):
    sample = _marked_sample(tmp_path, 0.5)
    padded = {p.barcode: p for p in iter_patches(sample, PatchConfig(size_px=64, min_tissue_fraction=0.0))}
    assert padded["spot3"].padded and not padded["spot0"].padded
    assert (padded["spot3"].image[:, :20] == 255).all()  # x = 5 px: the left 27 px are off the slide
    stats = PatchStats()
    kept = [p.barcode for p in iter_patches(sample, PatchConfig(size_px=64, edge="drop"), stats)]
    assert "spot3" not in kept and stats.n_dropped_edge == 1 and stats.dropped == ["spot3"]


def test_background_patches_are_dropped(tmp_path):
    img = tissue_image(800, 800)
    img[:, 400:] = 245  # right half is glass
    xy = np.array([[200.0, 400.0], [600.0, 400.0]])
    meta = dict(st_technology="Visium", pixel_size_um_estimated=0.5)
    write_sample(tmp_path, "S1", tiny_adata(2, ["A"], xy), img, meta)
    stats = PatchStats()
    kept = [p.barcode for p in iter_patches(read_sample(tmp_path, "S1"), PatchConfig(size_px=100), stats)]
    assert kept == ["spot0"] and stats.n_dropped_tissue == 1
    assert tissue_fraction(img[:100, 450:550]) == 0.0


def test_patches_h5_round_trip_without_slide(tmp_path):
    sample = _marked_sample(tmp_path, 0.5)
    config = PatchConfig(min_tissue_fraction=0.0)
    path = write_patches_h5(sample, config)
    direct = {p.barcode: p.image for p in iter_patches(sample, config)}
    sample.close()
    (tmp_path / "wsis" / "S1.tif").unlink()
    no_slide = read_sample(tmp_path, "S1")
    assert no_slide.patches_path == path
    from_h5 = {p.barcode: p.image for p in iter_patches(no_slide, config)}
    assert from_h5.keys() == direct.keys()
    for bc in direct:
        np.testing.assert_array_equal(from_h5[bc], direct[bc])
    with pytest.raises(DataError, match="um per patch"):
        list(iter_patches(no_slide, PatchConfig(size_px=224, pixel_size_um=1.0)))


def test_bad_config():
    with pytest.raises(DataError, match="edge"):
        PatchConfig(edge="wrap")
    with pytest.raises(DataError, match="pixel_size_um"):
        PatchConfig(pixel_size_um=0)


@pytest.mark.parametrize("side", [163, 224, 300])
def test_resize_within_one_grey_level_of_pil_bilinear(side):
    from PIL import Image

    from spfm.data.patches import resize

    img = tissue_image(side, side, seed=4)
    ours = resize(img, 224)
    pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BILINEAR))
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - pil).max() <= 1


def test_tissue_fraction_is_judged_on_the_source_region(tmp_path):
    """A spot whose source region is 30% tissue is kept at a 0.25 threshold and dropped at 0.35."""
    img = np.full((800, 800, 3), 245, np.uint8)
    img[:, :330] = (225, 150, 190)  # pink tissue left of x = 330
    xy = np.array([[350.0, 400.0]])  # a 100 px region (50 um at 0.5 um/px) from x = 300: 30% tissue
    write_sample(tmp_path, "S1", tiny_adata(1, ["A"], xy), img, dict(st_technology="Visium",
                                                                      pixel_size_um_estimated=0.5))
    sample = read_sample(tmp_path, "S1")
    kept = list(iter_patches(sample, PatchConfig(size_px=50, pixel_size_um=1.0, min_tissue_fraction=0.25)))
    assert len(kept) == 1 and kept[0].tissue_fraction == pytest.approx(0.3, abs=0.03)
    assert kept[0].image.shape == (50, 50, 3)
    stats = PatchStats()
    assert list(iter_patches(sample, PatchConfig(size_px=50, pixel_size_um=1.0, min_tissue_fraction=0.35),
                             stats)) == []
    assert stats.n_dropped_tissue == 1
