"""Pieces shared by the importers: input checks, image loading and the pixel size from the spot pitch."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from spfm.data.hest import check_sample_id
from spfm.data.slide import open_slide
from spfm.errors import DataError

PathLike = str | os.PathLike

#: A user-given pixel size further than this (relative) from the spot-pitch estimate earns a warning.
PIXEL_SIZE_DISAGREEMENT = 0.25


def preview(names: Iterable[object], limit: int = 10) -> str:
    """The first ``limit`` names joined by commas, with a count of the rest (for error messages)."""
    names = [str(n) for n in names]
    rest = len(names) - limit
    return ", ".join(names[:limit]) + (f", ... ({rest} more)" if rest > 0 else "")


def require_file(path: PathLike, what: str) -> Path:
    """Return ``path`` as a Path if it is an existing file, else raise :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found", path=path)
    return path


def check_target(out: PathLike, sample_id: str, overwrite: bool) -> Path:
    """Fail before any slow work when the sample id is unusable or the sample already exists in ``out``."""
    check_sample_id(sample_id)
    out = Path(out)
    meta_path = out / "metadata" / f"{sample_id}.json"
    if meta_path.exists() and not overwrite:
        raise DataError(f"sample {sample_id!r} already exists (pass overwrite=True to replace it)", path=meta_path)
    return out


def check_pixel_size(value: float | None, field: str = "pixel_size_um") -> float | None:
    """A user-given pixel size as a positive finite float (None stays None)."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DataError(f"pixel size {value!r} is not a number", field=field) from None
    if not math.isfinite(value) or value <= 0:
        raise DataError(f"pixel size must be a positive number of micrometres per pixel, got {value}", field=field)
    return value


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image, read from its header only."""
    with open_slide(path) as slide:
        return slide.dimensions


def load_image(path: Path) -> np.ndarray:
    """Decode a whole image (JPEG/PNG/TIFF, pyramidal or not) to (H, W, 3) uint8 RGB; alpha is dropped."""
    with open_slide(path) as slide:
        w, h = slide.dimensions
        return np.ascontiguousarray(slide.read_region(0, 0, w, h, level=0))


def spot_pitch_px(grid: np.ndarray, xy: np.ndarray, offsets: list[tuple[int, int]]) -> tuple[float, int]:
    """Median pixel distance between array neighbours.

    Args:
        grid: (N, 2) integer array coordinates (row, col) of the spots.
        xy: (N, 2) pixel (x, y) centres of the same spots.
        offsets: (d_row, d_col) steps that lead from a spot to a neighbour one pitch away (each pair counted once).

    Returns:
        (median distance in pixels, number of neighbour pairs); (nan, 0) when no two spots are neighbours.
    """
    index = {(int(r), int(c)): i for i, (r, c) in enumerate(np.asarray(grid))}
    dists = []
    for (r, c), i in index.items():
        for dr, dc in offsets:
            j = index.get((r + dr, c + dc))
            if j is not None:
                dists.append(float(np.hypot(*(xy[j] - xy[i]))))
    if not dists:
        return float("nan"), 0
    return float(np.median(dists)), len(dists)


def pixel_size_metadata(pitch_px: float, n_pairs: int, centre_to_centre_um: float, given: float | None,
                        source: PathLike) -> dict[str, Any]:
    """The pixel-size fields of a sample's metadata.

    The spot-pitch estimate (``centre_to_centre_um / pitch_px``) is recorded whenever there are neighbouring spots;
    a user-given value goes in ``pixel_size_um_embedded``, which readers prefer. With neither, the import fails.

    Args:
        pitch_px: median neighbour distance in slide pixels (nan when there are no neighbours).
        n_pairs: how many neighbour pairs the median is over.
        centre_to_centre_um: the technology's spot pitch in micrometres.
        given: the user's micrometres per slide pixel, or None.
        source: the file the coordinates came from, for the error message.
    """
    meta: dict[str, Any] = {}
    if n_pairs:
        if not pitch_px > 0:
            raise DataError(f"neighbouring spots lie {pitch_px} px apart; the pixel coordinates look broken",
                            path=source, field="pixel coordinates")
        estimate = centre_to_centre_um / pitch_px
        meta.update(
            pixel_size_um_estimated=estimate,
            pixel_size_estimation=f"spot pitch, {centre_to_centre_um:g} um centre to centre",
            spot_pitch_px=pitch_px,
            spot_pitch_pairs=n_pairs,
        )
        if given is not None and abs(given - estimate) > PIXEL_SIZE_DISAGREEMENT * estimate:
            warnings.warn(
                f"the given pixel size {given:g} um/px differs from the spot-pitch estimate {estimate:.4g} um/px "
                f"({pitch_px:.1f} px between neighbouring spots {centre_to_centre_um:g} um apart); using the given "
                "value",
                stacklevel=3,
            )
    elif given is None:
        raise DataError(
            "cannot estimate the pixel size: no two spots are array neighbours; pass pixel_size_um",
            path=source,
            field="pixel_size_um",
        )
    if given is not None:
        meta["pixel_size_um_embedded"] = given
    return meta
