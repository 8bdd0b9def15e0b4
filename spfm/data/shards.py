"""WebDataset shards from a HEST-layout root: ``spfm shard HEST_ROOT OUT_DIR``.

Layout of ``OUT_DIR``::

    {split}/{sample_id}-{i:06d}.tar   a sample's records (webdataset.ShardWriter; format in spfm.data.records)
    manifest.json                     every shard with records, bytes and sha256; vocabulary; samples; splits
    README.md                         the data card (spfm.data.datacard)
    .spfm-shard-config.json           the run's options; a rerun with other options is refused
    .done/{sample_id}.json            a sample's completion record, written after its shards are in place
    .tmp/{sample_id}/                 a sample's shards while being written

How it survives being killed and scales out:

* Each sample is written by exactly one process into ``.tmp/{sample_id}/``; its shards are renamed into place only
  when the whole sample is written, then its completion record is written atomically. A killed run leaves complete
  shards or temporary files, never a truncated shard under a final name; the owner of a sample clears that sample's
  leftovers before writing it again, so a rerun resumes without duplicates.
* The vocabulary and the split are computed from all samples (every rank computes the same), then the samples are
  divided over ranks (``rank``/``world_size``, or the launcher's ``RANK``/``WORLD_SIZE`` or
  ``SLURM_PROCID``/``SLURM_NTASKS``) and, on one machine, over ``workers`` processes, each taking whole samples.
* The process that finds every sample's completion record writes ``manifest.json`` and the data card.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image

from spfm.atomic import atomic_write_json, read_json_object
from spfm.data.hest import check_sample_id, list_samples, read_metadata, read_sample, sample_ids
from spfm.data.patches import PatchConfig, PatchStats, iter_patches
from spfm.data.records import (
    IMAGE_EXTS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    encode_mask,
    encode_record,
    record_key,
)
from spfm.data.splits import SPLITS, assign_splits
from spfm.data.vocab import build_vocabulary, read_gene_names
from spfm.errors import DataError

logger = logging.getLogger(__name__)

CONFIG_NAME = ".spfm-shard-config.json"
DONE_DIR = ".done"
TMP_DIR = ".tmp"
CARD_NAME = "README.md"
#: Default shard size limits: 10,000 records (about 200 MB of 224 px JPEGs) or 500 MB, whichever comes first.
DEFAULT_MAXCOUNT = 10_000
DEFAULT_MAXSIZE = 500_000_000
#: Every tar member gets this modification time, so rewriting the same sample gives byte-identical shards.
TAR_MTIME = 0.0


def _shard_name(sample_id: str, index: int) -> str:
    return f"{sample_id}-{index:06d}.tar"


def _shard_pattern(sample_id: str) -> re.Pattern:
    """Matches exactly the shard names of ``sample_id`` (sample ids may contain '-', so a glob would not do)."""
    return re.compile(rf"{re.escape(sample_id)}-\d{{6}}\.tar")


# --------------------------------------------------------------------------------------------------------------------
# planning: what every rank computes identically before writing


@dataclass(frozen=True)
class _Plan:
    """The run's options and the per-sample facts every process needs (picklable, sent once to each worker)."""

    root: str
    out: str
    samples: tuple[str, ...]
    genes: tuple[str, ...]
    splits: Mapping[str, str]
    n_spots: Mapping[str, int]
    licenses: Mapping[str, str | None]
    patch: PatchConfig
    image_format: str
    jpeg_quality: int | None
    maxcount: int
    maxsize: int
    config: Mapping[str, Any]
    fingerprint: str

    @property
    def weights(self) -> dict[str, float]:
        """Sample id -> its work: its number of spots."""
        return {sid: float(n) for sid, n in self.n_spots.items()}

    @functools.cached_property
    def vocabulary(self) -> pd.Index:
        """The (V,) vocabulary as an index, built once per process: its hash table is the cost of every lookup."""
        return pd.Index(self.genes)


