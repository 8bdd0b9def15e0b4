"""Importers into the HEST layout: legacy ST and Space Ranger Visium, on tiny inputs made here and on real data."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from spfm.data.hest import read_sample
from spfm.data.importers import import_legacy_st, import_visium
from spfm.data.patches import PatchConfig, iter_patches
from spfm.errors import DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HER2ST = DATA / "her2st"
VISIUM_TINY = DATA / "visium_tiny"

TISSUE = (225, 170, 200)  # pink background: counts as tissue for the patch mask
MARKER = (50, 20, 90)  # dark purple square drawn on every spot centre
MARKER_HALF = 3  # the square spans centre +- 3 px


def _draw(size: tuple[int, int], centres: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 tissue-coloured image with a dark 7 x 7 square centred on each integer (x, y) centre."""
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = TISSUE
    for x, y in np.round(centres).astype(int):
        img[y - MARKER_HALF : y + MARKER_HALF + 1, x - MARKER_HALF : x + MARKER_HALF + 1] = MARKER
    return img


def _marker_centroid(patch: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of the dark marker pixels of a patch."""
    dark = patch.astype(int).sum(axis=2) < 350
    ys, xs = np.nonzero(dark)
    assert len(xs), "no marker in the patch"
    return float(xs.mean()), float(ys.mean())


@pytest.fixture
def read():
    """read_sample, with every sample's slide closed at the end of the test."""
    opened = []

    def _read(root: Path, sample_id: str):
        sample = read_sample(root, sample_id)
        opened.append(sample)
        return sample

    yield _read
    for sample in opened:
        sample.close()


def _raises(call, name: str, field: str | None) -> DataError:
    """Run ``call``, expect one DataError whose message names the file ``name`` and the ``field``."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert name in message, message
    if field is not None:
        assert field in message, message
    return info.value


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under a HEST root (temporary files included), to prove nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# legacy ST, tiny inputs

PITCH_ST = 40  # px between array neighbours -> 200 um / 40 px = 5 um/px


class LegacyInputs:
    """A tiny legacy ST section: 6 x 5 array, spot 6x5 not selected, spot 1x1 selected but without counts."""

    def __init__(self, folder: Path, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        folder.mkdir(parents=True, exist_ok=True)
        xs, ys = np.meshgrid(np.arange(1, 7), np.arange(1, 6))
        self.spots = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel()})
        self.spots["new_x"] = self.spots["x"] + 0.01
        self.spots["new_y"] = self.spots["y"] - 0.02
        self.spots["pixel_x"] = 30.0 + (self.spots["x"] - 1) * PITCH_ST
        self.spots["pixel_y"] = 30.0 + (self.spots["y"] - 1) * PITCH_ST
        self.spots["selected"] = 1
        ids = [f"{x}x{y}" for x, y in zip(self.spots["x"], self.spots["y"])]
        self.spots.loc[ids.index("6x5"), "selected"] = 0
        counted = [i for i in ids if i != "1x1"]
        self.counts = pd.DataFrame(rng.poisson(3.0, (len(counted), 8)).astype(np.int64), index=counted,
                                   columns=[f"G{g}" for g in range(8)])
        self.kept = [i for i in ids if i not in ("1x1", "6x5")]
        self.size = (260, 220)
        self.counts_path = folder / "section.tsv.gz"
        self.spots_path = folder / "section_selection.tsv"
        self.image_path = folder / "section.jpg"
        self.write()
        Image.fromarray(_draw(self.size, self.spots[["pixel_x", "pixel_y"]].to_numpy())).save(
            self.image_path, quality=95)

    def write(self) -> None:
        self.counts.to_csv(self.counts_path, sep="\t")
        self.spots.to_csv(self.spots_path, sep="\t", index=False)

    def run(self, out: Path, sample_id: str = "S1", **kwargs) -> Path:
        return import_legacy_st(self.counts_path, self.spots_path, self.image_path, sample_id, out, **kwargs)


@pytest.fixture
def legacy(tmp_path: Path) -> LegacyInputs:
    return LegacyInputs(tmp_path / "in")


def test_legacy_st_round_trip(read, legacy: LegacyInputs, tmp_path: Path) -> None:
    root = legacy.run(tmp_path / "hest", organ="Breast", species="Homo sapiens", patient="P1")
    sample = read(root, "S1")
    a = sample.adata
    assert list(a.obs_names) == legacy.kept  # selection order, joined with the counts
    spots = legacy.spots.set_index(legacy.spots["x"].astype(str) + "x" + legacy.spots["y"].astype(str)).loc[legacy.kept]
    np.testing.assert_array_equal(a.obs["array_row"], spots["y"])
    np.testing.assert_array_equal(a.obs["array_col"], spots["x"])
    np.testing.assert_allclose(a.obsm["spatial"], spots[["pixel_x", "pixel_y"]].to_numpy())
    np.testing.assert_array_equal(a.X.toarray(), legacy.counts.loc[legacy.kept].to_numpy())
    assert list(a.var_names) == list(legacy.counts.columns)
    meta = sample.metadata
    assert meta["pixel_size_um_estimated"] == pytest.approx(200.0 / PITCH_ST)
    assert "pixel_size_um_embedded" not in meta
    assert "spot pitch" in meta["pixel_size_estimation"] and "200 um" in meta["pixel_size_estimation"]
    assert a.uns["spfm"]["pixel_size_source"] == "estimated"
    assert (meta["st_technology"], meta["inter_spot_dist"], meta["spot_diameter"]) == ("Spatial Transcriptomics",
                                                                                      200, 100)
    assert (meta["organ"], meta["species"], meta["patient"]) == ("Breast", "Homo sapiens", "P1")
    assert meta["spots_dropped"] == {"selected_without_counts": 1, "counts_not_selected": 1}
    assert meta["source_files"] == {"counts": "section.tsv.gz", "spots": "section_selection.tsv",
                                    "image": "section.jpg"}
    assert sample.slide.dimensions == legacy.size
    assert sample.slide.mpp == pytest.approx(5.0, rel=1e-3)  # the TIFF carries the estimate for other readers


def test_legacy_st_patch_is_centred_on_its_spot(read, legacy: LegacyInputs, tmp_path: Path) -> None:
    sample = read(legacy.run(tmp_path / "hest"), "S1")
    config = PatchConfig(size_px=24, pixel_size_um=sample.pixel_size_um, min_tissue_fraction=0.0)
    patches = list(iter_patches(sample, config))
    assert len(patches) == sample.adata.n_obs
    for patch in patches:
        cx, cy = _marker_centroid(patch.image)
        assert abs(cx - 12) <= 0.5 and abs(cy - 12) <= 0.5, (patch.barcode, cx, cy)


def test_legacy_st_given_pixel_size_is_recorded_as_embedded(read, legacy: LegacyInputs, tmp_path: Path) -> None:
    root = legacy.run(tmp_path / "hest", pixel_size_um=4.9)
    sample = read(root, "S1")
    assert sample.metadata["pixel_size_um_embedded"] == 4.9
    assert sample.metadata["pixel_size_um_estimated"] == pytest.approx(5.0)  # still recorded, for comparison
    assert sample.pixel_size_um == 4.9 and sample.adata.uns["spfm"]["pixel_size_source"] == "embedded"
    with pytest.warns(UserWarning, match="differs from the spot-pitch estimate"):
        legacy.run(tmp_path / "hest", "S2", pixel_size_um=10.0)


@pytest.mark.parametrize("layout", ["r_style_header", "genes_by_spots", "duplicate_genes"])
def test_legacy_st_counts_layouts(read, legacy: LegacyInputs, tmp_path: Path, layout: str) -> None:
    table = legacy.counts
    if layout == "r_style_header":  # no name over the row names: the header is one field short
        lines = ["\t".join(table.columns)] + [f"{i}\t" + "\t".join(map(str, row)) for i, row in
                                              zip(table.index, table.to_numpy())]
        legacy.counts_path = legacy.counts_path.with_name("r.tsv")
        legacy.counts_path.write_text("\n".join(lines) + "\n")
    elif layout == "genes_by_spots":
        table.T.to_csv(legacy.counts_path, sep="\t")
    else:
        table.columns = ["G0", "G1", "G1", "G3", "G4", "G5", "G6", "G1"]
        legacy.write()
    a = read(legacy.run(tmp_path / "hest"), "S1").adata
    np.testing.assert_array_equal(a.X.toarray(), table.loc[legacy.kept].to_numpy())
    assert a.var_names.is_unique
    if layout == "duplicate_genes":
        assert list(a.var_names) == ["G0", "G1", "G1-1", "G3", "G4", "G5", "G6", "G1-2"]


def _break_legacy(legacy: LegacyInputs, case: str) -> tuple[dict, str, str | None]:
    """Damage one input; return (import kwargs, file named in the error, field named in the error)."""
    spots, counts = legacy.spots, legacy.counts
    kwargs: dict = {}
    if case == "missing_counts":
        legacy.counts_path.unlink()
        return kwargs, legacy.counts_path.name, None
    if case == "missing_spots":
        legacy.spots_path.unlink()
        return kwargs, legacy.spots_path.name, None
    if case == "missing_image":
        legacy.image_path.unlink()
        return kwargs, legacy.image_path.name, None
    if case == "missing_column":
        legacy.spots = spots.drop(columns="pixel_y")
        field = "pixel_y"
    elif case == "no_overlap":
        counts.index = [f"{i}0" for i in counts.index]  # 2x3 -> 2x30: ids that the selection does not have
        name, field = legacy.spots_path.name, "x, y"
        legacy.write()
        return kwargs, name, field
    elif case == "outside_image":
        spots.loc[3, "pixel_x"] = legacy.size[0] + 5.0
        field = 'obsm["spatial"]'
    elif case == "missing_pixel_value":
        spots.loc[4, "pixel_x"] = np.nan
        field = "pixel_x"
    elif case == "non_integer_array":
        spots["x"] = spots["x"].astype(float)
        spots.loc[2, "x"] = 3.5
        field = "x"
    elif case == "duplicate_spot_rows":
        legacy.spots = pd.concat([spots, spots.iloc[[5]]], ignore_index=True)
        field = "x, y"
    elif case in ("nan_count", "negative_count", "duplicate_count_ids", "text_count"):
        if case == "nan_count":
            legacy.counts = counts.astype(float)
            legacy.counts.iloc[2, 3] = np.nan
            field = "X"
        elif case == "negative_count":
            counts.iloc[2, 3] = -1
            field = "X"
        elif case == "duplicate_count_ids":
            legacy.counts = pd.concat([counts, counts.iloc[[4]]])
            field = "spot id"
        else:
            legacy.counts = counts.astype(object)
            legacy.counts.iloc[1, 1] = "many"
            field = "counts"
        legacy.write()
        return kwargs, legacy.counts_path.name, field
    elif case == "pixel_size_zero":
        return {"pixel_size_um": 0.0}, "pixel_size_um", "pixel_size_um"
    elif case == "pixel_size_negative":
        return {"pixel_size_um": -0.5}, "pixel_size_um", "pixel_size_um"
    elif case == "sample_id_with_dot":
        return {"sample_id": "S1.v2"}, "S1.v2", "sample_id"
    else:
        raise AssertionError(case)
    legacy.write()
    return kwargs, legacy.spots_path.name, field


LEGACY_BAD = ["missing_counts", "missing_spots", "missing_image", "missing_column", "no_overlap", "outside_image",
              "missing_pixel_value", "non_integer_array", "duplicate_spot_rows", "nan_count", "negative_count",
              "duplicate_count_ids", "text_count", "pixel_size_zero", "pixel_size_negative", "sample_id_with_dot"]


@pytest.mark.parametrize("case", LEGACY_BAD)
def test_legacy_st_bad_input_names_file_and_field_and_keeps_existing_sample(read, legacy: LegacyInputs,
                                                                            tmp_path: Path, case: str) -> None:
    root = tmp_path / "hest"
    legacy.run(root, "S1")
    before = _snapshot(root)
    kwargs, name, field = _break_legacy(legacy, case)
    sample_id = kwargs.pop("sample_id", "S1")
    _raises(lambda: legacy.run(root, sample_id, overwrite=True, **kwargs), name, field)
    assert _snapshot(root) == before  # nothing replaced, no temporary left behind
    assert read(root, "S1").adata.n_obs == len(legacy.kept)


def test_legacy_st_existing_sample_needs_overwrite(read, legacy: LegacyInputs, tmp_path: Path) -> None:
    root = legacy.run(tmp_path / "hest")
    before = _snapshot(root)
    _raises(lambda: legacy.run(root), "S1.json", None)
    assert _snapshot(root) == before
    first = read(root, "S1").adata.X.sum()
    legacy.counts = legacy.counts * 2
    legacy.write()
    legacy.run(root, overwrite=True)
    assert read(root, "S1").adata.X.sum() == 2 * first


# ---------------------------------------------------------------------------------------------------------------
# Visium, tiny Space Ranger folder

PITCH_VISIUM = 30  # full-resolution px between neighbouring spots -> 100 um / 30 px
HIRES_SCALE = 0.5
GENES = ["A", "B", "C", "C", "D", "E"]


class VisiumOuts:
    """A tiny Space Ranger run: hexagonal 6 x 12 grid (36 spots), row 0 outside the tissue; the matrix holds the 30
    in-tissue barcodes and 2 outside; 6 genes (symbol C twice) and one antibody feature; full-res image kept apart."""

    def __init__(self, root: Path, *, header: bool = True, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.outs = root / "run" / "outs"
        spatial = self.outs / "spatial"
        spatial.mkdir(parents=True)
        rows, cols = zip(*[(r, c) for r in range(6) for c in range(12) if (r + c) % 2 == 0])
        rows, cols = np.array(rows), np.array(cols)
        n = len(rows)
        self.positions = pd.DataFrame({
            "barcode": [f"{''.join(rng.choice(list('ACGT'), 12))}-1" for _ in range(n)],
            "in_tissue": (rows > 0).astype(int),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": np.round(30 + rows * PITCH_VISIUM * math.sqrt(3) / 2).astype(int),
            "pxl_col_in_fullres": 30 + cols * PITCH_VISIUM // 2,
        })
        self.header = header
        in_matrix = np.flatnonzero(rows > 0).tolist() + [0, 1]  # two spots outside the tissue too
        rng.shuffle(in_matrix)
        self.barcodes = self.positions["barcode"].to_numpy()[in_matrix]
        self.kept = [b for b, i in zip(self.barcodes, in_matrix) if rows[i] > 0]
        self.counts = rng.poisson(2.0, (len(self.barcodes), len(GENES) + 1)).astype(np.int32)
        self.matrix_path = self.outs / "filtered_feature_bc_matrix.h5"
        self.write_matrix()
        self.write_positions()
        self.factors = {"tissue_hires_scalef": HIRES_SCALE, "tissue_lowres_scalef": 0.25,
                        "spot_diameter_fullres": 55 / 100 * PITCH_VISIUM, "fiducial_diameter_fullres": 27.0}
        self.write_factors()
        self.size = (240, 200)
        full = _draw(self.size, self.positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
        (root / "images").mkdir()
        self.image_path = root / "images" / "fullres.jpg"
        Image.fromarray(full).save(self.image_path, quality=95)
        self.hires_size = (round(self.size[0] * HIRES_SCALE), round(self.size[1] * HIRES_SCALE))
        Image.fromarray(full).resize(self.hires_size, Image.Resampling.BOX).save(spatial / "tissue_hires_image.png")

    def write_matrix(self, data: np.ndarray | None = None, barcodes: np.ndarray | None = None) -> None:
        counts = self.counts if data is None else data
        barcodes = self.barcodes if barcodes is None else barcodes
        csc = sp.csc_matrix(counts.T)  # features x barcodes, as 10x stores it
        with h5py.File(self.matrix_path, "w") as f:
            m = f.create_group("matrix")
            m["barcodes"] = np.array([b.encode() for b in barcodes], dtype="S")
            m["data"], m["indices"], m["indptr"] = csc.data, csc.indices, csc.indptr
            m["shape"] = np.array(csc.shape, dtype=np.int32)
            feats = m.create_group("features")
            feats["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(GENES))] + [b"CD3_TotalSeqB"])
            feats["name"] = np.array([g.encode() for g in GENES] + [b"CD3"])
            feats["feature_type"] = np.array([b"Gene Expression"] * len(GENES) + [b"Antibody Capture"])
            feats["genome"] = np.array([b"GRCh38"] * (len(GENES) + 1))
            feats["_all_tag_keys"] = np.array([b"genome"])

    def write_positions(self) -> None:
        for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
            (self.outs / "spatial" / name).unlink(missing_ok=True)
        if self.header:
            self.positions.to_csv(self.outs / "spatial" / "tissue_positions.csv", index=False)
        else:
            self.positions.to_csv(self.outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)

    @property
    def positions_path(self) -> Path:
        name = "tissue_positions.csv" if self.header else "tissue_positions_list.csv"
        return self.outs / "spatial" / name

    def write_factors(self) -> None:
        (self.outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(self.factors))

    def run(self, out: Path, sample_id: str = "V1", **kwargs) -> Path:
        return import_visium(self.outs, sample_id, out, **kwargs)


@pytest.fixture
def visium(tmp_path: Path) -> VisiumOuts:
    return VisiumOuts(tmp_path / "in")


@pytest.mark.parametrize("header", [True, False], ids=["tissue_positions", "tissue_positions_list"])
def test_visium_round_trip_with_full_resolution_image(read, tmp_path: Path, header: bool) -> None:
    visium = VisiumOuts(tmp_path / "in", header=header)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full-resolution import has nothing to warn about
        root = visium.run(tmp_path / "hest", image=visium.image_path, species="Homo sapiens")
    sample = read(root, "V1")
    a = sample.adata
    assert sorted(a.obs_names) == sorted(visium.kept)
    pos = visium.positions.set_index("barcode").loc[a.obs_names]
    np.testing.assert_array_equal(a.obsm["spatial"], pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    np.testing.assert_array_equal(a.obs["array_row"], pos["array_row"])
    row_of = {b: i for i, b in enumerate(visium.barcodes)}
    expected = visium.counts[[row_of[b] for b in a.obs_names]][:, : len(GENES)]  # antibody feature dropped
    np.testing.assert_array_equal(a.X.toarray(), expected)
    assert list(a.var_names) == ["A", "B", "C", "C-1", "D", "E"]
    assert list(a.var["gene_ids"]) == [f"ENSG{i:05d}" for i in range(len(GENES))]
    meta = sample.metadata
    assert meta["pixel_size_um_estimated"] == pytest.approx(100 / PITCH_VISIUM, rel=0.02)
    assert "100 um" in meta["pixel_size_estimation"]
    assert (meta["st_technology"], meta["inter_spot_dist"], meta["spot_diameter"]) == ("Visium", 100, 55)
    assert meta["image_source"] == "full-resolution image" and meta["image_scale"] == 1.0
    assert meta["spots_dropped"] == {"matrix_without_position": 0, "matrix_not_in_tissue": 2}
    assert meta["species"] == "Homo sapiens" and meta["patient"] is None
    assert sample.slide.dimensions == visium.size
    config = PatchConfig(size_px=20, pixel_size_um=sample.pixel_size_um, min_tissue_fraction=0.0)
    for patch in iter_patches(sample, config):
        cx, cy = _marker_centroid(patch.image)
        assert abs(cx - 10) <= 0.5 and abs(cy - 10) <= 0.5, (patch.barcode, cx, cy)


def test_visium_without_full_resolution_image_uses_hires(read, visium: VisiumOuts, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="tissue_hires_image.png"):
        root = visium.run(tmp_path / "hest")
    sample = read(root, "V1")
    pos = visium.positions.set_index("barcode").loc[sample.adata.obs_names]
    full = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    np.testing.assert_allclose(sample.adata.obsm["spatial"], full * HIRES_SCALE)
    np.testing.assert_array_equal(sample.adata.obs["pxl_col_in_fullres"], pos["pxl_col_in_fullres"])
    assert sample.slide.dimensions == visium.hires_size
    meta = sample.metadata
    assert "tissue_hires_image.png" in meta["image_source"] and meta["image_scale"] == HIRES_SCALE
    assert meta["pixel_size_um_estimated"] == pytest.approx(100 / (PITCH_VISIUM * HIRES_SCALE), rel=0.02)
    # a user-given size is per full-resolution pixel, converted to the hires slide
    with pytest.warns(UserWarning, match="tissue_hires_image.png"):
        visium.run(tmp_path / "hest", "V2", pixel_size_um=3.3)
    assert read(root, "V2").pixel_size_um == pytest.approx(3.3 / HIRES_SCALE)


def test_visium_finds_the_full_resolution_image_beside_the_run(read, visium: VisiumOuts, tmp_path: Path) -> None:
    run = visium.outs.parent
    shutil.copy(visium.image_path, run / "microscope.jpg")
    Image.new("RGB", (64, 64), "white").save(run / "qc_plot.png")  # wrong size for the scale factors: ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root = visium.run(tmp_path / "hest")
    sample = read(root, "V1")
    assert sample.slide.dimensions == visium.size
    assert sample.metadata["source_files"]["image"] == "microscope.jpg"
    shutil.copy(visium.image_path, visium.outs / "another.jpg")  # two that fit: ambiguous
    _raises(lambda: visium.run(tmp_path / "hest", "V2"), "outs", "image")


def test_visium_rejects_an_image_that_does_not_fit_the_scale_factors(visium: VisiumOuts, tmp_path: Path) -> None:
    hires = visium.outs / "spatial" / "tissue_hires_image.png"
    err = _raises(lambda: visium.run(tmp_path / "hest", image=hires), "tissue_hires_image.png", "image size")
    assert "full-resolution image of about 240 x 200 px" in str(err)


def _break_visium(v: VisiumOuts, case: str) -> tuple[dict, str, str | None]:
    """Damage one input; return (import kwargs, file named in the error, field named in the error)."""
    spatial = v.outs / "spatial"
    if case == "missing_matrix":
        v.matrix_path.unlink()
        return {}, v.matrix_path.name, None
    if case == "missing_positions":
        v.positions_path.unlink()
        return {}, "spatial", None
    if case == "missing_scalefactors":
        (spatial / "scalefactors_json.json").unlink()
        return {}, "scalefactors_json.json", None
    if case == "missing_image":
        return {"image": v.image_path.with_name("nope.tif")}, "nope.tif", None
    if case == "missing_outs":
        shutil.rmtree(v.outs)
        return {}, "outs", None
    if case == "missing_column":
        v.positions = v.positions.drop(columns="pxl_row_in_fullres")
        v.write_positions()
        return {}, v.positions_path.name, "pxl_row_in_fullres"
    if case == "duplicate_position_barcode":
        v.positions.loc[5, "barcode"] = v.positions.loc[6, "barcode"]
        v.write_positions()
        return {}, v.positions_path.name, "barcode"
    if case == "duplicate_matrix_barcode":
        barcodes = v.barcodes.copy()
        barcodes[3] = barcodes[4]
        v.write_matrix(barcodes=barcodes)
        return {}, v.matrix_path.name, "matrix/barcodes"
    if case in ("nan_count", "negative_count"):
        data = v.counts.astype(np.float64)
        data[2, 1] = np.nan if case == "nan_count" else -3
        v.write_matrix(data=data)
        return {}, v.matrix_path.name, "X"
    if case == "no_overlap":
        v.positions["barcode"] = [b.replace("-1", "-2") for b in v.positions["barcode"]]
        v.write_positions()
        return {}, v.positions_path.name, "barcode"
    if case == "outside_image":
        v.positions.loc[v.positions["in_tissue"] == 1, "pxl_col_in_fullres"] += v.size[0]
        v.write_positions()
        return {"image": v.image_path}, v.positions_path.name, 'obsm["spatial"]'
    if case == "bad_scalefactor":
        v.factors["tissue_hires_scalef"] = 0
        v.write_factors()
        return {}, "scalefactors_json.json", "tissue_hires_scalef"
    if case == "pixel_size_zero":
        return {"pixel_size_um": 0}, "pixel_size_um", "pixel_size_um"
    if case == "sample_id_with_dot":
        return {"sample_id": "V1.b"}, "V1.b", "sample_id"
    raise AssertionError(case)


VISIUM_BAD = ["missing_matrix", "missing_positions", "missing_scalefactors", "missing_image", "missing_outs",
              "missing_column", "duplicate_position_barcode", "duplicate_matrix_barcode", "nan_count",
              "negative_count", "no_overlap", "outside_image", "bad_scalefactor", "pixel_size_zero",
              "sample_id_with_dot"]


@pytest.mark.parametrize("case", VISIUM_BAD)
def test_visium_bad_input_names_file_and_field_and_keeps_existing_sample(read, visium: VisiumOuts,
                                                                         tmp_path: Path, case: str) -> None:
    root = tmp_path / "hest"
    visium.run(root, image=visium.image_path)
    before = _snapshot(root)
    kwargs, name, field = _break_visium(visium, case)
    sample_id = kwargs.pop("sample_id", "V1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bad input fails with the one error, no warnings first
        _raises(lambda: visium.run(root, sample_id, overwrite=True, **kwargs), name, field)
    assert _snapshot(root) == before
    assert read(root, "V1").adata.n_obs == len(visium.kept)


# ---------------------------------------------------------------------------------------------------------------
# real data (skipped when ../shared/data is absent)

needs_her2st = pytest.mark.skipif(not (HER2ST / "cnts" / "B4.tsv.gz").is_file(), reason="../shared/data/her2st absent")
needs_visium = pytest.mark.skipif(not (VISIUM_TINY / "filtered_feature_bc_matrix.h5").is_file(),
                                  reason="../shared/data/visium_tiny absent")


@pytest.fixture(scope="module")
def her2st_b4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HER2ST section B4 (patient B) imported once for the module (~3 s: the JPEG is 9272 x 9923)."""
    root = tmp_path_factory.mktemp("her2st_hest")
    return import_legacy_st(HER2ST / "cnts" / "B4.tsv.gz", HER2ST / "spots" / "B4_selection.tsv",
                            HER2ST / "img" / "B4.jpg", "B4", root, organ="Breast", species="Homo sapiens",
                            patient="B")


@pytest.mark.realdata
@needs_her2st
def test_her2st_b4_import(read, her2st_b4: Path) -> None:
    counts = pd.read_csv(HER2ST / "cnts" / "B4.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(HER2ST / "spots" / "B4_selection.tsv", sep="\t")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    joined = spots.index[(spots["selected"] == 1) & spots.index.isin(counts.index)]
    sample = read(her2st_b4, "B4")
    a = sample.adata
    assert list(a.obs_names) == list(joined) and a.n_obs == 283
    np.testing.assert_allclose(a.obsm["spatial"], spots.loc[joined, ["pixel_x", "pixel_y"]].to_numpy())
    assert a.X.sum() == counts.loc[joined].to_numpy().sum()
    assert a.n_vars == counts.shape[1]
    meta = sample.metadata
    assert a.uns["spfm"]["pixel_size_source"] == "estimated" and "pixel_size_um_embedded" not in meta
    assert 0.6 < meta["pixel_size_um_estimated"] < 0.8
    hest_table = DATA / "hest" / "HEST_v1_1_0.csv"
    if hest_table.is_file():  # HEST-1k's own estimate for this section (SPA145, subseries B4)
        row = pd.read_csv(hest_table).set_index("subseries").loc["B4"]
        assert meta["pixel_size_um_estimated"] == pytest.approx(row["pixel_size_um_estimated"], rel=0.01)
        assert a.n_obs == row["spots_under_tissue"]
    assert sample.slide.dimensions == (9272, 9923)


@pytest.mark.realdata
@needs_her2st
def test_her2st_b4_patch_is_centred_on_its_spot(read, her2st_b4: Path) -> None:
    sample = read(her2st_b4, "B4")
    size = 64
    config = PatchConfig(size_px=size, pixel_size_um=sample.pixel_size_um, min_tissue_fraction=0.0)
    patches = list(itertools.islice(iter_patches(sample, config), 4))
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(HER2ST / "img" / "B4.jpg") as im:
        original = np.asarray(im.convert("RGB"))  # uint8 (9923, 9272, 3); only small crops go to float
    for patch in patches:
        x, y = sample.adata.obsm["spatial"][patch.index]
        x0, y0 = int(round(x - size / 2)), int(round(y - size / 2))
        area = original[y0 - 4 : y0 + size + 4, x0 - 4 : x0 + size + 4].astype(np.float32)
        errors = {(dx, dy): np.abs(area[4 + dy : 4 + dy + size, 4 + dx : 4 + dx + size] - patch.image).mean()
                  for dx in range(-4, 5) for dy in range(-4, 5)}
        assert min(errors, key=errors.get) == (0, 0), patch.barcode  # the original crop around the spot fits best


@pytest.mark.realdata
@needs_visium
def test_visium_tiny_imports_from_hires_and_round_trips(read, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no full-resolution image"):
        root = import_visium(VISIUM_TINY, "visium_tiny", tmp_path / "hest")
    sample = read(root, "visium_tiny")
    a = sample.adata
    factors = json.loads((VISIUM_TINY / "spatial" / "scalefactors_json.json").read_text())
    pos = pd.read_csv(VISIUM_TINY / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    assert a.n_obs == 100 and a.n_vars == 100
    np.testing.assert_allclose(a.obsm["spatial"], pos.loc[a.obs_names, [5, 4]].to_numpy() *
                               factors["tissue_hires_scalef"])
    with h5py.File(VISIUM_TINY / "filtered_feature_bc_matrix.h5") as f:
        assert a.X.sum() == pytest.approx(float(f["matrix/data"][:].sum()))
    assert sample.slide.dimensions == (2000, 2000)
    meta = sample.metadata
    assert meta["image_scale"] == factors["tissue_hires_scalef"]
    # neighbouring spots lie 138 full-resolution px apart in this run: 100 um / 138 px, at the hires scale
    assert meta["pixel_size_um_estimated"] == pytest.approx(100 / 138 / factors["tissue_hires_scalef"], rel=0.01)
    assert sample.adata.uns["spfm"]["technology"] == "Visium"
