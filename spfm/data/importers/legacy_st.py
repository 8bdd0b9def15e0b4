"""Import a legacy Spatial Transcriptomics section (Stahl et al. 2016; e.g. HER2ST) into a HEST-layout root.

Inputs, as the ST pipeline and the ST spot detector write them:

- counts: TSV (optionally gzipped), spots x genes, spot ids ``XxY`` (array x and y) in the first column and gene
  names in the header row. A genes x spots table is transposed when its header, not its first column, holds the ids.
- spot selection: TSV with columns ``x``, ``y`` (integer array coordinates), ``pixel_x``, ``pixel_y`` (spot centre
  in full-resolution image pixels) and optionally ``selected`` (1 = under tissue).
- the full-resolution H&E image (JPEG, PNG or TIFF).

Spots are joined on ``{x}x{y}``; selected spots present in both tables are kept. The images carry no pixel size, so
it is estimated from the spot pitch (200 um centre to centre) unless given.
"""

from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.utils import make_index_unique

from spfm.data.hest import validate_coordinates, validate_counts, write_sample
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

TECHNOLOGY = "Spatial Transcriptomics"
#: Legacy ST arrays: 100 um spots, 200 um centre to centre on a square grid.
INTER_SPOT_DIST_UM = 200.0
SPOT_DIAMETER_UM = 100.0
SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")
_SPOT_ID = re.compile(r"^\d+x\d+$")


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def read_counts(path: PathLike) -> pd.DataFrame:
    """Read a legacy ST counts table as a spots x genes float32 DataFrame indexed by ``XxY`` spot id.

    Gene names are kept exactly as in the header (duplicates included; the caller makes them unique).
    """
    path = require_file(path, "counts table")
    try:
        with _open_text(path) as fh:
            header = fh.readline().rstrip("\r\n").split("\t")
        table = pd.read_csv(path, sep="\t", header=None, skiprows=1, index_col=0)
    except (OSError, UnicodeDecodeError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read the counts table: {exc}", path=path) from exc
    if table.shape[1] == len(header) - 1:
        genes = header[1:]  # the header names the id column too (often with an empty name)
    elif table.shape[1] == len(header):
        genes = header  # R's write.table: no name over the row names
    else:
        raise DataError(f"the header has {len(header)} fields but the rows have {table.shape[1] + 1}", path=path,
                        field="header")
    table.columns = genes
    text = [name for name, dtype in table.dtypes.items() if not pd.api.types.is_numeric_dtype(dtype)]
    if text:
        raise DataError(f"non-numeric count values in {len(text)} column(s), e.g. {text[:3]}", path=path,
                        field="counts")
    table.index = table.index.astype(str).str.strip()
    table.columns = table.columns.astype(str).str.strip()
    rows_are_spots = table.index.str.match(_SPOT_ID).mean() if len(table) else 0.0
    cols_are_spots = table.columns.str.match(_SPOT_ID).mean() if len(genes) else 0.0
    if rows_are_spots < 0.5 and cols_are_spots >= 0.5:
        table = table.T  # genes x spots
    elif rows_are_spots < 0.5:
        example = table.index[0] if len(table) else "<no rows>"
        raise DataError(f"expected spot ids of the form XxY (e.g. 10x14) in the first column, found {example!r}",
                        path=path, field="spot id")
    counts = table.astype(np.float32).rename_axis(index=None, columns=None)
    dup = counts.index[counts.index.duplicated()]
    if len(dup):
        raise DataError(f"{len(dup)} duplicated spot id(s), e.g. {list(dup[:3])}", path=path, field="spot id")
    return counts


def read_spot_selection(path: PathLike) -> pd.DataFrame:
    """Read a spot selection TSV, indexed by ``{x}x{y}``.

    Returns columns x, y (int), pixel_x, pixel_y (float) and selected (bool; all True without that column).
    """
    path = require_file(path, "spot selection table")
    try:
        spots = pd.read_csv(path, sep="\t")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read the spot selection table: {exc}", path=path) from exc
    spots.columns = spots.columns.astype(str).str.strip()
    for column in SPOT_COLUMNS:
        if column not in spots.columns:
            raise DataError(f"missing column {column!r} (columns: {preview(spots.columns)})", path=path,
                            field=column)
    out = pd.DataFrame(index=spots.index)
    for column in SPOT_COLUMNS:
        values = pd.to_numeric(spots[column], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(f"{int(bad.sum())} missing or non-numeric value(s), first in data row "
                            f"{int(np.argmax(bad)) + 1}", path=path, field=column)
        if column in ("x", "y"):
            if np.any(values != np.round(values)):
                raise DataError("array coordinates must be integers", path=path, field=column)
            values = values.astype(np.int64)
        out[column] = values
    if "selected" in spots.columns:
        out["selected"] = pd.to_numeric(spots["selected"], errors="coerce").fillna(0).to_numpy() != 0
    else:
        out["selected"] = True
    out.index = pd.Index([f"{x}x{y}" for x, y in zip(out["x"], out["y"])], name="spot")
    dup = out.index[out.index.duplicated()]
    if len(dup):
        raise DataError(f"{len(dup)} spot(s) listed twice, e.g. {list(dup[:3])}", path=path, field="x, y")
    return out


def import_legacy_st(
    counts: PathLike,
    spots: PathLike,
    image: PathLike,
    sample_id: str,
    out: PathLike,
    *,
    organ: str | None = None,
    species: str | None = None,
    patient: str | None = None,
    pixel_size_um: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Import one legacy ST section into the HEST root ``out``.

    Writes ``wsis/{id}.tif`` (pyramidal), ``st/{id}.h5ad`` (selected spots in both tables x genes, raw counts in
    ``X`` as CSR float32; ``obs`` array_row = y, array_col = x; ``obsm["spatial"]`` (N, 2) = (pixel_x, pixel_y))
    and ``metadata/{id}.json`` (technology, organ, species, patient, pixel size and how it was obtained, spot
    counts dropped by the join, source file names).

    Args:
        counts: counts TSV(.gz), spots x genes, ``XxY`` spot ids in the first column.
        spots: spot selection TSV with x, y, pixel_x, pixel_y and optionally selected.
        image: the full-resolution H&E image the pixel coordinates refer to.
        sample_id: id in the HEST root (letters, digits, '_' and '-').
        out: the HEST root (created if missing).
        organ, species, patient: recorded in the metadata.
        pixel_size_um: micrometres per image pixel, if known; otherwise estimated from the spot pitch.
        overwrite: replace an existing sample of this id.

    Returns:
        The HEST root.
    """
    out = check_target(out, sample_id, overwrite)
    given = check_pixel_size(pixel_size_um)
    image = require_file(image, "H&E image")
    table = read_counts(counts)
    counts_path, spots_path = Path(counts), Path(spots)
    all_spots = read_spot_selection(spots_path)
    selection = all_spots[all_spots["selected"].to_numpy()]

    kept = selection.index[selection.index.isin(table.index)]
    if len(kept) == 0:
        raise DataError(
            f"no spot of the selection ({len(selection)} selected, e.g. {list(selection.index[:3])}) is in the "
            f"counts table ({len(table)} spots, e.g. {list(table.index[:3])}); do the two files belong together?",
            path=spots_path,
            field="x, y",
        )
    dropped = {
        "selected_without_counts": int(len(selection) - len(kept)),
        "counts_not_selected": int((~table.index.isin(selection.index)).sum()),
    }
    logger.info("%s: %d spots kept; %d selected spots have no counts, %d counted spots are not selected",
                sample_id, len(kept), dropped["selected_without_counts"], dropped["counts_not_selected"])
    selection = selection.loc[kept]
    xy = selection[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    validate_coordinates(xy, image_size(image), spots_path, image)

    adata = ad.AnnData(
        X=sp.csr_matrix(table.loc[kept].to_numpy()),
        obs=pd.DataFrame({"array_row": selection["y"].to_numpy(), "array_col": selection["x"].to_numpy()},
                         index=kept.astype(str).rename(None)),
        var=pd.DataFrame(index=make_index_unique(table.columns)),  # some legacy tables repeat a gene symbol
    )
    adata.obsm["spatial"] = xy
    validate_counts(adata, counts_path)

    # every listed spot (selected or not) sits on the same grid of the same image, so all of them measure the
    # pitch; legacy ST y is the array row, x the column; neighbours are one step apart on either axis
    pitch, pairs = spot_pitch_px(all_spots[["y", "x"]].to_numpy(), all_spots[["pixel_x", "pixel_y"]].to_numpy(),
                                 [(0, 1), (1, 0)])
    metadata = dict(
        st_technology=TECHNOLOGY,
        organ=organ,
        species=species,
        patient=patient,
        inter_spot_dist=INTER_SPOT_DIST_UM,
        spot_diameter=SPOT_DIAMETER_UM,
        **pixel_size_metadata(pitch, pairs, INTER_SPOT_DIST_UM, given, spots_path),
        image_source="full-resolution image",
        spots_dropped=dropped,
        source_files={"counts": counts_path.name, "spots": spots_path.name, "image": image.name},
    )
    return write_sample(out, sample_id, adata, load_image(image), metadata, overwrite=overwrite)