def _n_obs(path: Path) -> int:
    """Number of spots of an ``.h5ad``, from its ``obs`` index without reading the rest."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            obs = f["obs"]
            index = obs[obs.attrs["_index"]] if isinstance(obs, h5py.Group) else obs
            return int(index.shape[0])
    except (OSError, KeyError) as exc:
        raise DataError(f"cannot read the spot index: {exc}", path=path, field="obs_names") from exc


def _plan(root: Path, out: Path, samples: Sequence[str] | None, genes: str | Sequence[str], patch: PatchConfig,
          image_format: str, jpeg_quality: int, split_fractions: Sequence[float], split_seed: int,
          splits: Mapping[str, str] | None, maxcount: int, maxsize: int) -> _Plan:
    if image_format not in IMAGE_EXTS:
        raise DataError(f"image format must be one of {IMAGE_EXTS}, got {image_format!r}", field="image_format")
    if image_format == "jpg" and not 1 <= int(jpeg_quality) <= 100:
        raise DataError(f"JPEG quality must be in 1..100, got {jpeg_quality}", field="jpeg_quality")
    if maxcount < 1 or maxsize < 1:
        raise DataError(f"maxcount and maxsize must be positive, got {maxcount}, {maxsize}", field="maxcount")
    known = sample_ids(root)
    ids = sorted(set(known if samples is None else samples))
    if not ids:
        raise DataError("no samples to shard (no st/*.h5ad)", path=root / "st")
    for sid in ids:
        check_sample_id(sid)
    missing = sorted(set(ids) - set(known))
    if missing:
        raise DataError(f"sample(s) not in the HEST root: {missing[:10]}", path=root, field="samples")

    table = list_samples(root)
    table = table[table["sample_id"].isin(ids)].reset_index(drop=True)
    st_files = {sid: root / "st" / f"{sid}.h5ad" for sid in ids}
    vocab = build_vocabulary({sid: read_gene_names(st_files[sid]) for sid in ids}, genes, sources=st_files)
    split_of = assign_splits(table, split_fractions, split_seed, explicit=splits)
    n_spots = {sid: _n_obs(st_files[sid]) for sid in ids}
    licenses = {sid: (None if (lic := read_metadata(root, sid).get("license")) in (None, "") else str(lic))
                for sid in ids}

    quality = int(jpeg_quality) if image_format == "jpg" else None
    config = dict(
        format=MANIFEST_FORMAT,
        version=MANIFEST_VERSION,
        samples=ids,
        gene_mode=genes if isinstance(genes, str) else "panel",
        genes=vocab,
        patch=patch.to_dict(),
        image_format=image_format,
        jpeg_quality=quality,
        split_by="patient",
        split_assignment="explicit" if splits is not None else "seeded",
        split_seed=None if splits is not None else int(split_seed),
        split_fractions=None if splits is not None else [float(f) for f in split_fractions],
        splits=split_of,
        maxcount=int(maxcount),
        maxsize=int(maxsize),
    )
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return _Plan(str(root), str(out), tuple(ids), tuple(vocab), split_of, n_spots, licenses, patch, image_format,
                 quality, int(maxcount), int(maxsize), config, fingerprint)


def _prepare_out(out: Path, plan: _Plan, overwrite: bool) -> None:
    """Check the options of an earlier run in ``out`` against this one; write them when new."""
    path = out / CONFIG_NAME
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("fingerprint") == plan.fingerprint:
            return
        if not overwrite:
            changed = sorted(k for k in set(previous) | set(plan.config)
                             if k != "fingerprint" and previous.get(k) != plan.config.get(k))
            raise DataError(
                f"this directory holds shards written with other options (differing: {', '.join(changed)}); "
                "write to a new directory, or pass overwrite=True (--overwrite) to replace them",
                path=path,
            )
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, dict(plan.config, fingerprint=plan.fingerprint))


def _clear(out: Path) -> None:
    """Remove what an earlier run wrote (and only that): shards, completion records, temporaries, manifest, card."""
    for name in (DONE_DIR, TMP_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (MANIFEST_NAME, CARD_NAME, CONFIG_NAME):
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        for shard in (out / split).glob("*.tar"):
            shard.unlink()


def launcher_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments when given, else the launcher's ``RANK``/``WORLD_SIZE`` (torchrun,
    accelerate) or ``SLURM_PROCID``/``SLURM_NTASKS``, else (0, 1)."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world size {world_size})", field="rank")
    return rank, world_size


def partition(weights: Mapping[str, float], parts: int) -> list[list[str]]:
    """Divide samples over ``parts`` ranks, balancing their total weight (spots): largest first to the lightest
    rank. Deterministic, so every rank computes the same division."""
    loads = [0.0] * parts
    out: list[list[str]] = [[] for _ in range(parts)]
    for sid in sorted(weights, key=lambda s: (-weights[s], s)):
        target = min(range(parts), key=lambda r: (loads[r], r))
        out[target].append(sid)
        loads[target] += weights[sid]
    return out


# --------------------------------------------------------------------------------------------------------------------
# one sample


class _HashingFile:
    """A write-only file that hashes and counts what goes through it, so a shard is never read back to checksum."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.sha256.update(data)
        self.nbytes += len(data)
        return len(data)

    def close(self) -> None:
        self._f.close()


