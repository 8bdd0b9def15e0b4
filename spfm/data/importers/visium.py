"""Import a Space Ranger Visium run (its ``outs/`` folder) into a HEST-layout root.

Read from ``outs/``:

- ``filtered_feature_bc_matrix.h5``: the 10x HDF5 matrix (Cell Ranger >= 3 layout); only "Gene Expression" features
  are kept, gene symbols become ``var_names`` (made unique), Ensembl ids stay in ``var["gene_ids"]``.
- ``spatial/tissue_positions.csv`` (Space Ranger >= 2, with a header) or ``spatial/tissue_positions_list.csv``
  (no header: barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres).
- ``spatial/scalefactors_json.json``.

Which image becomes the slide:

1. ``image=`` when given: the full-resolution image Space Ranger was run on. Its size is checked against the
   scale factors and the hires image, so a downscaled image passed by mistake is caught.
2. Otherwise an image file directly in ``outs/`` or its parent (Space Ranger never writes one there, so a user
   who keeps the microscope image beside the run is the usual case) whose size matches the scale factors. Several
   matching files are ambiguous and raise; non-matching files are ignored.
3. Otherwise ``spatial/tissue_hires_image.png`` (or the lowres image), with the coordinates scaled by its scale
   factor into its pixels and the pixel size estimated at that scale. The metadata records ``image_source`` and a
   warning says that patches at 0.5 um/px will be upsampled from a ~4 um/px image.

Spots kept: in tissue and in the matrix. The pixel size (um per slide pixel) is estimated from the spot pitch,
100 um between neighbouring spot centres on Visium's hexagonal grid, unless given.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.utils import make_index_unique

from spfm.atomic import read_json_object
from spfm.data.hest import SLIDE_SUFFIXES, validate_coordinates, validate_counts, write_sample
from spfm.data.importers._common import (
    PathLike,
    check_pixel_size,
    check_target,
    image_size,
    load_image,
    pixel_size_metadata,
    preview,
    require_file,
    spot_pitch_px,
)
from spfm.errors import DataError

logger = logging.getLogger(__name__)

TECHNOLOGY = "Visium"
#: Visium: 55 um spots, 100 um centre to centre on a hexagonal grid.
INTER_SPOT_DIST_UM = 100.0
SPOT_DIAMETER_UM = 55.0
MATRIX_NAME = "filtered_feature_bc_matrix.h5"
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
#: Space Ranger's downscaled images and the scale factor that maps full-resolution pixels into each.
DOWNSCALED_IMAGES = (("tissue_hires_image.png", "tissue_hires_scalef"),
                     ("tissue_lowres_image.png", "tissue_lowres_scalef"))
#: On the hexagonal grid (odd rows use odd columns) all six neighbours are one pitch away: same row two columns
#: over, or the next row one column either side.
HEX_NEIGHBOURS = [(0, 2), (1, 1), (1, -1)]
#: How far (relative, or 2 px) a full-resolution image's size may be from the size implied by the scale factors.
SIZE_TOLERANCE = 0.01


def _strings(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def read_10x_h5(path: PathLike) -> ad.AnnData:
    """Read a 10x HDF5 feature-barcode matrix (Cell Ranger / Space Ranger >= 3 layout).

    Returns:
        barcodes x gene-expression features, counts as CSR float32; ``var`` has gene_ids, feature_types, genome
        and gene symbols (made unique) as ``var_names``.
    """
    import h5py

    path = require_file(path, "feature-barcode matrix")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"not a readable HDF5 file: {exc}", path=path) from exc
    with f:
        if "matrix" not in f:
            raise DataError("no 'matrix' group: not a 10x feature-barcode matrix from Space Ranger/Cell Ranger >= 3",
                            path=path, field="matrix")
        group = f["matrix"]
        needed = ("barcodes", "data", "indices", "indptr", "shape", "features/id", "features/name")
        for key in needed:
            if key not in group:
                raise DataError("missing dataset", path=path, field=f"matrix/{key}")
        barcodes = _strings(group["barcodes"][:])
        n_features, n_barcodes = (int(v) for v in group["shape"][:2])
        features = group["features"]
        gene_ids, names = _strings(features["id"][:]), _strings(features["name"][:])
        kinds = (_strings(features["feature_type"][:]) if "feature_type" in features
                 else np.full(n_features, "Gene Expression", dtype=object))
        genome = _strings(features["genome"][:]) if "genome" in features else np.full(n_features, "", dtype=object)
        try:
            # the file stores features x barcodes in CSC form, which is barcodes x features in CSR form
            X = sp.csr_matrix((group["data"][:], group["indices"][:], group["indptr"][:]),
                              shape=(n_barcodes, n_features))
            X.check_format(full_check=True)
        except ValueError as exc:
            raise DataError(f"inconsistent sparse matrix: {exc}", path=path, field="matrix/indptr") from exc
    if len(barcodes) != n_barcodes or not (len(gene_ids) == len(names) == len(kinds) == n_features):
        raise DataError(f"matrix/shape says {n_features} features x {n_barcodes} barcodes but the file lists "
                        f"{len(gene_ids)} features and {len(barcodes)} barcodes", path=path, field="matrix/shape")
    dup = pd.Index(barcodes)[pd.Index(barcodes).duplicated()]
    if len(dup):
        raise DataError(f"{len(dup)} duplicated barcode(s), e.g. {list(dup[:3])}", path=path,
                        field="matrix/barcodes")
    gex = kinds == "Gene Expression"
    if not gex.any():
        raise DataError(f"no 'Gene Expression' features (feature types: {sorted(set(kinds))})", path=path,
                        field="matrix/features/feature_type")
    adata = ad.AnnData(
        X=X[:, np.flatnonzero(gex)].astype(np.float32),
        obs=pd.DataFrame(index=pd.Index(barcodes.astype(str))),
        var=pd.DataFrame({"gene_ids": gene_ids[gex].astype(str),
                          "feature_types": pd.Categorical(kinds[gex].astype(str)),
                          "genome": pd.Categorical(genome[gex].astype(str))},
                         index=make_index_unique(pd.Index(names[gex].astype(str)))),
    )
    return adata


def read_tissue_positions(spatial: PathLike) -> tuple[pd.DataFrame, Path]:
    """Read ``tissue_positions.csv`` (header) or ``tissue_positions_list.csv`` (no header) from ``spatial/``.

    Returns:
        (table indexed by barcode with in_tissue, array_row, array_col (int) and pxl_row_in_fullres,
        pxl_col_in_fullres (float), the file read).
    """
    spatial = Path(spatial)
    path = next((spatial / name for name in ("tissue_positions.csv", "tissue_positions_list.csv")
                 if (spatial / name).is_file()), None)
    if path is None:
        raise DataError("spot positions not found: neither tissue_positions.csv nor tissue_positions_list.csv",
                        path=spatial)
    try:
        with open(path) as fh:
            first = fh.readline().split(",")[0].strip()
        has_header = first == "barcode"
        table = pd.read_csv(path, header=0 if has_header else None,
                            names=None if has_header else list(POSITION_COLUMNS), dtype={"barcode": str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read spot positions: {exc}", path=path) from exc
    table.columns = table.columns.astype(str).str.strip()
    for column in POSITION_COLUMNS:
        if column not in table.columns:
            raise DataError(f"missing column {column!r} (columns: {preview(table.columns)})", path=path,
                            field=column)
    out = pd.DataFrame(index=pd.Index(table["barcode"].astype(str).str.strip(), name=None))
    for column in POSITION_COLUMNS[1:]:
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(f"{int(bad.sum())} missing or non-numeric value(s), first at barcode "
                            f"{out.index[int(np.argmax(bad))]}", path=path, field=column)
        out[column] = values.astype(np.int64) if column in ("in_tissue", "array_row", "array_col") else values
    dup = out.index[out.index.duplicated()]
    if len(dup):
        raise DataError(f"{len(dup)} duplicated barcode(s), e.g. {list(dup[:3])}", path=path, field="barcode")
    return out, path


def read_scalefactors(path: PathLike) -> dict[str, Any]:
    """Read ``scalefactors_json.json``; the scale factors present must be positive numbers."""
    path = require_file(path, "scale factors")
    factors = read_json_object(path, "scale factors file")
    for key in ("tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres"):
        if key in factors:
            value = factors[key]
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise DataError(f"must be a positive number, got {value!r}", path=path, field=key)
    return factors


def _downscaled(spatial: Path, factors: dict[str, Any]) -> list[tuple[Path, str, float]]:
    """Space Ranger's downscaled images present in ``spatial/``: (path, scale factor name, scale factor)."""
    return [(spatial / name, key, float(factors[key])) for name, key in DOWNSCALED_IMAGES
            if (spatial / name).is_file() and key in factors]


