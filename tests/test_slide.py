from __future__ import annotations

import numpy as np
import pytest
from conftest import tissue_image
from PIL import Image

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


def test_small_tile_cache_evicts_reuses_memory_and_stays_exact(tmp_path, image):
    """A cache of four JPEG tiles: every region still matches the decoded image while tiles are evicted and their
    memory reused for new tiles."""
    import tifffile

    path = write_pyramidal_tiff(tmp_path / "s.tif", image, 0.5, tile=128, compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        expected = tif.series[0].levels[0].asarray()
    budget = 4 * 128 * 128 * 3
    with open_slide(path, cache_bytes=budget) as slide:
        cache = slide._levels[0]._cache
        # overlapping regions along rows, as patches are cut: tiles are found in the cache, then evicted
        for y in range(0, 1000, 90):
            for x in range(0, 1400, 70):
                np.testing.assert_array_equal(slide.read_region(x, y, 100, 100), expected[y : y + 100, x : x + 100])
                assert cache.nbytes <= budget


def test_jpeg_tiles_decode_like_tifffile(tmp_path, image):
    """JPEG tiles are decoded into reused memory by imagecodecs directly; the pixels are tifffile's own."""
    import tifffile

    path = write_pyramidal_tiff(tmp_path / "s.tif", image, 0.5, tile=256, compression="jpeg", quality=90)
    with tifffile.TiffFile(path) as tif:
        expected = tif.series[0].levels[0].asarray()
    for _ in range(2):  # the second slide decodes into the memory the first one's cache left behind
        with open_slide(path) as slide:
            region = slide.read_region(0, 0, *slide.dimensions)
            np.testing.assert_array_equal(region, expected)
            np.testing.assert_array_equal(slide.read_region(300, 200, 100, 300), expected[200:500, 300:400])
    # and the colours are the source's (a colour space mix-up would move the channel means by tens of levels)
    assert np.abs(expected.mean(axis=(0, 1)) - image.mean(axis=(0, 1))).max() < 2