_BLOCK = 512
#: tar's record size: an archive ends with two zero blocks, padded to a multiple of this
_RECORD = 20 * _BLOCK
# The parts of a ustar header that are the same for every member, and their byte sum for the checksum (which counts
# its own field as eight spaces): mode 0444, uid 0, gid 0 | mtime | type "0" (regular file), no link, "ustar" "00",
# no owner names, devices or prefix.
_HEADER_IDS = b"0000444\x000000000\x000000000\x00"
_HEADER_MTIME = b"%011o\x00" % int(TAR_MTIME)
_HEADER_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(_BLOCK - 265)
_HEADER_SUM = sum(_HEADER_IDS) + sum(_HEADER_MTIME) + 8 * ord(" ") + sum(_HEADER_TAIL)


def _tar_header(name: str, size: int) -> bytes:
    """One member's ustar header: regular file, mode 0444, owner 0, mtime :data:`TAR_MTIME`.

    Assembled from the constant parts above: only the name and size vary, so the checksum is their byte sum plus a
    constant. Names longer than ustar's 100 bytes get tarfile's PAX header instead.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, int(TAR_MTIME)
        return info.tobuf(tarfile.PAX_FORMAT)
    size_field = b"%011o\x00" % size
    checksum = _HEADER_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, bytes(100 - len(raw)), _HEADER_IDS, size_field, _HEADER_MTIME, b"%06o\x00 " % checksum,
                     _HEADER_TAIL))


class _TarStream:
    """The part of webdataset's TarWriter that ShardWriter uses (``write(record) -> bytes``, ``close()``), with the
    member headers built directly.

    Python's tarfile spends about 80 us building each member's header; a record has four members, so that was a
    seventh of the writer's time per 224 px patch. Same archive content, read back by tarfile, webdataset and
    Hugging Face datasets alike.
    """

    def __init__(self, stream) -> None:
        self.stream = stream
        self.offset = 0

    def write(self, record: dict[str, Any]) -> int:
        key = record["__key__"]
        parts = []
        for ext in sorted(k for k in record if not k.startswith("_")):
            value = record[ext]
            parts += [_tar_header(f"{key}.{ext}", len(value)), value, bytes(-len(value) % _BLOCK)]
        data = b"".join(parts)
        self.stream.write(data)
        self.offset += len(data)
        return len(data)

    def close(self) -> None:
        end = 2 * _BLOCK
        self.stream.write(bytes(end + -(self.offset + end) % _RECORD))


@functools.cache
def _shard_writer_class() -> type:
    """webdataset's ShardWriter (records per shard up to maxcount/maxsize, then the next shard) writing each shard
    through :class:`_TarStream`. Made on first use: importing webdataset imports torch."""
    import webdataset as wds

    class ShardWriter(wds.ShardWriter):
        def next_stream(self) -> None:
            self.finish()
            self.fname = self.pattern % self.shard
            self.shard += 1
            self.tarstream = _TarStream(self.opener(self.fname))
            self.count = 0
            self.size = 0

    return ShardWriter


def _done_path(out: Path, sample_id: str) -> Path:
    return out / DONE_DIR / f"{sample_id}.json"


def _load_done(out: Path, sample_id: str, fingerprint: str) -> dict | None:
    """The sample's completion record if it belongs to this run's options and its shards are all in place."""
    path = _done_path(out, sample_id)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    for shard in record["shards"]:
        file = out / shard["path"]
        # a size check is cheap; verify_shards re-hashes everything when asked
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            return None
    return record


def _counts_matrix(sample, vocabulary: pd.Index, st_path: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """Raw counts of a sample on the vocabulary.

    Args:
        sample: the HestSample; counts from ``layers["counts"]`` when present (X may then be normalised), else X.
        vocabulary: the (V,) vocabulary genes.
        st_path: the sample's ``.h5ad``, named in errors.

    Returns:
        (N, V) float32 CSR with sorted indices and no stored zeros; (V,) bool mask of vocabulary genes measured.
    """
    adata = sample.adata
    field = 'layers["counts"]' if "counts" in adata.layers else "X"
    X = sp.csr_matrix(adata.layers["counts"] if field != "X" else adata.X, dtype=np.float32)
    if field != "X":  # read_sample validated X; the counts layer needs the same checks
        if not np.all(np.isfinite(X.data)):
            raise DataError(f"{int(np.sum(~np.isfinite(X.data)))} NaN or infinite count value(s)", path=st_path,
                            field=field)
        if X.data.size and X.data.min() < 0:
            raise DataError(f"negative count value {X.data.min()}", path=st_path, field=field)
    pos = vocabulary.get_indexer(adata.var_names)  # (n_vars,) vocabulary position, -1 outside it
    measured = np.zeros(len(vocabulary), dtype=bool)
    measured[pos[pos >= 0]] = True
    # renumber every stored value's column onto the vocabulary, dropping genes outside it and stored zeros
    column = pos.astype(np.int32)[X.indices]  # int32 like X.indices: scipy would copy mixed index types
    data, indptr = X.data, X.indptr
    keep = (column >= 0) & (data != 0)
    if not keep.all():
        indptr = np.concatenate(([0], np.cumsum(keep)))[indptr]
        data, column = data[keep], column[keep]
    full = sp.csr_matrix((data, column, indptr), shape=(adata.n_obs, len(vocabulary)))
    measured_pos = pos[pos >= 0]
    if not (X.has_sorted_indices and np.all(measured_pos[1:] > measured_pos[:-1])):
        # the renumbering reordered values within rows (var names not in vocabulary order, or X unsorted): a
        # round trip through column-major order is two linear passes that leave every row sorted, 3-4x faster
        # than sorting each row
        full = full.tocsc().tocsr()
    return full, measured


def _obs_int(adata, column: str) -> list[int | None]:
    if column not in adata.obs:
        return [None] * adata.n_obs
    values = np.asarray(adata.obs[column], dtype=float)
    return [None if not np.isfinite(v) else int(v) for v in values]


def _encode_image(image: np.ndarray, image_format: str, quality: int | None) -> bytes:
    """(H, W, 3) uint8 -> JPEG or PNG bytes."""
    if image_format == "jpg":
        # libjpeg-turbo through imagecodecs: the same bytes as PIL's encoder at this quality (4:2:0), a third faster
        # per patch because the array goes to the codec without becoming a PIL image first
        return imagecodecs.jpeg8_encode(np.ascontiguousarray(image), level=quality)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _write_sample(plan: _Plan, sample_id: str, on_spot: Callable[[int], None] | None = None) -> dict:
    """Write one sample's shards and completion record; return the completion record."""
    out = Path(plan.out)
    split = plan.splits[sample_id]
    st_path = Path(plan.root) / "st" / f"{sample_id}.h5ad"
    tmp = out / TMP_DIR / sample_id
    _done_path(out, sample_id).unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed run: only this process writes this sample
    sample = read_sample(plan.root, sample_id)
    tmp.mkdir(parents=True)
    files: dict[str, _HashingFile] = {}
    records: dict[str, int] = {}
    writer = None
    stats = PatchStats()
    try:
        keys = [record_key(sample_id, str(bc)) for bc in sample.adata.obs_names]
        if len(set(keys)) != len(keys):
            dup = [k for k, n in Counter(keys).items() if n > 1]
            raise DataError(f"{len(dup)} barcode(s) give the same record key once characters outside "
                            f"[A-Za-z0-9_-] are replaced by '-', e.g. {dup[:3]}", path=st_path, field="obs_names")
        counts, measured = _counts_matrix(sample, plan.vocabulary, st_path)
        info = sample.adata.uns["spfm"]
        xy = np.asarray(sample.adata.obsm["spatial"], dtype=np.float64)[:, :2]
        rows, cols = _obs_int(sample.adata, "array_row"), _obs_int(sample.adata, "array_col")
        shared = dict(pixel_size_um=info["pixel_size_um"], technology=info["technology"], organ=info["organ"],
                      species=info["species"], patient=info["patient"], split=split)

        def opener(name: str) -> _HashingFile:
            files[name] = _HashingFile(name)
            return files[name]

        pattern = str(tmp / sample_id).replace("%", "%%") + "-%06d.tar"
        indptr, indices, data = counts.indptr, counts.indices, counts.data
        # the records store uint32 gene indices; int32 column numbers (never negative) are viewed as such, not copied
        indices = indices.view(np.uint32) if indices.dtype == np.int32 else indices.astype(np.uint32)
        for patch in iter_patches(sample, plan.patch, stats):
            if writer is None:  # opened on the first kept patch, so a sample with none writes no empty shard
                writer = _shard_writer_class()(pattern, maxcount=plan.maxcount, maxsize=plan.maxsize, verbose=0,
                                               opener=opener, post=lambda name: files[name].close())
            i = patch.index
            meta = dict(sample_id=sample_id, barcode=patch.barcode, x=float(xy[i, 0]), y=float(xy[i, 1]),
                        array_row=rows[i], array_col=cols[i], **shared)
            lo, hi = indptr[i], indptr[i + 1]
            writer.write(encode_record(keys[i],
                                       _encode_image(patch.image, plan.image_format, plan.jpeg_quality),
                                       plan.image_format, indices[lo:hi], data[lo:hi], meta))
            records[writer.fname] = records.get(writer.fname, 0) + 1
            if on_spot is not None:
                on_spot(1)
        if writer is not None:
            writer.close()
    except BaseException:
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        sample.close()
    if on_spot is not None:
        on_spot(stats.n_spots - stats.n_kept)
    logger.info("%s: %d spots, %d records; dropped %d mostly off tissue (< %g tissue), %d at the slide edge",
                sample_id, stats.n_spots, stats.n_kept, stats.n_dropped_tissue, plan.patch.min_tissue_fraction,
                stats.n_dropped_edge)

    # into place: clear shards an interrupted earlier attempt renamed (no completion record points at them)
    pattern_re = _shard_pattern(sample_id)
    for split_name in SPLITS:
        for old in (out / split_name).glob(f"{sample_id}-*.tar"):
            if pattern_re.fullmatch(old.name):
                old.unlink()
    (out / split).mkdir(parents=True, exist_ok=True)
    shards = []
    for index, name in enumerate(files):  # ShardWriter opens shards in order
        final = out / split / _shard_name(sample_id, index)
        os.replace(name, final)
        shards.append(dict(path=f"{split}/{final.name}", split=split, sample_id=sample_id, records=records[name],
                           bytes=files[name].nbytes, sha256=files[name].sha256.hexdigest()))
    shutil.rmtree(tmp, ignore_errors=True)
    info = sample.adata.uns["spfm"]
    record = dict(
        fingerprint=plan.fingerprint,
        sample_id=sample_id,
        patient=info["patient"],
        organ=info["organ"],
        species=info["species"],
        technology=info["technology"],
        license=plan.licenses.get(sample_id),
        split=split,
        pixel_size_um=info["pixel_size_um"],
        pixel_size_source=info["pixel_size_source"],
        n_spots=int(sample.adata.n_obs),
        n_records=int(stats.n_kept),
        patch_stats=stats.to_dict(),
        measured=encode_mask(measured),
        n_measured=int(measured.sum()),
        shards=shards,
    )
    atomic_write_json(_done_path(out, sample_id), record)
    return record