def _fullres_mismatch(size: tuple[int, int], reference: tuple[Path, str, float]) -> str | None:
    """Why an image of ``size`` (w, h) cannot be the full-resolution image a downscaled ``reference`` was made
    from, or None when it can."""
    path, key, scale = reference
    ref_w, ref_h = image_size(path)
    for full, ref in ((size[0], ref_w), (size[1], ref_h)):
        if abs(full * scale - ref) > max(2.0, SIZE_TOLERANCE * ref):
            return (f"the image is {size[0]} x {size[1]} px, but {path.name} ({ref_w} x {ref_h} px) at {key} "
                    f"{scale:g} implies a full-resolution image of about {ref_w / scale:.0f} x {ref_h / scale:.0f} px")
    return None


def _find_fullres_image(outs: Path, reference: tuple[Path, str, float] | None) -> Path | None:
    """An image file directly in ``outs`` or its parent whose size fits the scale factors; None when there is none
    (or no downscaled image to check candidates against: an unchecked guess could pair spots with the wrong image).

    Raises :class:`DataError` when several fit (pass ``image=``).
    """
    if reference is None:
        return None
    candidates = []
    for folder in (outs, outs.parent):
        try:
            entries = sorted(folder.iterdir())
        except OSError:  # an unreadable parent folder simply has no candidates
            continue
        for path in entries:
            if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(SLIDE_SUFFIXES):
                try:
                    size = image_size(path)
                except DataError:
                    continue  # not an image we can read: not a candidate
                reason = _fullres_mismatch(size, reference)
                if reason is None:
                    candidates.append(path)
                else:
                    logger.info("not using %s as the full-resolution image: %s", path, reason)
    if len(candidates) > 1:
        raise DataError(f"several images could be the full-resolution image: {', '.join(map(str, candidates))}; "
                        "pass image=", path=outs, field="image")
    return candidates[0] if candidates else None


