"""The training loader over WebDataset shards: batches, gene panel and mask, epochs, ranks, resampling, augmentation,
corrupt shards, and loading the same shards with Hugging Face ``datasets``."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from spfm.data import loader as loader_module
from spfm.data import records
from spfm.data.augment import Augment
from spfm.data.loader import Collate, decode_image, hf_data_files, make_dataset, make_loader
from spfm.errors import DataError

VOCAB = ["ACTB", "EPCAM", "KRT8", "CD3E", "MKI67", "PTPRC"]
# (sample id, patient, split, genes the sample did not measure)
SAMPLES = [("S1", "P1", "train", set()), ("S2", "P2", "train", {"CD3E"}), ("S3", "P3", "val", set())]
N_SPOTS = 11  # per sample; with 4 records per shard: shards of 4, 4 and 3 records
PER_SHARD = 4
SIZE = 32


def _write_shards(root: Path, image_ext: str = "jpg") -> dict[str, dict]:
    """Shards and a manifest as ``spfm shard`` writes them; returns the source of every record by key:
    ``{"image": (H, W, 3) uint8 as decoded from the stored bytes, "dense": (V,) float32 counts, "sample_id",
    "split"}``."""
    rng = np.random.default_rng(0)
    source: dict[str, dict] = {}
    shards, samples = [], {}
    for sid, patient, split, unmeasured in SAMPLES:
        measured = np.array([g not in unmeasured for g in VOCAB])
        (root / split).mkdir(parents=True, exist_ok=True)
        pattern = str(root / split / f"{sid}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=PER_SHARD, verbose=0) as sink:
            for i in range(N_SPOTS):
                barcode = f"AC.{i:03d}-1"  # a dot, which the key must not keep
                key = records.record_key(sid, barcode)
                pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG" if image_ext == "jpg" else "PNG", quality=90)
                dense = np.where(measured, rng.poisson(1.5, len(VOCAB)), 0).astype(np.float32)
                nz = np.flatnonzero(dense)
                meta = dict(sample_id=sid, barcode=barcode, x=10.0 * i, y=5.0, array_row=i, array_col=0,
                            pixel_size_um=0.5, technology="Visium", organ="Breast", species="Homo sapiens",
                            patient=patient, split=split)
                sink.write(records.encode_record(key, buf.getvalue(), image_ext, nz, dense[nz], meta))
                source[key] = dict(image=np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")),
                                   dense=dense, sample_id=sid, split=split)
        paths = sorted((root / split).glob(f"{sid}-*.tar"))
        for n, p in enumerate(paths):
            count = min(PER_SHARD, N_SPOTS - n * PER_SHARD)
            data = p.read_bytes()
            shards.append(dict(path=str(p.relative_to(root)), split=split, sample_id=sid, records=count,
                               bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
        samples[sid] = dict(patient=patient, organ="Breast", species="Homo sapiens", technology="Visium",
                            split=split, pixel_size_um=0.5, n_spots=N_SPOTS, n_records=N_SPOTS,
                            measured=records.encode_mask(measured), n_measured=int(measured.sum()),
                            shards=[str(p.relative_to(root)) for p in paths])
    splits = {s: [sid for sid, _, sp, _ in SAMPLES if sp == s] for s in ("train", "val", "test")}
    manifest = dict(format=records.MANIFEST_FORMAT, version=records.MANIFEST_VERSION, spfm_version="test",
                    created="2024-01-01T00:00:00Z",
                    patch=dict(size_px=SIZE, pixel_size_um=0.5, edge="pad", min_tissue_fraction=0.1,
                               tissue_saturation=20, image_format=image_ext, jpeg_quality=90),
                    genes=VOCAB, gene_mode="union", splits=splits, samples=samples, shards=shards,
                    totals=dict(records=len(source), shards=len(shards)))
    (root / records.MANIFEST_NAME).write_text(json.dumps(manifest))
    return source


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("shards")
    return root, _write_shards(root)


def _train_keys(source: dict[str, dict]) -> set[str]:
    return {k for k, v in source.items() if v["split"] == "train"}


def _spot(key: str) -> int:
    """The spot number in a key such as ``S2_AC-003-1``."""
    return int(key.split("-")[1])


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_batches_match_the_source_records(corpus):
    root, source = corpus
    panel = ["CD3E", "NOTAGENE", "EPCAM", "ACTB"]
    loader = make_loader(root, genes=panel, batch_size=5, shuffle=0)
    assert loader.dataset.genes == panel
    seen = []
    for batch in loader:
        b = len(batch["key"])
        assert batch["image"].shape == (b, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
        assert batch["expression"].shape == (b, 4) and batch["expression"].dtype == torch.float32
        assert batch["mask"].shape == (b, 4) and batch["mask"].dtype == torch.bool
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        for i, key in enumerate(batch["key"]):
            src = source[key]
            assert batch["meta"][i]["sample_id"] == src["sample_id"] and "." not in key
            want = records.dense_expression(np.flatnonzero(src["dense"]), src["dense"][src["dense"] > 0],
                                            np.array([VOCAB.index(g) if g in VOCAB else -1 for g in panel]))
            np.testing.assert_array_equal(batch["expression"][i].numpy(), want)
            # CD3E is unmeasured in S2; NOTAGENE is in no sample's vocabulary
            assert batch["mask"][i].tolist() == [src["sample_id"] != "S2", False, True, True]
            # torchvision and PIL both use libjpeg-turbo; allow a rounding difference in the colour conversion
            got = (batch["image"][i] * 255).round().to(torch.int16).permute(1, 2, 0).numpy()
            assert np.abs(got - src["image"].astype(np.int16)).max() <= 2
        seen += batch["key"]
    # shuffle=0 keeps manifest order: S1's shards then S2's, each in record order
    assert seen == sorted(_train_keys(source))


def test_png_records_decode_exactly(tmp_path):
    source = _write_shards(tmp_path, image_ext="png")
    loader = make_loader(tmp_path, split="val", batch_size=4, shuffle=0)
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            got = (batch["image"][i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(got, source[key]["image"])


def test_pil_fallback_decodes_like_torchvision(corpus, monkeypatch):
    root, _ = corpus
    fast = next(iter(make_loader(root, batch_size=6, shuffle=0)))
    monkeypatch.setattr(loader_module, "_torchvision_decodes", lambda: False)
    slow = next(iter(make_loader(root, batch_size=6, shuffle=0)))
    assert slow["key"] == fast["key"]
    assert (slow["image"] - fast["image"]).abs().max() <= 2 / 255 + 1e-6
    assert torch.equal(decode_image(_png_bytes()), torch.tensor([1, 2, 3], dtype=torch.uint8)[:, None, None]
                       .expand(3, 2, 3))


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_expression_transforms_and_normalize(corpus):
    root, source = corpus
    batch = next(iter(make_loader(root, batch_size=4, shuffle=0, log1p=True, target_sum=100.0,
                                  normalize=([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]))))
    for i, key in enumerate(batch["key"]):
        dense = source[key]["dense"]
        np.testing.assert_allclose(batch["expression"][i].numpy(), np.log1p(dense / dense.sum() * 100.0), rtol=1e-5)
    raw = next(iter(make_loader(root, batch_size=4, shuffle=0)))["image"]
    torch.testing.assert_close(batch["image"], (raw - 0.5) / 0.25)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_record_once_per_epoch(corpus, num_workers):
    root, source = corpus
    loader = make_loader(root, batch_size=3, shuffle=7, num_workers=num_workers, seed=1)
    for _ in range(2):
        assert Counter(_keys(loader)) == Counter(_train_keys(source))
    # batches built in worker processes arrive intact
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            np.testing.assert_array_equal(batch["expression"][i].numpy(), source[key]["dense"])
            got = (batch["image"][i] * 255).round().permute(1, 2, 0).numpy()
            assert np.abs(got - source[key]["image"]).max() <= 2


def test_seeded_order_is_reproducible_and_changes_per_epoch(corpus):
    root, _ = corpus
    first = make_loader(root, batch_size=4, shuffle=20, seed=5)
    epoch0, epoch1 = _keys(first), _keys(first)
    assert epoch0 == _keys(make_loader(root, batch_size=4, shuffle=20, seed=5))
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    resumed = make_loader(root, batch_size=4, shuffle=20, seed=5)
    resumed.set_epoch(1)
    assert _keys(resumed) == epoch1
    assert _keys(make_loader(root, batch_size=4, shuffle=20, seed=6)) != epoch0


def test_split_by_node_gives_disjoint_covering_subsets(corpus, monkeypatch):
    """Two ranks through webdataset's RANK/WORLD_SIZE hook (what torchrun and accelerate launch set)."""
    root, source = corpus
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append([s["key"] for s in make_dataset(root, shuffle=10, seed=3)])
    a, b = set(per_rank[0]), set(per_rank[1])
    assert a and b and not a & b and a | b == _train_keys(source)
    assert len(per_rank[0]) + len(per_rank[1]) == len(_train_keys(source))
    # whole shards go to one rank: a shard's records never straddle ranks
    shard_of = {k: (source[k]["sample_id"], _spot(k) // PER_SHARD) for k in source}
    assert not {shard_of[k] for k in a} & {shard_of[k] for k in b}


_RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from spfm.data.loader import make_dataset
rank, store, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
keys = [s["key"] for s in make_dataset(root, shuffle=10, seed=3)]
dist.barrier()
dist.destroy_process_group()
print(json.dumps(keys))
"""


def test_split_by_node_under_torch_distributed(corpus, tmp_path):
    """Two processes in a gloo process group, with no RANK/WORLD_SIZE in the environment."""
    root, source = corpus
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(rank), str(tmp_path / "store"), str(root)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    a, b = (set(json.loads(out)) for out, _ in outputs)
    assert a and b and not a & b and a | b == _train_keys(source)


def test_resampled_epochs(corpus):
    root, source = corpus
    with pytest.raises(ValueError, match="epoch_size"):
        make_loader(root, resampled=True)
    loader = make_loader(root, batch_size=4, resampled=True, epoch_size=13, seed=2)
    epochs = [_keys(loader) for _ in range(2)]
    for keys in epochs:
        assert len(keys) == 16  # 13 rounded up to 4 batches of 4
        assert set(keys) <= _train_keys(source)
    again = make_loader(root, batch_size=4, resampled=True, epoch_size=13, seed=2)
    assert [_keys(again) for _ in range(2)] == epochs and epochs[0] != epochs[1]


def test_augmentation_changes_images_reproducibly(corpus):
    root, _ = corpus
    plain = list(make_loader(root, batch_size=8, shuffle=0))
    augmented = [list(make_loader(root, batch_size=8, shuffle=0, augment=True, seed=s)) for s in (0, 0, 1)]
    for a, b, c, p in zip(*augmented, plain):
        assert a["key"] == p["key"] and a["image"].shape == p["image"].shape
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["expression"], p["expression"])
    changed = [not torch.equal(a, p) for x, y in zip(augmented[0], plain) for a, p in zip(x["image"], y["image"])]
    assert sum(changed) >= 0.8 * len(changed)
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(augmented[0], augmented[2]))


def test_augment_geometry_is_a_square_symmetry():
    image = torch.arange(3 * 5 * 5, dtype=torch.uint8).reshape(3, 5, 5)
    symmetries = [torch.rot90(im, k, dims=(-2, -1)) for im in (image, image.flip(-1)) for k in range(4)]
    geometric = Augment(hed_jitter=0.0)
    outputs = [geometric(image, generator=seed) for seed in range(40)]
    for out in outputs:
        assert any(torch.equal(out, s) for s in symmetries)
    assert len({tuple(o.flatten().tolist()) for o in outputs}) == 8  # all eight reached
    wide = torch.zeros(3, 4, 6, dtype=torch.uint8)
    assert all(geometric(wide, generator=s).shape == wide.shape for s in range(8))


def test_augment_colour_is_seeded_and_keeps_dtype():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(30, 250, (3, 16, 16), dtype=np.uint8))
    aug = Augment(flip=False, rot90=False, hed_jitter=0.05, color_jitter=(0.2, 0.2, 0.2, 0.05), p=1.0)
    out = aug(image, generator=torch.Generator().manual_seed(4))
    assert out.dtype == torch.uint8 and out.shape == image.shape and not torch.equal(out, image)
    assert torch.equal(out, aug(image, generator=torch.Generator().manual_seed(4)))
    floats = aug(image.float() / 255, generator=4)
    assert floats.dtype == torch.float32 and 0 <= floats.min() and floats.max() <= 1
    # stain unmixing and remixing without jitter is the identity (up to uint8 rounding)
    identity = Augment(flip=False, rot90=False, hed_jitter=1e-9, p=1.0)(image, generator=0)
    assert (identity.int() - image.int()).abs().max() <= 1
    with pytest.raises(ValueError, match="hed_jitter"):
        Augment(hed_jitter=2.0)


def _corrupt_copy(root: Path, tmp_path: Path, how: str) -> tuple[Path, Path]:
    """A copy of the shard directory with the first train shard of S2 damaged."""
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shard = copy / "train" / "S2-000000.tar"
    data = shard.read_bytes()
    if how == "mid-member":
        shard.write_bytes(data[: len(data) // 2 + 100])
    elif how == "at-boundary":  # exactly after the first record's four members: tarfile reads a short archive
        with wds.tariterators.tarfile.open(fileobj=io.BytesIO(data)) as tar:
            fifth = tar.getmembers()[4].offset
        shard.write_bytes(data[:fifth])
    else:  # garbage over the third record's header block
        with wds.tariterators.tarfile.open(fileobj=io.BytesIO(data)) as tar:
            ninth = tar.getmembers()[8].offset
        shard.write_bytes(data[:ninth] + b"\xff" * 512 + data[ninth + 512:])
    return copy, shard


@pytest.mark.parametrize("how", ["mid-member", "at-boundary", "bad-header"])
def test_corrupt_shard_raises_or_is_skipped(corpus, tmp_path, how, caplog):
    root, source = corpus
    copy, shard = _corrupt_copy(root, tmp_path, how)
    with pytest.raises(DataError, match="S2-000000.tar"):
        _keys(make_loader(copy, batch_size=4, shuffle=0))
    with caplog.at_level(logging.WARNING, logger="spfm.data.loader"):
        keys = _keys(make_loader(copy, batch_size=4, shuffle=0, on_error="skip"))
    assert any(str(shard) in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    intact = {k for k in _train_keys(source) if source[k]["sample_id"] != "S2" or _spot(k) >= PER_SHARD}
    assert intact <= set(keys) <= _train_keys(source) and len(keys) == len(set(keys))
    assert len(keys) < len(_train_keys(source))


def test_corrupt_record_names_shard_and_field(tmp_path, caplog):
    _write_shards(tmp_path)
    shard = tmp_path / "val" / "S3-000000.tar"
    with wds.TarWriter(str(shard)) as sink:  # valid tar, one record with image bytes that are not an image
        good = next(iter(wds.tarfile_samples([{"url": str(tmp_path / "val" / "S3-000001.tar")}])))
        for i in range(PER_SHARD):
            record = {k: v for k, v in good.items() if not k.startswith("__")}
            record["__key__"] = f"S3_bad-{i}"
            if i == 1:
                record["jpg"] = b"\xff\xd8 not a jpeg"
            if i == 2:
                record["json"] = json.dumps(dict(json.loads(good["json"]), sample_id="S9")).encode()
            sink.write(record)
    with pytest.raises(DataError, match=r"S3-000000.tar: S3_bad-1\.jpg"):
        list(make_dataset(tmp_path, split="val", shuffle=0))
    with caplog.at_level(logging.WARNING, logger="spfm.data.loader"):
        keys = [s["key"] for s in make_dataset(tmp_path, split="val", shuffle=0, on_error="skip")]
    assert keys[:2] == ["S3_bad-0", "S3_bad-3"] and len(keys) == N_SPOTS - 2
    # record 2 belongs to a sample the manifest does not list for these shards
    assert any("S3_bad-2.json:sample_id" in r.getMessage() and "'S9'" in r.getMessage() for r in caplog.records)
    # the loader decodes into the batch: same error, and skipped records leave the batch short
    with pytest.raises(DataError, match=r"S3-000000.tar: S3_bad-1\.jpg"):
        _keys(make_loader(tmp_path, split="val", shuffle=0, batch_size=4))
    batches = list(make_loader(tmp_path, split="val", shuffle=0, batch_size=4, on_error="skip"))
    assert [len(b["key"]) for b in batches] == [4, 4, 1] and batches[0]["image"].shape[0] == 4
    assert batches[0]["key"][:2] == ["S3_bad-0", "S3_bad-3"]


def test_bad_manifest_and_panel(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(DataError, match="genes") as info:
        make_loader(root, genes=["NOPE1", "NOPE2"])
    assert info.value.field == "genes" and info.value.path == str(root / records.MANIFEST_NAME)
    with pytest.raises(DataError, match="splits"):
        make_loader(root, split="holdout")
    with pytest.raises(DataError, match="manifest"):
        make_loader(tmp_path)
    (tmp_path / records.MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="format"):
        make_dataset(tmp_path / records.MANIFEST_NAME)


def test_collate_rejects_mixed_image_sizes():
    sample = dict(expression=torch.zeros(2), mask=torch.ones(2, dtype=torch.bool), meta={}, key="a")
    with pytest.raises(DataError, match="b.image"):
        Collate()([dict(sample, image=torch.zeros(3, 4, 4, dtype=torch.uint8)),
                   dict(sample, image=torch.zeros(3, 1, 1, dtype=torch.uint8), key="b")])


def test_same_shards_load_with_hf_datasets(corpus, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, source = corpus
    files = hf_data_files(root)
    assert sorted(files) == ["train", "val"] and len(files["train"]) == 6
    ds = datasets.load_dataset("webdataset", data_files={"train": files["train"]}, split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(_train_keys(source))
    assert {"__key__", "jpg", "genes.npy", "counts.npy", "json"} <= set(ds.column_names)
    for row in ds.select(range(3)):
        src = source[row["__key__"]]
        assert np.asarray(row["jpg"].convert("RGB")).shape == (SIZE, SIZE, 3)
        dense = np.zeros(len(VOCAB), np.float32)
        dense[np.asarray(row["genes.npy"])] = row["counts.npy"]
        np.testing.assert_array_equal(dense, src["dense"])
        assert row["json"]["sample_id"] == src["sample_id"]