# worker processes get the plan once, through the pool initializer, instead of with every sample
_WORKER_PLAN: _Plan | None = None


def _init_worker(plan: _Plan) -> None:
    global _WORKER_PLAN
    _WORKER_PLAN = plan
    import torch

    torch.set_num_threads(1)  # one process per core; see _one_torch_thread


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch ops (the patch resize) on one thread: on a 224 px patch a second thread only spins, doubling CPU
    time for no gain in wall time, and parallelism comes from whole-sample worker processes instead."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker_write(sample_id: str) -> dict:
    assert _WORKER_PLAN is not None
    return _write_sample(_WORKER_PLAN, sample_id)


# --------------------------------------------------------------------------------------------------------------------
# the run


def write_shards(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    samples: Sequence[str] | None = None,
    genes: str | Sequence[str] = "union",
    patch: PatchConfig = PatchConfig(),
    image_format: str = "jpg",
    jpeg_quality: int = 90,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    splits: Mapping[str, str] | None = None,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int = DEFAULT_MAXSIZE,
    workers: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    card: bool = True,
    card_path: str | os.PathLike | None = None,
) -> dict[str, Any] | None:
    """Write WebDataset shards of a HEST-layout root (records as in :mod:`spfm.data.records`).

    Args:
        root: the HEST root.
        out_dir: where shards, manifest and data card go.
        samples: sample ids to shard (default: all under ``root/st``).
        genes: ``"union"``, ``"intersection"`` or a panel (list of gene names); see :mod:`spfm.data.vocab`.
        patch: patch size, pixel size, tissue and edge options.
        image_format: ``"jpg"`` or ``"png"``.
        jpeg_quality: JPEG quality (1-100).
        split_fractions, split_seed: the patient split rule (:func:`spfm.data.splits.assign_splits`).
        splits: an explicit sample id -> split mapping instead of the rule.
        maxcount, maxsize: records and bytes per shard before a sample's next shard starts.
        workers: processes on this machine; each writes whole samples.
        rank, world_size: this process's share of the samples (default: from the launcher's environment).
        overwrite: replace shards in ``out_dir`` written with other options instead of raising.
        progress: show a progress bar over spots (over samples with several workers).
        card: write the data card ``README.md`` beside the manifest.
        card_path: also write the data card here (e.g. ``data_cards/my-corpus.md``).

    Returns:
        The manifest, once every sample is done; None when other ranks still have samples to write (the last
        rank to finish writes the manifest).

    With several ranks, ``overwrite=True`` clears the directory from whichever rank starts first; clear an old
    directory before a multi-node launch rather than relying on it.
    """
    root, out = Path(root), Path(out_dir)
    plan = _plan(root, out, samples, genes, patch, image_format, jpeg_quality, split_fractions, split_seed, splits,
                 maxcount, maxsize)
    _prepare_out(out, plan, overwrite)
    rank, world_size = launcher_rank(rank, world_size)
    mine = partition(plan.weights, world_size)[rank]
    todo = [sid for sid in mine if _load_done(out, sid, plan.fingerprint) is None]
    logger.info("rank %d/%d: %d of its %d samples to write (%d samples in all)", rank, world_size, len(todo),
                len(mine), len(plan.samples))
    if todo:
        _run(plan, todo, workers, progress)
    return _finalize(out, plan, card, card_path)


