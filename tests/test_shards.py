"""Shards: vocabulary, splits, records, manifest, resume, ranks and workers, data card, verification."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from conftest import SHARED_DATA, tiny_adata, tissue_image
from PIL import Image

import spfm.data.shards as shards_mod
from spfm.data.hest import read_sample, write_sample
from spfm.data.patches import PatchConfig, iter_patches
from spfm.data.records import decode_mask, npy_load, record_key
from spfm.data.shards import launcher_rank, partition, read_manifest, verify_shards, write_shards
from spfm.data.splits import assign_splits, read_split_mapping
from spfm.data.vocab import build_vocabulary, read_gene_names, read_gene_panel
from spfm.errors import DataError

# 64 px at 1 um/px: a 128 px source region of the 0.5 um/px test slides, small enough to keep the tests fast
PATCH = PatchConfig(size_px=64, pixel_size_um=1.0)
GENES = {
    "S1": [f"G{i}" for i in range(20)],
    "S2": [f"G{i}" for i in range(5, 25)],
    "S3": [f"G{i}" for i in range(15)] + ["G30", "G31"],
    "S4": [f"G{i}" for i in range(20)],
}
PATIENTS = {"S1": "P1", "S2": "P2", "S3": "P3", "S4": "P1"}
N_SPOTS = {"S1": 60, "S2": 40, "S3": 50, "S4": 30}


def make_root(root: Path, ids=("S1", "S2", "S3", "S4")) -> Path:
    """A HEST root of 600 x 600 px slides at 0.5 um/px whose top-left corner is glass (spots there are dropped).

    S1 has array coordinates; S2 has barcodes with dots; S3 stores sparse counts; S4 has normalised X and raw
    counts in layers["counts"].
    """
    for k, sid in enumerate(ids):
        rng = np.random.default_rng(k)
        img = tissue_image(600, 600, seed=k)
        img[:220, :220] = 245
        n = N_SPOTS[sid]
        adata = tiny_adata(n, GENES[sid], rng.uniform(30, 570, size=(n, 2)), seed=k)
        if sid == "S1":
            adata.obs["array_row"] = rng.integers(0, 40, n)
            adata.obs["array_col"] = rng.integers(0, 40, n)
        if sid == "S2":
            adata.obs_names = [f"AC.{i}-1" for i in range(n)]
        if sid == "S3":
            adata.X = sp.csr_matrix(adata.X)
        if sid == "S4":
            adata.layers["counts"] = adata.X.copy()
            adata.X = np.log1p(adata.X)
        meta = dict(organ="Breast" if k % 2 == 0 else "Lung", species="Homo sapiens", st_technology="Visium",
                    patient=PATIENTS[sid], pixel_size_um_estimated=0.5, license="CC BY 4.0")
        write_sample(root, sid, adata, img, meta)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("hest"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted single-process run over the corpus."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    return out, write_shards(corpus, out, patch=PATCH, progress=False)


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    records: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            assert ext not in records.setdefault(key, {}), f"duplicate member {member.name}"
            records[key][ext] = tar.extractfile(member).read()
    return records


def all_records(out: Path, manifest: dict) -> dict[str, dict[str, bytes]]:
    records: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        part = read_tar(out / shard["path"])
        assert not set(part) & set(records), "a record is in two shards"
        records.update(part)
    return records


def shard_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*/*.tar"))}


def without_created(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


# ---------------------------------------------------------------------------------------------------------------
# vocabulary and splits


def test_read_gene_names_matches_anndata(corpus):
    path = corpus / "st" / "S2.h5ad"
    assert read_gene_names(path) == list(ad.read_h5ad(path).var_names)


def test_build_vocabulary_modes(tmp_path):
    lists = {"a": ["B", "A", "C"], "b": ["C", "D", "B"]}
    assert build_vocabulary(lists, "union") == ["A", "B", "C", "D"]
    assert build_vocabulary(lists, "intersection") == ["B", "C"]
    assert build_vocabulary(lists, ["D", "A", "Z"]) == ["D", "A", "Z"]  # panel order kept
    with pytest.raises(DataError, match="share no gene") as err:
        build_vocabulary({"a": ["A"], "b": ["B"]}, "intersection", sources={"a": "st/a.h5ad", "b": "st/b.h5ad"})
    assert err.value.field == "var_names" and err.value.path.startswith("st/")
    with pytest.raises(DataError, match="'b' measured none") as err:
        build_vocabulary(lists, ["A", "Z"], sources={"b": "st/b.h5ad"})
    assert err.value.path == "st/b.h5ad" and err.value.field == "var_names"
    with pytest.raises(DataError, match="repeats"):
        build_vocabulary(lists, ["A", "A"])
    with pytest.raises(DataError, match="gene mode"):
        build_vocabulary(lists, "all")
    panel = tmp_path / "panel.txt"
    panel.write_text("# my panel\nD\n\nA  # a comment\n")
    assert read_gene_panel(panel) == ["D", "A"]


def _table(patients, n_spots=None):
    table = pd.DataFrame({"sample_id": [f"s{i}" for i in range(len(patients))], "patient": patients})
    if n_spots is not None:
        table["n_spots"] = n_spots
    return table


def test_splits_tiny_corpora():
    assert set(assign_splits(_table(["A", "A"])).values()) == {"train"}
    two = assign_splits(_table(["A", "B", "B"]))
    assert sorted(Counter(two.values())) == ["test", "train"] and two["s1"] == two["s2"]
    assert set(assign_splits(_table(["A", "B"]), (0.9, 0.1, 0.0)).values()) == {"train", "val"}
    three = assign_splits(_table(["A", "B", "C"]))
    assert sorted(three.values()) == ["test", "train", "val"]


def test_splits_by_patient_deterministic_and_weighted():
    patients = [f"p{i // 2}" for i in range(40)] + [None, float("nan")]  # 20 patients + 2 samples without one
    table = _table(patients, n_spots=[100] * 42)
    first = assign_splits(table, seed=3)
    assert first == assign_splits(table, seed=3)
    assert first != assign_splits(table, seed=4)
    for i in range(0, 40, 2):  # a patient's two samples stay together
        assert first[f"s{i}"] == first[f"s{i + 1}"]
    counts = Counter(first.values())
    assert counts["test"] == counts["val"] == 4 and counts["train"] == 34  # 10% of 42 samples, whole patients
    # shares are of spots, not samples: a patient with half the spots never lands in the 10% validation split
    spots = [900] + [100] * 9
    for seed in range(5):
        weighted = assign_splits(_table(["big"] + [f"p{i}" for i in range(9)], n_spots=spots), (0.4, 0.1, 0.5),
                                 seed=seed)
        assert weighted["s0"] != "val"
        test_share = sum(n for n, v in zip(spots, weighted.values()) if v == "test") / sum(spots)
        assert 0.3 <= test_share <= 0.7  # greedy by whole patients: within a patient's weight of the target


def test_explicit_split_mapping(tmp_path):
    table = _table(["A", "A", "B"])
    mapping = {"s0": "train", "s1": "train", "s2": "test"}
    assert assign_splits(table, explicit=mapping) == mapping
    with pytest.raises(DataError, match="stay in one split"):
        assign_splits(table, explicit={"s0": "train", "s1": "test", "s2": "test"})
    with pytest.raises(DataError, match="no entry"):
        assign_splits(table, explicit={"s0": "train"})
    with pytest.raises(DataError, match="must be one of"):
        assign_splits(table, explicit={"s0": "train", "s1": "train", "s2": "holdout"})
    path = tmp_path / "splits.csv"
    path.write_text("sample_id,split\ns0,train\ns1,train\ns2,test\n")
    assert read_split_mapping(path) == mapping


def test_partition_and_launcher_rank(monkeypatch):
    parts = partition({"a": 100, "b": 60, "c": 50, "d": 10}, 2)
    assert sorted(sum(parts, [])) == ["a", "b", "c", "d"]
    assert parts == [["a", "d"], ["b", "c"]]  # loads 110 and 110
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert launcher_rank() == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert launcher_rank() == (1, 3) and launcher_rank(0, 1) == (0, 1)
    with pytest.raises(DataError, match="rank"):
        launcher_rank(3, 2)


# ---------------------------------------------------------------------------------------------------------------
# records and manifest


def test_records_match_patches_counts_and_metadata(corpus, reference):
    out, manifest = reference
    vocab = manifest["genes"]
    assert vocab == sorted(set().union(*GENES.values())) and manifest["gene_mode"] == "union"
    records = all_records(out, manifest)
    assert len(records) == manifest["totals"]["records"]
    for sid in GENES:
        sample = read_sample(corpus, sid)
        kept = [p.barcode for p in iter_patches(sample, PATCH)]
        assert 0 < len(kept) < N_SPOTS[sid]  # the glass corner drops some spots, the rest are kept
        info = manifest["samples"][sid]
        assert info["n_records"] == len(kept) and info["n_spots"] == N_SPOTS[sid]
        assert info["patch_stats"]["n_dropped_tissue"] == N_SPOTS[sid] - len(kept)
        measured = decode_mask(info["measured"], len(vocab))
        assert [g for g, m in zip(vocab, measured) if m] == sorted(GENES[sid])
        adata = sample.adata
        raw = adata.layers["counts"] if "counts" in adata.layers else adata.X
        raw = raw.toarray() if sp.issparse(raw) else np.asarray(raw)
        col = {g: j for j, g in enumerate(adata.var_names)}
        for barcode in kept:
            key = record_key(sid, barcode)
            assert "." not in key and key.startswith(f"{sid}_")
            rec = records[key]
            genes, counts = npy_load(rec["genes.npy"]), npy_load(rec["counts.npy"])
            assert genes.dtype == np.uint32 and counts.dtype == np.float32
            assert np.all(np.diff(genes.astype(np.int64)) > 0) and np.all(counts != 0)
            dense = np.zeros(len(vocab), np.float32)
            dense[genes] = counts
            i = adata.obs_names.get_loc(barcode)
            expected = np.array([raw[i, col[g]] if g in col else 0.0 for g in vocab], np.float32)
            np.testing.assert_array_equal(dense, expected)
            meta = json.loads(rec["json"])
            assert meta["sample_id"] == sid and meta["barcode"] == barcode and meta["split"] == info["split"]
            assert meta["x"] == pytest.approx(adata.obsm["spatial"][i, 0])
            assert meta["y"] == pytest.approx(adata.obsm["spatial"][i, 1])
            assert meta["patient"] == PATIENTS[sid] and meta["technology"] == "Visium"
            assert meta["pixel_size_um"] == 0.5 and meta["species"] == "Homo sapiens"
            if sid == "S1":
                assert meta["array_row"] == adata.obs["array_row"].iloc[i]
            else:
                assert meta["array_row"] is None and meta["array_col"] is None
            image = Image.open(io.BytesIO(rec["jpg"]))
            assert image.format == "JPEG" and image.size == (64, 64)
        sample.close()


def test_manifest_checksums_splits_and_card(reference):
    out, manifest = reference
    assert read_manifest(out) == manifest and verify_shards(out) == []
    for shard in manifest["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert shard["path"] == f"{shard['split']}/{shard['sample_id']}-000000.tar"
        assert len(read_tar(out / shard["path"])) == shard["records"]
    # splits: every sample in exactly one split, patients never on two sides (S1 and S4 share patient P1)
    splits = manifest["splits"]
    assert sorted(sum(splits.values(), [])) == sorted(GENES)
    sides = {}
    for split, ids in splits.items():
        for sid in ids:
            sides.setdefault(PATIENTS[sid], set()).add(split)
    assert all(len(s) == 1 for s in sides.values()) and len({s.pop() for s in sides.values()}) == 3
    assert not (out / ".tmp").exists()

    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["license"] == "cc-by-4.0" and front["size_categories"] == ["n<1K"]
    assert "spatial-transcriptomics" in front["tags"]
    files = {d["split"]: d["path"] for d in front["configs"][0]["data_files"]}
    assert files == {split: f"{split}/*.tar" for split, ids in splits.items() if ids}
    for sid in GENES:
        assert f"| {sid} | " in text


def test_data_card_loads_with_datasets(reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    out, manifest = reference
    # the card's configs name the shard globs per split and declare the column types
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    for split, ids in manifest["splits"].items():
        if ids:
            assert ds[split].num_rows == manifest["totals"]["records_per_split"][split]


def test_panel_vocabulary_and_png(corpus, tmp_path):
    panel = ["G30", "G3", "G22", "NOT_MEASURED"]
    manifest = write_shards(corpus, tmp_path / "out", patch=PATCH, genes=panel, image_format="png",
                            progress=False, card=False)
    assert manifest["genes"] == panel and manifest["gene_mode"] == "panel"
    assert manifest["image_format"] == "png" and manifest["jpeg_quality"] is None
    records = all_records(tmp_path / "out", manifest)
    s3 = next(r for k, r in records.items() if k.startswith("S3_"))
    assert set(npy_load(s3["genes.npy"])) <= {0, 1}  # S3 measured G30 and G3 only
    assert Image.open(io.BytesIO(s3["png"])).format == "PNG"
    assert decode_mask(manifest["samples"]["S2"]["measured"], 4).tolist() == [False, False, True, False]
    assert not (tmp_path / "out" / "README.md").exists()


def test_intersection_vocabulary(corpus, tmp_path):
    manifest = write_shards(corpus, tmp_path / "out", patch=PATCH, genes="intersection", samples=["S1", "S2"],
                            progress=False, card=False)
    assert manifest["genes"] == sorted(f"G{i}" for i in range(5, 20))
    assert sorted(manifest["samples"]) == ["S1", "S2"]


def test_panel_without_overlap_raises_before_writing(corpus, tmp_path):
    with pytest.raises(DataError, match="measured none") as err:
        write_shards(corpus, tmp_path / "out", patch=PATCH, genes=["G22", "G23"], progress=False)
    assert err.value.path.endswith("st/S1.h5ad") and err.value.field == "var_names"
    assert not list((tmp_path).glob("out/*/*.tar"))


# ---------------------------------------------------------------------------------------------------------------
# resume, ranks, workers, reruns


def test_resume_after_interrupted_run(corpus, reference, tmp_path, monkeypatch):
    ref_out, ref_manifest = reference
    out = tmp_path / "out"
    real = shards_mod.iter_patches
    started = []

    def dies_on_second_sample(sample, config, stats):
        started.append(sample.sample_id)
        for i, patch in enumerate(real(sample, config, stats)):
            if len(started) == 2 and i == 5:
                raise KeyboardInterrupt("killed")
            yield patch

    monkeypatch.setattr(shards_mod, "iter_patches", dies_on_second_sample)
    with pytest.raises(KeyboardInterrupt):
        write_shards(corpus, out, patch=PATCH, progress=False)
    monkeypatch.undo()
    first, second = started
    assert (out / ".done" / f"{first}.json").is_file() and not (out / ".done" / f"{second}.json").exists()
    assert not (out / "manifest.json").exists()
    assert not list((out / ".tmp").glob("*/*"))  # the failing sample's temporary shard was removed
    # what a hard kill can leave: a half-written temporary shard, and a renamed shard without a completion record
    (out / ".tmp" / second).mkdir(parents=True)
    (out / ".tmp" / second / f"{second}-000000.tar").write_bytes(b"partial")
    split = ref_manifest["samples"][second]["split"]
    (out / split).mkdir(exist_ok=True)
    (out / split / f"{second}-000003.tar").write_bytes(b"orphan")

    manifest = write_shards(corpus, out, patch=PATCH, progress=False)
    assert without_created(manifest) == without_created(ref_manifest)
    assert shard_hashes(out) == shard_hashes(ref_out)
    assert not (out / ".tmp").exists() and verify_shards(out) == []
    keys = [k for shard in manifest["shards"] for k in read_tar(out / shard["path"])]
    assert len(keys) == len(set(keys)) == manifest["totals"]["records"]


def test_ranks_together_equal_single_run(corpus, reference, tmp_path):
    ref_out, ref_manifest = reference
    out = tmp_path / "out"
    assert write_shards(corpus, out, patch=PATCH, rank=0, world_size=2, progress=False) is None
    assert not (out / "manifest.json").exists()
    rank0 = {p.stem for p in (out / ".done").glob("*.json")}
    assert 0 < len(rank0) < 4
    manifest = write_shards(corpus, out, patch=PATCH, rank=1, world_size=2, progress=False)
    assert without_created(manifest) == without_created(ref_manifest)
    assert shard_hashes(out) == shard_hashes(ref_out)


def test_two_workers_equal_one(corpus, reference, tmp_path):
    ref_out, ref_manifest = reference
    manifest = write_shards(corpus, tmp_path / "out", patch=PATCH, workers=2, progress=False)
    assert without_created(manifest) == without_created(ref_manifest)
    assert shard_hashes(tmp_path / "out") == shard_hashes(ref_out)


def test_rerun_skips_done_and_refuses_other_options(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = write_shards(corpus, out, patch=PATCH, samples=["S2", "S3"], progress=False)
    hashes = shard_hashes(out)
    calls = []
    monkeypatch.setattr(shards_mod, "iter_patches", lambda *a, **k: calls.append(a) or iter(()))
    assert write_shards(corpus, out, patch=PATCH, samples=["S2", "S3"], progress=False) == first
    assert calls == [] and shard_hashes(out) == hashes  # nothing rewritten
    monkeypatch.undo()
    with pytest.raises(DataError, match="jpeg_quality") as err:
        write_shards(corpus, out, patch=PATCH, samples=["S2", "S3"], jpeg_quality=70, progress=False)
    assert err.value.path.endswith(".spfm-shard-config.json")
    with pytest.raises(DataError, match="genes"):
        write_shards(corpus, out, patch=PATCH, samples=["S2", "S3"], genes="intersection", progress=False)
    assert shard_hashes(out) == hashes
    other = write_shards(corpus, out, patch=PATCH, samples=["S2", "S3"], jpeg_quality=70, overwrite=True,
                         progress=False)
    assert other["jpeg_quality"] == 70 and verify_shards(out) == []
    assert shard_hashes(out).keys() == hashes.keys() and shard_hashes(out) != hashes


def test_shard_size_limit_splits_a_sample(corpus, tmp_path):
    manifest = write_shards(corpus, tmp_path / "out", patch=PATCH, samples=["S1"], maxcount=10, progress=False)
    n = manifest["samples"]["S1"]["n_records"]
    paths = manifest["samples"]["S1"]["shards"]
    assert len(paths) == -(-n // 10) and paths[-1].endswith(f"S1-{len(paths) - 1:06d}.tar")
    assert [s["records"] for s in manifest["shards"]] == [10] * (n // 10) + ([n % 10] if n % 10 else [])


def test_bad_sample_raises_and_keeps_finished_shards(tmp_path):
    root = make_root(tmp_path / "hest", ids=("S1", "S2"))
    bad = ad.read_h5ad(root / "st" / "S2.h5ad")
    bad.X[3, 2] = np.nan
    bad.write_h5ad(root / "st" / "S2.h5ad")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="NaN") as err:
        write_shards(root, out, patch=PATCH, progress=False)  # S1 has more spots, so it is written first
    assert err.value.path.endswith("st/S2.h5ad") and err.value.field == "X"
    done = json.loads((out / ".done" / "S1.json").read_text())
    for shard in done["shards"]:
        assert hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    assert not list(out.glob("*/S2-*.tar")) and not (out / ".tmp" / "S2").exists()
    assert not (out / "manifest.json").exists()


def test_barcodes_colliding_as_keys_raise(tmp_path):
    root = make_root(tmp_path / "hest", ids=("S2",))
    adata = ad.read_h5ad(root / "st" / "S2.h5ad")
    adata.obs_names = ["AC-0-1", "AC.0-1"] + list(adata.obs_names[2:])  # both become key S2_AC-0-1
    adata.write_h5ad(root / "st" / "S2.h5ad")
    with pytest.raises(DataError, match="same record key") as err:
        write_shards(root, tmp_path / "out", patch=PATCH, progress=False)
    assert err.value.field == "obs_names" and err.value.path.endswith("st/S2.h5ad")


@pytest.mark.parametrize("var_order", ["vocabulary", "shuffled"])
def test_counts_matrix_sorted_rows_without_zeros(var_order):
    """Counts land on the vocabulary with ascending indices and no stored zeros, whether the sample's genes already
    lie in vocabulary order (no transposes) or not, and whether X's rows are sorted or not."""
    rng = np.random.default_rng(3)
    genes = [f"G{i:02d}" for i in range(30)]
    if var_order == "shuffled":
        genes = list(rng.permutation(genes))
    dense = rng.poisson(0.8, (12, 30)).astype(np.float32)
    X = sp.csr_matrix(dense)
    X.data[::5] = 0  # stored zeros
    for i in range(12):  # unsorted column indices within rows
        lo, hi = X.indptr[i], X.indptr[i + 1]
        X.indices[lo:hi], X.data[lo:hi] = X.indices[lo:hi][::-1].copy(), X.data[lo:hi][::-1].copy()
    X.has_sorted_indices = False
    expected_X = X.toarray()
    adata = ad.AnnData(X, var=pd.DataFrame(index=genes))
    sample = type("Sample", (), {"adata": adata})()
    vocab = pd.Index(sorted(set(genes) - {"G07"} | {"A0", "Z9"}))  # one gene outside, two never measured
    for unsorted in (True, False):
        counts, measured = shards_mod._counts_matrix(sample, vocab, Path("x.h5ad"))
        assert counts.shape == (12, len(vocab)) and np.all(counts.data != 0)
        for i in range(12):
            assert np.all(np.diff(counts.indices[counts.indptr[i] : counts.indptr[i + 1]]) > 0)
        col = {g: j for j, g in enumerate(genes)}
        expected = np.array([[expected_X[i, col[g]] if g in col else 0 for g in vocab] for i in range(12)])
        np.testing.assert_array_equal(counts.toarray(), expected)
        np.testing.assert_array_equal(measured, [g in col for g in vocab])
        np.testing.assert_array_equal(adata.X.toarray(), expected_X)  # the sample's own matrix is left alone
        adata.X = X.sorted_indices()  # second round: rows sorted


