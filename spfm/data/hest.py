"""The HEST layout: read, list, validate and write samples.

A HEST-1k style root holds, per sample id::

    st/{id}.h5ad            counts in X, obsm["spatial"] = full-resolution pixel (x, y)
    wsis/{id}.tif           the slide (pyramidal TIFF; plain JPEG/PNG/TIFF also read)
    metadata/{id}.json      organ, species, st_technology, patient, pixel_size_um_estimated/embedded, ...
    patches/{id}.h5         optional: img (N, 224, 224, 3) uint8, coords (N, 2), barcode (N,)

:func:`read_sample` returns a :class:`HestSample`: the AnnData with ``uns["spfm"]`` filled in as DESIGN.md
describes, and the slide opened lazily on first use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spfm.atomic import atomic_path, atomic_write_json, read_json_object
from spfm.data.slide import Slide, open_slide, write_pyramidal_tiff
from spfm.errors import DataError

#: Slide file suffixes looked for under ``wsis/``, in order of preference.
SLIDE_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".jpg", ".jpeg", ".png")
#: Metadata fields holding the pixel size, in order of preference (HEST-1k's names).
PIXEL_SIZE_FIELDS = ("pixel_size_um_embedded", "pixel_size_um_estimated")
#: Sample ids become WebDataset keys and file names: no dots, slashes or spaces.
SAMPLE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_sample_id(sample_id: str) -> str:
    """Return ``sample_id`` if it is usable as a file name and a WebDataset key, else raise :class:`DataError`."""
    if not isinstance(sample_id, str) or not SAMPLE_ID_PATTERN.match(sample_id):
        raise DataError(
            f"sample id {sample_id!r} must start with a letter or digit and contain only letters, digits, '_' and '-'"
            " (it becomes a file name and a WebDataset key, where a dot would split the key)",
            field="sample_id",
        )
    return sample_id


@dataclass
class HestSample:
    """One sample of a HEST-layout root.

    Attributes:
        sample_id: the sample id.
        root: the HEST root directory.
        adata: spots x genes, raw counts in ``X``; ``obsm["spatial"]`` (N, 2) full-resolution pixel (x, y);
            ``uns["spfm"]`` with sample_id, pixel_size_um, pixel_size_source, technology, species, organ, patient,
            slide_path.
        metadata: the metadata JSON as stored.
        slide_path: the slide file, or None when the sample has none.
        patches_path: ``patches/{id}.h5`` when present.
    """

    sample_id: str
    root: Path
    adata: ad.AnnData
    metadata: dict[str, Any]
    slide_path: Path | None
    patches_path: Path | None = None
    _slide: Slide | None = field(default=None, repr=False)

    @property
    def pixel_size_um(self) -> float:
        return float(self.adata.uns["spfm"]["pixel_size_um"])

    @property
    def slide(self) -> Slide:
        """The slide, opened on first access."""
        if self._slide is None:
            if self.slide_path is None:
                raise DataError(f"sample {self.sample_id!r} has no slide image under wsis/", path=self.root / "wsis")
            self._slide = open_slide(self.slide_path)
        return self._slide

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def _find_slide(root: Path, sample_id: str) -> Path | None:
    for suffix in SLIDE_SUFFIXES:
        candidate = root / "wsis" / f"{sample_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _check_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError("HEST root directory not found", path=root)
    if not (root / "st").is_dir():
        raise DataError("not a HEST root: no st/ directory", path=root)
    return root


def sample_ids(root: str | os.PathLike) -> list[str]:
    """Sample ids under a HEST root (those with ``st/{id}.h5ad``), sorted."""
    root = _check_root(root)
    return sorted(p.name[: -len(".h5ad")] for p in (root / "st").glob("*.h5ad") if not p.name.startswith("."))


def read_metadata(root: str | os.PathLike, sample_id: str) -> dict[str, Any]:
    """The metadata JSON of one sample."""
    return read_json_object(Path(root) / "metadata" / f"{sample_id}.json", "metadata file")


def pixel_size_from_metadata(meta: dict[str, Any], path: str | os.PathLike | None = None) -> tuple[float, str]:
    """(micrometres per pixel, which field it came from) from a HEST metadata record."""
    for key in PIXEL_SIZE_FIELDS:
        value = meta.get(key)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise DataError(f"pixel size {value!r} is not a number", path=path, field=key) from None
        if not np.isfinite(value) or value <= 0:
            raise DataError(f"pixel size must be a positive number, got {value}", path=path, field=key)
        return value, key.removeprefix("pixel_size_um_")
    raise DataError(f"no pixel size: set one of {', '.join(PIXEL_SIZE_FIELDS)}", path=path, field=PIXEL_SIZE_FIELDS[1])


def _meta_str(meta: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = meta.get(key)
        if value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value) != "":
            return str(value)
    return None


def list_samples(root: str | os.PathLike) -> pd.DataFrame:
    """One row per sample with its metadata: sample_id, organ, species, technology, patient, pixel_size_um,
    n_spots (from the metadata when recorded), has_slide, has_patches."""
    root = _check_root(root)
    rows = []
    for sid in sample_ids(root):
        meta = read_metadata(root, sid)
        try:
            pixel_size = pixel_size_from_metadata(meta, root / "metadata" / f"{sid}.json")[0]
        except DataError:
            pixel_size = float("nan")
        rows.append(
            dict(
                sample_id=sid,
                organ=_meta_str(meta, "organ"),
                species=_meta_str(meta, "species"),
                technology=_meta_str(meta, "st_technology", "technology"),
                patient=_meta_str(meta, "patient"),
                pixel_size_um=pixel_size,
                n_spots=meta.get("spots_under_tissue"),
                has_slide=_find_slide(root, sid) is not None,
                has_patches=(root / "patches" / f"{sid}.h5").is_file(),
            )
        )
    columns = ["sample_id", "organ", "species", "technology", "patient", "pixel_size_um", "n_spots", "has_slide",
               "has_patches"]
    return pd.DataFrame(rows, columns=columns)


def validate_counts(adata: ad.AnnData, path: str | os.PathLike | None = None) -> None:
    """Raise :class:`DataError` on NaN/infinite/negative counts, duplicated barcodes or genes, or bad coordinates."""
    X = adata.X
    values = X.data if sp.issparse(X) else np.asarray(X)
    if values.size:
        if not np.all(np.isfinite(values)):
            bad = int(np.sum(~np.isfinite(values)))
            raise DataError(f"{bad} NaN or infinite count value(s)", path=path, field="X")
        if values.min() < 0:
            raise DataError(f"negative count value {values.min()}", path=path, field="X")
    dup = adata.obs_names[adata.obs_names.duplicated()]
    if len(dup):
        raise DataError(f"{len(dup)} duplicated barcode(s), e.g. {list(dup[:3])}", path=path, field="obs_names")
    dup = adata.var_names[adata.var_names.duplicated()]
    if len(dup):
        raise DataError(f"{len(dup)} duplicated gene name(s), e.g. {list(dup[:3])}", path=path, field="var_names")
    if "spatial" not in adata.obsm:
        raise DataError("no spot coordinates", path=path, field='obsm["spatial"]')
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise DataError(f"expected (n_spots, 2) pixel coordinates, got shape {xy.shape}", path=path,
                        field='obsm["spatial"]')
    if not np.all(np.isfinite(xy[:, :2])):
        raise DataError("NaN or infinite coordinates", path=path, field='obsm["spatial"]')


def validate_coordinates(xy: np.ndarray, size: tuple[int, int], path: str | os.PathLike | None = None,
                         image: str | os.PathLike | None = None) -> None:
    """Raise :class:`DataError` when spot centres (N, 2) pixel (x, y) fall outside an image of ``size`` (w, h)."""
    w, h = size
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if outside.any():
        first = xy[np.argmax(outside)]
        raise DataError(
            f"{int(outside.sum())} spot centre(s) lie outside the {w} x {h} image {image} "
            f"(first at x={first[0]:.1f}, y={first[1]:.1f}); are the coordinates at full resolution?",
            path=path,
            field='obsm["spatial"]',
        )


def read_sample(root: str | os.PathLike, sample_id: str, *, validate: bool = True) -> HestSample:
    """Read one sample of a HEST-layout root.

    Args:
        root: the HEST root.
        sample_id: which sample.
        validate: check counts, barcodes and that every spot centre lies on the slide.

    Returns:
        A :class:`HestSample` whose slide opens on first use.
    """
    root = _check_root(root)
    st_path = root / "st" / f"{sample_id}.h5ad"
    if not st_path.is_file():
        known = sample_ids(root)
        hint = f"; samples here: {', '.join(known[:10])}{' ...' if len(known) > 10 else ''}" if known else ""
        raise DataError(f"sample {sample_id!r} not found (no st/{sample_id}.h5ad){hint}", path=root)
    meta_path = root / "metadata" / f"{sample_id}.json"
    meta = read_metadata(root, sample_id)
    pixel_size, source = pixel_size_from_metadata(meta, meta_path)
    try:
        adata = ad.read_h5ad(st_path)
    except Exception as exc:
        raise DataError(f"cannot read AnnData: {exc}", path=st_path) from exc
    slide_path = _find_slide(root, sample_id)
    patches_path = root / "patches" / f"{sample_id}.h5"
    sample = HestSample(sample_id, root, adata, meta, slide_path, patches_path if patches_path.is_file() else None)
    if validate:
        validate_counts(adata, st_path)
        if slide_path is not None:
            validate_coordinates(np.asarray(adata.obsm["spatial"], dtype=float), sample.slide.dimensions, st_path,
                                 slide_path)
    adata.uns["spfm"] = dict(
        sample_id=sample_id,
        pixel_size_um=pixel_size,
        pixel_size_source=source,
        technology=_meta_str(meta, "st_technology", "technology"),
        species=_meta_str(meta, "species"),
        organ=_meta_str(meta, "organ"),
        patient=_meta_str(meta, "patient"),
        slide_path=str(slide_path) if slide_path else None,
    )
    return sample


def write_sample(
    root: str | os.PathLike,
    sample_id: str,
    adata: ad.AnnData,
    image: np.ndarray | None,
    metadata: dict[str, Any],
    *,
    tile: int = 512,
    overwrite: bool = False,
) -> Path:
    """Write one sample into a HEST-layout root: ``wsis/{id}.tif`` (pyramidal), ``st/{id}.h5ad``, then
    ``metadata/{id}.json``. Each file is written atomically; the metadata comes last, so a sample whose
    metadata exists is complete.

    Args:
        root: the HEST root (created if missing).
        sample_id: the sample id (letters, digits, '_' and '-').
        adata: counts in X, ``obsm["spatial"]`` full-resolution pixel (x, y).
        image: the full-resolution (H, W, 3) uint8 H&E, or None for a sample without an image.
        metadata: HEST metadata; must hold a pixel size (``pixel_size_um_embedded`` or ``..._estimated``).
        overwrite: replace an existing sample instead of raising.
    """
    check_sample_id(sample_id)
    root = Path(root)
    meta_path = root / "metadata" / f"{sample_id}.json"
    if meta_path.exists() and not overwrite:
        raise DataError(f"sample {sample_id!r} already exists (pass overwrite=True to replace it)", path=meta_path)
    pixel_size, _ = pixel_size_from_metadata(metadata, meta_path)
    validate_counts(adata, f"<sample {sample_id}>")
    under_tissue = int(adata.obs["in_tissue"].astype(bool).sum()) if "in_tissue" in adata.obs else int(adata.n_obs)
    metadata = dict(metadata, id=sample_id, spots_under_tissue=under_tissue, nb_genes=int(adata.n_vars))
    if image is not None:
        validate_coordinates(np.asarray(adata.obsm["spatial"], dtype=float), (image.shape[1], image.shape[0]),
                             f"<sample {sample_id}>", "<image>")
        metadata.update(fullres_px_width=int(image.shape[1]), fullres_px_height=int(image.shape[0]))
        write_pyramidal_tiff(root / "wsis" / f"{sample_id}.tif", image, pixel_size, tile=tile)
    adata = adata.copy()
    adata.uns.pop("spfm", None)  # derived on read from the metadata, which is the one source of truth
    with atomic_path(root / "st" / f"{sample_id}.h5ad") as tmp:
        adata.write_h5ad(tmp)
    atomic_write_json(meta_path, metadata)
    return root