def _run(plan: _Plan, todo: list[str], workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    workers = max(1, min(int(workers), len(todo)))
    if workers == 1:
        with tqdm(total=sum(plan.n_spots[s] for s in todo), unit="spot", desc="shard", disable=not progress) as bar, \
                _one_torch_thread():
            for sid in todo:
                bar.set_postfix_str(sid)
                _write_sample(plan, sid, on_spot=bar.update)
        return
    with tqdm(total=len(todo), unit="sample", desc="shard", disable=not progress) as bar, ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(plan,)
    ) as pool:
        futures = [pool.submit(_worker_write, sid) for sid in todo]  # todo is largest first: better packing
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            bar.update(len(done))
            failed = [f for f in done if f.exception() is not None]
            if failed:
                # samples already running finish (their shards stay valid); the rest wait for a rerun
                for f in pending:
                    f.cancel()
                wait(pending)
                raise failed[0].exception()


def _finalize(out: Path, plan: _Plan, card: bool, card_path: str | os.PathLike | None) -> dict[str, Any] | None:
    done = {}
    for sid in plan.samples:
        record = _load_done(out, sid, plan.fingerprint)
        if record is None:
            logger.info("%s not written yet; the rank that writes the last sample writes the manifest", sid)
            return None
        done[sid] = record
    manifest = build_manifest(plan.config, done)
    path = out / MANIFEST_NAME
    previous = _read_json(path)
    if previous is not None and _without_created(previous) == _without_created(manifest):
        manifest = previous  # nothing changed: keep the file and its creation time
    else:
        atomic_write_json(path, manifest)
        totals = manifest["totals"]
        logger.info("manifest written: %d records in %d shards from %d samples; %d of %d spots dropped (%d mostly off "
                    "tissue, %d at the slide edge)", totals["records"], totals["shards"], totals["samples"],
                    totals["dropped_tissue"] + totals["dropped_edge"], totals["spots"], totals["dropped_tissue"],
                    totals["dropped_edge"])
    if card:
        from spfm.data.datacard import write_data_card

        write_data_card(manifest, out / CARD_NAME)
        if card_path is not None:
            write_data_card(manifest, card_path)
    # every sample is done, so anything left under .tmp is from a killed run
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    return manifest


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _without_created(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


def build_manifest(config: Mapping[str, Any], done: Mapping[str, dict]) -> dict[str, Any]:
    """The manifest from the run's options and every sample's completion record."""
    from spfm import __version__

    sample_fields = ("patient", "organ", "species", "technology", "license", "split", "pixel_size_um",
                     "pixel_size_source", "n_spots", "n_records", "patch_stats", "measured", "n_measured")
    samples = {sid: dict({k: rec[k] for k in sample_fields}, shards=[s["path"] for s in rec["shards"]])
               for sid, rec in sorted(done.items())}
    shards = sorted((s for rec in done.values() for s in rec["shards"]), key=lambda s: s["path"])
    splits = {split: sorted(sid for sid, rec in done.items() if rec["split"] == split) for split in SPLITS}
    patch = dict(config["patch"])
    totals = dict(
        samples=len(samples),
        shards=len(shards),
        records=sum(s["records"] for s in shards),
        bytes=sum(s["bytes"] for s in shards),
        spots=sum(rec["n_spots"] for rec in done.values()),
        dropped_tissue=sum(rec["patch_stats"]["n_dropped_tissue"] for rec in done.values()),
        dropped_edge=sum(rec["patch_stats"]["n_dropped_edge"] for rec in done.values()),
        records_per_split={split: sum(s["records"] for s in shards if s["split"] == split) for split in SPLITS},
    )
    return dict(
        format=MANIFEST_FORMAT,
        version=MANIFEST_VERSION,
        spfm_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        patch=patch,
        image_format=config["image_format"],
        jpeg_quality=config["jpeg_quality"],
        tissue_threshold=dict(min_tissue_fraction=patch["min_tissue_fraction"],
                              tissue_saturation=patch["tissue_saturation"]),
        gene_mode=config["gene_mode"],
        n_genes=len(config["genes"]),
        genes=list(config["genes"]),
        split_by=config["split_by"],
        split_assignment=config["split_assignment"],
        split_seed=config["split_seed"],
        split_fractions=config["split_fractions"],
        splits=splits,
        samples=samples,
        shards=shards,
        totals=totals,
    )


# --------------------------------------------------------------------------------------------------------------------
# reading back


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a shard directory (or the manifest file itself)."""
    path = Path(directory)
    if path.is_dir():
        path = path / MANIFEST_NAME
    manifest = read_json_object(path, "shard manifest (is the shard run finished?)")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"not an {MANIFEST_FORMAT} manifest", path=path, field="format")
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"unsupported manifest version {manifest.get('version')!r} (this spfm reads "
                        f"{MANIFEST_VERSION})", path=path, field="version")
    return manifest


def verify_shards(directory: str | os.PathLike) -> list[str]:
    """Check a shard directory against its manifest.

    Re-hashes every shard and reads it as a tar: checks existence, byte count, sha256, record count and that each
    record has an image, genes, counts and metadata; also reports tar files in the split folders that the manifest
    does not list.

    Returns:
        One line per problem; empty when everything matches.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    listed = set()
    for shard in manifest["shards"]:
        path = directory / shard["path"]
        listed.add(path.resolve())
        if not path.is_file():
            problems.append(f"{shard['path']}: missing")
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems.append(f"{shard['path']}: {size} bytes, manifest says {shard['bytes']}")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != shard["sha256"]:
            problems.append(f"{shard['path']}: sha256 differs from the manifest")
        problems.extend(f"{shard['path']}: {p}" for p in _check_tar(path, shard["records"]))
    for split in SPLITS:
        for path in sorted((directory / split).glob("*.tar")):
            if path.resolve() not in listed:
                problems.append(f"{split}/{path.name}: not listed in the manifest")
    return problems


def _check_tar(path: Path, expected_records: int) -> list[str]:
    members: dict[str, set[str]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                members.setdefault(key, set()).add(ext)
                # reading the data catches members cut short, which the header walk alone can miss
                tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [f"unreadable tar ({exc})"]
    problems = []
    if len(members) != expected_records:
        problems.append(f"{len(members)} records, manifest says {expected_records}")
    required = {"genes.npy", "counts.npy", "json"}
    for key, exts in members.items():
        if not required <= exts or not exts & set(IMAGE_EXTS):
            problems.append(f"record {key!r} is incomplete (has {sorted(exts)})")
            break
    return problems
