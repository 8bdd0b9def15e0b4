"""Whole-slide images, opened lazily: pyramidal TIFFs read tile by tile, plain JPEG/PNG/TIFF decoded once.

A :class:`Slide` answers ``read_region(x, y, w, h, level)`` in level-0 pixel coordinates, like OpenSlide and
tiffslide, but reads pyramidal TIFFs through tifffile directly with a small tile cache: patches of neighbouring
spots share tiles, and decoding a tile once instead of once per patch is most of the speed of ``spfm shard``.
Regions that reach past the slide edge are filled with white (the colour of an empty glass slide).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from spfm.atomic import atomic_path
from spfm.errors import DataError

#: File suffixes opened with the tiled TIFF reader; anything else goes through PIL.
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ome.tif", ".ome.tiff")
#: Fill value for pixels outside the slide.
BACKGROUND = 255
#: Default bytes of decoded tiles kept per slide. Patches are cut in bands of rows, so the working set is about
#: three rows of tiles across the tissue: 256 MiB holds that for tissue ~110 tiles (56k px at 512 px tiles) wide,
#: beyond a 0.25 um/px scan of a 1 cm section; a wider one only decodes some tiles twice.
CACHE_BYTES = 256 * 2**20
#: Bytes of tile memory kept for reuse after tiles are evicted or slides closed (see :class:`_SparePool`): one full
#: cache, so a process cutting patches from one slide after another holds no more than while one slide is open.
SPARE_BYTES = CACHE_BYTES
#: TIFF compression code of JPEG.
_TIFF_JPEG = 7


class _SparePool:
    """Memory of dropped tiles, handed out again to decode new tiles into.

    The first write to freshly allocated memory costs a page fault every 4 KiB, and for a 512 x 512 tile that is
    a third to half as much CPU time as decoding the JPEG itself. Reusing the memory of tiles that were evicted, or of a
    closed slide's cache, lets a process that cuts patches from one slide after another decode into memory that is
    already mapped. Shared by all slides of the process; holds arrays of one shape (the tile shape in use) and at
    most :data:`SPARE_BYTES`.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised uint8 array of ``shape``: reused memory when there is spare memory of that shape."""
        with self._lock:
            if self._arrays and self._arrays[-1].shape == shape:
                array = self._arrays.pop()
                self.nbytes -= array.nbytes
                return array
        return np.empty(shape, dtype=np.uint8)

    def give(self, array: np.ndarray) -> None:
        """Offer a tile that nothing refers to any more; kept while the pool has room."""
        with self._lock:
            if self._arrays and self._arrays[-1].shape != array.shape:  # another tile size is now in use
                self._arrays.clear()
                self.nbytes = 0
            if self.nbytes + array.nbytes <= self.max_bytes:
                self._arrays.append(array)
                self.nbytes += array.nbytes


_SPARE = _SparePool(SPARE_BYTES)


class _TileCache:
    """Decoded tiles of one slide (all levels), least recently used dropped first, bounded in bytes.

    The tiles never leave the slide (regions are copied out of them), so dropped tiles go to :data:`_SPARE`.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
        return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        self._tiles[key] = tile
        self.nbytes += tile.nbytes
        while self.nbytes > self.max_bytes and len(self._tiles) > 1:  # always keep the tile just added
            dropped = self._tiles.popitem(last=False)[1]
            self.nbytes -= dropped.nbytes
            _SPARE.give(dropped)

    def clear(self) -> None:
        for tile in self._tiles.values():
            _SPARE.give(tile)
        self._tiles.clear()
        self.nbytes = 0