def test_npy_bytes_are_numpy_format():
    """The directly built header gives exactly np.save's bytes, which np.load and the loader read back."""
    from spfm.data.records import npy_bytes

    for array in (np.arange(5, dtype=np.uint32), np.zeros(0, np.float32), np.arange(12345, dtype=np.float32)[::3],
                  np.arange(6, dtype=">i8"), np.zeros((2, 3), np.float32)):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        assert npy_bytes(array) == buf.getvalue()
        np.testing.assert_array_equal(npy_load(npy_bytes(array)), array)


def test_bad_options(corpus, tmp_path):
    with pytest.raises(DataError, match="image format"):
        write_shards(corpus, tmp_path / "o", image_format="webp", progress=False)
    with pytest.raises(DataError, match="not in the HEST root"):
        write_shards(corpus, tmp_path / "o", samples=["S9"], progress=False)


def test_verify_detects_damage(reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    manifest = read_manifest(out)
    first, second = (out / manifest["shards"][0]["path"]), (out / manifest["shards"][1]["path"])
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(second.read_bytes())
    flipped[1000] ^= 0xFF  # corrupted inside a member's data
    second.write_bytes(bytes(flipped))
    (out / "train" / "stray-000000.tar").write_bytes(b"")
    problems = verify_shards(out)
    assert any(manifest["shards"][0]["path"] in p and "bytes" in p for p in problems)
    assert any(manifest["shards"][0]["path"] in p and "unreadable" in p for p in problems)
    assert any(manifest["shards"][1]["path"] in p and "sha256" in p for p in problems)
    assert any("stray-000000.tar: not listed" in p for p in problems)


# ---------------------------------------------------------------------------------------------------------------
# real data


def _her2st_root(root: Path) -> Path:
    her2st = SHARED_DATA / "her2st"
    try:
        from spfm.data.importers import import_legacy_st
    except ImportError:
        import_legacy_st = None
    if import_legacy_st is not None:
        import_legacy_st(her2st / "cnts" / "B4.tsv.gz", her2st / "spots" / "B4_selection.tsv",
                         her2st / "img" / "B4.jpg", "B4", root, organ="Breast", species="Homo sapiens",
                         patient="B")
        return root
    counts = pd.read_csv(her2st / "cnts" / "B4.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(her2st / "spots" / "B4_selection.tsv", sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    ids = [i for i in counts.index if i in spots.index]
    adata = ad.AnnData(sp.csr_matrix(counts.loc[ids].to_numpy(np.float32)),
                       obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=counts.columns.astype(str)))
    adata.var_names_make_unique()
    adata.obsm["spatial"] = spots.loc[ids, ["pixel_x", "pixel_y"]].to_numpy(np.float64)
    pitch = np.polyfit(spots.loc[ids, "x"], spots.loc[ids, "pixel_x"], 1)[0]  # pixels per 200 um
    Image.MAX_IMAGE_PIXELS = None
    image = np.asarray(Image.open(her2st / "img" / "B4.jpg").convert("RGB"))
    write_sample(root, "B4", adata, image, dict(organ="Breast", species="Homo sapiens", patient="B",
                                                st_technology="Spatial Transcriptomics",
                                                pixel_size_um_estimated=200 / pitch))
    return root


@pytest.mark.realdata
def test_her2st_section_shards(tmp_path):
    if not (SHARED_DATA / "her2st").is_dir():
        pytest.skip("../shared/data/her2st is not present")
    root = _her2st_root(tmp_path / "hest")
    manifest = write_shards(root, tmp_path / "out", progress=False)
    info = manifest["samples"]["B4"]
    sample = read_sample(root, "B4")
    assert info["n_records"] == len(list(iter_patches(sample))) > 250  # HER2ST B4: 283 spots under tissue
    assert manifest["genes"] == sorted(sample.adata.var_names) and manifest["splits"]["train"] == ["B4"]
    assert verify_shards(tmp_path / "out") == []
    records = all_records(tmp_path / "out", manifest)
    rec = records[record_key("B4", sample.adata.obs_names[0])]
    image = np.asarray(Image.open(io.BytesIO(rec["jpg"])))
    assert image.shape == (224, 224, 3)
    row = sample.adata.X[0].toarray().ravel()
    np.testing.assert_array_equal(npy_load(rec["counts.npy"]).sum(), row.sum())