def import_visium(
    outs: PathLike,
    sample_id: str,
    out: PathLike,
    *,
    image: PathLike | None = None,
    organ: str | None = None,
    species: str | None = None,
    patient: str | None = None,
    pixel_size_um: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Import a Space Ranger ``outs/`` folder into the HEST root ``out``.

    Writes ``wsis/{id}.tif`` (pyramidal), ``st/{id}.h5ad`` (in-tissue spots of the matrix x genes, raw counts in
    ``X`` as CSR float32; ``obs`` array_row, array_col and the Space Ranger full-resolution pixel coordinates
    pxl_row_in_fullres, pxl_col_in_fullres; ``obsm["spatial"]`` (N, 2) = pixel (x, y) on the slide written) and
    ``metadata/{id}.json`` (technology, organ, species, patient, pixel size and how it was obtained,
    ``image_source`` and ``image_scale``, scale factors, spots dropped, source file names).

    Args:
        outs: the Space Ranger ``outs/`` folder.
        sample_id: id in the HEST root (letters, digits, '_' and '-').
        out: the HEST root (created if missing).
        image: the full-resolution image Space Ranger was run on. Without it an image beside the run is used
            when exactly one fits the scale factors, else ``spatial/tissue_hires_image.png`` (with a warning).
        organ, species, patient: recorded in the metadata.
        pixel_size_um: micrometres per full-resolution pixel, if known (divided by the scale factor when a
            downscaled image becomes the slide); otherwise estimated from the spot pitch.
        overwrite: replace an existing sample of this id.

    Returns:
        The HEST root.
    """
    out = check_target(out, sample_id, overwrite)
    given = check_pixel_size(pixel_size_um)
    outs = Path(outs)
    if not outs.is_dir():
        raise DataError("Space Ranger outs/ folder not found", path=outs)
    spatial = outs / "spatial"
    matrix_path = outs / MATRIX_NAME
    adata = read_10x_h5(matrix_path)
    positions, positions_path = read_tissue_positions(spatial)
    factors_path = spatial / "scalefactors_json.json"
    factors = read_scalefactors(factors_path)
    downscaled = _downscaled(spatial, factors)
    reference = downscaled[0] if downscaled else None

    in_tissue = positions.index[positions["in_tissue"].to_numpy() == 1]
    kept = adata.obs_names[adata.obs_names.isin(in_tissue)]
    if len(kept) == 0:
        raise DataError(f"none of the {adata.n_obs} matrix barcodes (e.g. {list(adata.obs_names[:3])}) is an "
                        f"in-tissue spot here; do {MATRIX_NAME} and the positions belong to the same run?",
                        path=positions_path, field="barcode")
    dropped = {
        "matrix_without_position": int((~adata.obs_names.isin(positions.index)).sum()),
        "matrix_not_in_tissue": int((adata.obs_names.isin(positions.index) & ~adata.obs_names.isin(in_tissue)).sum()),
    }
    if dropped["matrix_without_position"]:
        warnings.warn(f"{dropped['matrix_without_position']} barcode(s) of {matrix_path} have no row in "
                      f"{positions_path} and are dropped", stacklevel=2)
    adata = adata[kept].copy()
    pos = positions.loc[kept]
    full_xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)

    if image is not None:
        image = require_file(image, "full-resolution image")
        reason = None if reference is None else _fullres_mismatch(image_size(image), reference)
        if reason is not None:
            raise DataError(f"{reason}; pass the full-resolution image Space Ranger was run on", path=image,
                            field="image size")
    else:
        image = _find_fullres_image(outs, reference)
    if image is not None:
        scale, image_source = 1.0, "full-resolution image"
    elif reference is not None:
        image, key, scale = reference
        image_source = f"spatial/{image.name} (full-resolution coordinates scaled by {key})"
    else:
        raise DataError("no image: pass image= (the full-resolution image Space Ranger was run on); spatial/ holds "
                        "no tissue_hires_image.png or tissue_lowres_image.png with its scale factor either",
                        path=outs, field="image")
    xy = full_xy * scale
    size = image_size(image)
    validate_coordinates(xy, size, positions_path, image)
    # the positions list every spot of the capture area (in tissue or not) on the same image: all measure the pitch
    pitch, pairs = spot_pitch_px(positions[["array_row", "array_col"]].to_numpy(),
                                 positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy() * scale,
                                 HEX_NEIGHBOURS)
    pixel_meta = pixel_size_metadata(pitch, pairs, INTER_SPOT_DIST_UM, None if given is None else given / scale,
                                     positions_path)

    adata.obs = pd.DataFrame(
        {column: pos[column].to_numpy() for column in ("array_row", "array_col", "pxl_row_in_fullres",
                                                        "pxl_col_in_fullres")},
        index=adata.obs_names,
    )
    adata.obsm["spatial"] = xy
    validate_counts(adata, matrix_path)
    metadata = dict(
        st_technology=TECHNOLOGY,
        organ=organ,
        species=species,
        patient=patient,
        inter_spot_dist=INTER_SPOT_DIST_UM,
        spot_diameter=SPOT_DIAMETER_UM,
        **pixel_meta,
        image_source=image_source,
        image_scale=scale,
        spot_diameter_fullres=factors.get("spot_diameter_fullres"),
        tissue_hires_scalef=factors.get("tissue_hires_scalef"),
        tissue_lowres_scalef=factors.get("tissue_lowres_scalef"),
        spots_dropped=dropped,
        source_files={"matrix": matrix_path.name, "positions": positions_path.name,
                      "scalefactors": factors_path.name, "image": Path(image).name},
    )
    logger.info("%s: %d spots kept, slide %s (scale %g)", sample_id, len(kept), image, scale)
    if scale != 1.0:  # warned only once the input has passed every check
        slide_um = pixel_meta.get("pixel_size_um_embedded", pixel_meta.get("pixel_size_um_estimated"))
        warnings.warn(
            f"no full-resolution image given or found beside {outs}: the slide of {sample_id!r} is {image} "
            f"({size[0]} x {size[1]} px, ~{slide_um:.2f} um/px) with the spot coordinates scaled by {scale:g}; "
            "patches at 0.5 um/px will be upsampled from it. Pass image= for full resolution.",
            stacklevel=2,
        )
    return write_sample(out, sample_id, adata, load_image(image), metadata, overwrite=overwrite)
