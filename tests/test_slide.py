from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import tissue_image
from spfm.data.slide import BACKGROUND, open_slide, write_pyramidal_tiff
from spfm.errors import DataError


@pytest.fixture()
def image() -> np.ndarray:
    return tissue_image(1500, 1100, seed=1)


def test_pyramidal_tiff_levels_and_pixel_size(tmp_path, image):
    path = write_pyramidal_tiff(tmp_path / "s.tif", image, 0.25, tile=128, min_size=300, compression="zlib")
    with open_slide(path) as slide:
        assert slide.dimensions == (1500, 1100)
        # halved until the longer side is at most 300: 1500 -> 750 -> 375 -> 188
        assert slide.level_count == 4
        assert slide.level_dimensions[1] == (750, 550)
        assert slide.level_downsamples[1] == pytest.approx(2.0)
        assert slide.mpp == pytest.approx(0.25)
        assert slide.best_level_for_downsample(2.5) == 1
        assert slide.best_level_for_downsample(0.7) == 0


def test_read_region_matches_source_across_tiles(tmp_path, image):
    path = write_pyramidal_tiff(tmp_path / "s.tif", image, 0.5, tile=128, compression="zlib")
    with open_slide(path) as slide:
        # a region that straddles four tiles, read twice (second time from the tile cache)
        for _ in range(2):
            region = slide.read_region(100, 200, 300, 90)
            np.testing.assert_array_equal(region, image[200:290, 100:400])
        lvl = slide.read_region(400, 200, 50, 40, level=1)
        expected = np.asarray(Image.fromarray(image).reduce(2))[100:140, 200:250]
        np.testing.assert_array_equal(lvl, expected)


def test_read_region_past_edge_is_white(tmp_path, image):
    path = write_pyramidal_tiff(tmp_path / "s.tif", image, 0.5, tile=128, compression="zlib")
    with open_slide(path) as slide:
        region = slide.read_region(-10, 1090, 30, 30)
        assert (region[:, :10] == BACKGROUND).all()
        assert (region[10:] == BACKGROUND).all()
        np.testing.assert_array_equal(region[:10, 10:], image[1090:1100, 0:20])
        assert (slide.read_region(5000, 5000, 8, 8) == BACKGROUND).all()


def test_plain_jpeg_and_png(tmp_path, image):
    Image.fromarray(image).save(tmp_path / "s.png")
    with open_slide(tmp_path / "s.png") as slide:
        assert slide.level_count == 1 and slide.mpp is None
        np.testing.assert_array_equal(slide.read_region(10, 20, 30, 40), image[20:60, 10:40])
        thumb = slide.thumbnail(150)
        assert max(thumb.shape[:2]) == 150 and thumb.shape[2] == 3


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_slide(tmp_path / "missing.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match="bad.tif"):
        open_slide(bad)