class _TiffLevel:
    """One pyramid level of a TIFF file, decoded tile by tile (or whole, for stripped pages)."""

    def __init__(self, page, level: int, cache: _TileCache) -> None:
        self.page = page
        self.level = level
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.tiled = bool(page.is_tiled)
        self._cache = cache
        self._full: np.ndarray | None = None
        self._jpeg: tuple | None = None
        if self.tiled:
            self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
            self.tiles_across = -(-self.width // self.tile_w)
            if (page.compression == _TIFF_JPEG and page.bitspersample == 8 and page.samplesperpixel == 3
                    and page.planarconfig == 1):
                from tifffile.tifffile import jpeg_decode_colorspace

                # 8-bit RGB JPEG tiles (what write_pyramidal_tiff writes, and most H&E scans): decoded straight into
                # reused memory, with the colour handling tifffile's own decoder would use
                self._jpeg = jpeg_decode_colorspace(page.photometric, page.planarconfig, page.extrasamples,
                                                    page.is_jfif)

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        index = ty * self.tiles_across + tx
        tile = self._cache.get((self.level, index))
        if tile is not None:
            return tile
        page = self.page
        fh = page.parent.filehandle
        fh.seek(page.dataoffsets[index])
        data = fh.read(page.databytecounts[index])
        if self._jpeg is not None and data:
            colorspace, outcolorspace = self._jpeg
            tile = imagecodecs.jpeg_decode(data, tables=page.jpegtables, colorspace=colorspace,
                                           outcolorspace=outcolorspace, shape=(self.tile_h, self.tile_w),
                                           out=_SPARE.take((self.tile_h, self.tile_w, 3)))
        else:
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            tile = _as_rgb(segment[0])
        self._cache.put((self.level, index), tile)
        return tile

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read the in-bounds rectangle [x, x+w) x [y, y+h) of this level (caller clips)."""
        if not self.tiled:
            if self._full is None:
                self._full = _as_rgb(self.page.asarray())
            return self._full[y : y + h, x : x + w]
        out = np.empty((h, w, 3), dtype=np.uint8)
        for ty in range(y // self.tile_h, (y + h - 1) // self.tile_h + 1):
            for tx in range(x // self.tile_w, (x + w - 1) // self.tile_w + 1):
                tile = self._tile(ty, tx)
                ox, oy = tx * self.tile_w, ty * self.tile_h
                x0, y0 = max(x, ox), max(y, oy)
                x1, y1 = min(x + w, ox + self.tile_w), min(y + h, oy + self.tile_h)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        return out


def _as_rgb(array: np.ndarray) -> np.ndarray:
    """Bring a decoded image to (H, W, 3) uint8: drop alpha, repeat grey, scale 16-bit."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise DataError(f"unsupported pixel type {array.dtype}; expected 8-bit RGB")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    elif array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


class Slide:
    """A slide image opened lazily. Use :func:`open_slide` to make one.

    Args:
        path: the image file.
        cache_bytes: at most this many bytes of decoded tiles are kept (pyramidal TIFFs; see :data:`CACHE_BYTES`).

    Attributes:
        path: the image file.
        dimensions: (width, height) of level 0 in pixels.
        level_dimensions: (width, height) per pyramid level, level 0 first.
        level_downsamples: downsample factor of each level relative to level 0.
        mpp: micrometres per pixel at level 0 as stored in the file, or None when the file does not say.
    """

    def __init__(self, path: str | os.PathLike, *, cache_bytes: int = CACHE_BYTES) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("slide image not found", path=self.path)
        self._tiff = None
        self._pil_array: np.ndarray | None = None
        self.mpp: float | None = None
        name = self.path.name.lower()
        if name.endswith(TIFF_SUFFIXES):
            self._open_tiff(cache_bytes)
        else:
            self._open_pil()

    def _open_tiff(self, cache_bytes: int) -> None:
        import tifffile

        try:
            self._tiff = tifffile.TiffFile(self.path)
            series = self._tiff.series[0]
            pages = [level.keyframe for level in series.levels]
        except Exception as exc:  # tifffile raises several types for corrupt files
            raise DataError(f"cannot read TIFF: {exc}", path=self.path) from exc
        cache = _TileCache(cache_bytes)
        self._levels = [_TiffLevel(page, level, cache) for level, page in enumerate(pages)]
        self.level_dimensions = [(lv.width, lv.height) for lv in self._levels]
        self.mpp = _tiff_mpp(pages[0])

    def _open_pil(self) -> None:
        Image.MAX_IMAGE_PIXELS = None  # whole-slide JPEGs are large on purpose
        try:
            with Image.open(self.path) as im:
                size = im.size
        except Exception as exc:
            raise DataError(f"cannot read image: {exc}", path=self.path) from exc
        self._levels = []
        self.level_dimensions = [size]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        w0 = self.level_dimensions[0][0]
        return [w0 / w for w, _ in self.level_dimensions]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (so we never upsample a coarse level)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = level
        return best

    def _pil(self) -> np.ndarray:
        if self._pil_array is None:
            try:
                with Image.open(self.path) as im:
                    self._pil_array = _as_rgb(np.asarray(im.convert("RGB")))
            except Exception as exc:
                raise DataError(f"cannot decode image: {exc}", path=self.path) from exc
        return self._pil_array

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Read a region as an (h, w, 3) uint8 array.

        Args:
            x, y: top-left corner in level-0 pixels (may be negative or past the edge).
            w, h: size in pixels of ``level``.
            level: pyramid level.

        Returns:
            (h, w, 3) uint8; pixels outside the slide are :data:`BACKGROUND`.
        """
        ds = self.level_downsamples[level]
        lx, ly = int(round(x / ds)), int(round(y / ds))
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x0 == lx and y0 == ly and x1 == lx + w and y1 == ly + h:
            return self._read(level, x0, y0, w, h)
        out = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._tiff is not None:
            return self._levels[level].read(x, y, w, h)
        return self._pil()[y : y + h, x : x + w]

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """A downsampled view of the whole slide whose longer side is at most ``max_size`` pixels."""
        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_size
        level = self.best_level_for_downsample(max(scale, 1.0))
        lw, lh = self.level_dimensions[level]
        region = self.read_region(0, 0, lw, lh, level=level)
        size = (max(1, round(w0 / max(scale, 1.0))), max(1, round(h0 / max(scale, 1.0))))
        return np.asarray(Image.fromarray(region).resize(size, Image.Resampling.BOX))

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
            self._levels[0]._cache.clear()  # one cache for all levels; its memory goes to the spare pool
        self._pil_array = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, dimensions={self.dimensions}, levels={self.level_count}, mpp={self.mpp})"


def _tiff_mpp(page) -> float | None:
    """Micrometres per pixel from the TIFF resolution tags, or None when absent or meaningless."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if not num or not den:
        return None
    per_unit = num / den
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre; 1 = no unit
    if um_per_unit is None or per_unit <= 1:
        return None
    return um_per_unit / per_unit


def open_slide(path: str | os.PathLike, **kwargs) -> Slide:
    """Open a slide image lazily (pyramidal or plain TIFF, SVS, JPEG, PNG)."""
    return Slide(path, **kwargs)


def write_pyramidal_tiff(
    path: str | os.PathLike,
    image: np.ndarray,
    pixel_size_um: float,
    *,
    tile: int = 512,
    min_size: int = 1024,
    compression: str = "jpeg",
    quality: int = 90,
) -> Path:
    """Write an (H, W, 3) uint8 image as a tiled pyramidal TIFF (levels halved down to ``min_size``), atomically.

    The pixel size goes into the resolution tags, so tiffslide, QuPath and OpenSlide-compatible readers see it.
    """
    import tifffile

    image = _as_rgb(np.asarray(image))
    levels = [image]
    pil = Image.fromarray(image)
    while max(pil.size) > min_size:
        pil = pil.reduce(2)
        levels.append(np.asarray(pil))
    options = dict(tile=(tile, tile), photometric="rgb", compression=compression, resolutionunit="CENTIMETER")
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}
    final = Path(path)
    with atomic_path(final) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
            px_per_cm = 1e4 / pixel_size_um
            tif.write(levels[0], subifds=len(levels) - 1, resolution=(px_per_cm, px_per_cm), **options)
            for i, level in enumerate(levels[1:], start=1):
                res = px_per_cm / (image.shape[1] / level.shape[1])
                tif.write(level, subfiletype=1, resolution=(res, res), **options)
    return final
