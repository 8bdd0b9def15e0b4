"""Training loader over spfm WebDataset shards (the output of ``spfm shard``).

One webdataset pipeline, run in each DataLoader worker::

    shards of the split (from the manifest)      shuffled per epoch, identically on every rank
      -> split_by_node -> split_by_worker         each rank, then each worker, reads a disjoint subset
      or ResampledShards                          (resampled=True) each rank and worker draws shards with replacement
    -> tar reading                                records counted against the manifest: truncation is detected
    -> shuffle buffer                             seeded from (seed, epoch, rank, worker); records still encoded
    -> parse                                      JSON metadata; sparse expression onto the gene panel, with its mask
    -> decode (+ augment)                         make_dataset: per sample, a (3, H, W) uint8 tensor
       or decode (+ augment) into the batch       make_loader: straight into a float32 batch buffer

Randomness is a function of ``(seed, epoch, rank, worker)`` only, so a run repeats exactly; the loader advances the
epoch each time it is iterated (or set it with :meth:`ShardLoader.set_epoch` when resuming).

Distributed training: ranks come from ``RANK``/``WORLD_SIZE`` (set by torchrun and ``accelerate launch``) or from an
initialised ``torch.distributed`` group. Without resampling each rank reads a disjoint subset of the shards, so ranks
can see different numbers of batches; for DDP prefer ``resampled=True`` with ``epoch_size`` (webdataset's
recommended mode), which gives every rank the same number of batches. Keep the loader out of
``accelerator.prepare`` (it is not a ``DataLoader``; Accelerate would pass it through anyway) and move batches to the
device yourself.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset
from webdataset.utils import make_seed, pytorch_worker_info

try:  # torchvision's image codecs are deprecated in favour of TorchCodec (0.29); PIL takes over once they are gone
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _tv_decode_image
except ImportError:
    _tv_decode_image = None

from spfm.data import records
from spfm.data.augment import Augment
from spfm.data.shards import read_manifest
from spfm.errors import DataError

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
_ON_ERROR = ("raise", "skip")
# Distinct salts so the shuffle buffer and the augmentations of one worker draw independent streams.
_SALT_SHUFFLE = 1
_SALT_AUGMENT = 2


# ----------------------------------------------------------------------------------------------------------------
# Manifest


def _load_manifest(source: str | Path) -> tuple[Path, dict[str, Any]]:
    """The manifest path and its checked content; ``source`` is a shard directory or the manifest file."""
    path = Path(source)
    if path.is_dir():
        path = path / records.MANIFEST_NAME
    manifest = read_manifest(path)  # format and version
    for field, kind in (("genes", list), ("samples", dict), ("shards", list)):
        if not isinstance(manifest.get(field), kind):
            raise DataError(f"missing or not a {kind.__name__}", path=path, field=field)
    return path, manifest


def _split_shards(path: Path, manifest: dict[str, Any], split: str | None) -> list[dict[str, Any]]:
    """The manifest's shard entries of ``split`` (all of them for None), in manifest order."""
    shards = manifest["shards"]
    if split is not None:
        known = set(manifest.get("splits") or {}) | {entry.get("split") for entry in shards}
        if split not in known:
            raise DataError(f"no split {split!r}; the manifest has {sorted(map(str, known))}", path=path,
                            field="splits")
        shards = [entry for entry in shards if entry.get("split") == split]
    if not shards:
        raise DataError(f"no shards for split {split!r}", path=path, field="shards")
    for i, entry in enumerate(shards):
        if not isinstance(entry.get("path"), str) or not isinstance(entry.get("records"), int):
            raise DataError("a shard entry needs a relative 'path' and a 'records' count", path=path,
                            field=f"shards[{i}]")
    return shards


def hf_data_files(source: str | Path) -> dict[str, list[str]]:
    """Shard paths per split, as ``datasets.load_dataset("webdataset", data_files=...)`` takes them.

    Args:
        source: a shard directory or its ``manifest.json``.

    Returns:
        ``{split: [absolute tar paths]}`` for every split that has shards.

    Example::

        ds = datasets.load_dataset("webdataset", data_files=hf_data_files("shards/"), split="train")
        ds[0]["jpg"], ds[0]["genes.npy"], ds[0]["counts.npy"], ds[0]["json"]
    """
    path, manifest = _load_manifest(source)
    files: dict[str, list[str]] = {}
    for entry in manifest["shards"]:
        files.setdefault(str(entry["split"]), []).append(str(path.parent / entry["path"]))
    return files


def _panel(path: Path, vocabulary: Sequence[str], genes: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    """The panel's gene names and (G,) int64 vocabulary index of each (-1 for genes not in the vocabulary)."""
    if genes is None:
        return list(vocabulary), np.arange(len(vocabulary), dtype=np.int64)
    if isinstance(genes, str):
        raise TypeError("genes must be a sequence of gene names, not a single string")
    names = [str(g) for g in genes]
    if len(set(names)) != len(names):
        dup = sorted({g for g in names if names.count(g) > 1})
        raise ValueError(f"the gene panel lists genes more than once: {dup[:10]}")
    where = {g: i for i, g in enumerate(vocabulary)}
    index = np.array([where.get(g, -1) for g in names], dtype=np.int64)
    if not (index >= 0).any():
        raise DataError(
            f"none of the {len(names)} panel genes (first: {names[:5]}) is in the shards' vocabulary of "
            f"{len(vocabulary)} genes",
            path=path,
            field="genes",
        )
    return names, index


# ----------------------------------------------------------------------------------------------------------------
# Pipeline stages. Each is a small picklable object so DataLoader workers can receive the pipeline under any
# multiprocessing start method. They share one _EpochState, which pickles as one object with the pipeline.


class _EpochState:
    """The seed and the current epoch, read by every random stage when an epoch starts."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0


class _ShardList(IterableDataset):
    """First stage: yields ``{"url": shard path}``."""

    def __init__(self, urls: list[str], state: _EpochState, *, shuffle: bool, resampled: bool) -> None:
        super().__init__()
        self.urls = urls
        self.state = state
        self.shuffle = shuffle
        self.resampled = resampled

    def __iter__(self) -> Iterator[dict[str, str]]:
        if self.resampled:
            # ResampledShards seeds itself from (rank, worker) and the seed given here, so every rank and worker
            # draws its own endless stream, reproducibly.
            yield from wds.ResampledShards(self.urls, seed=make_seed(self.state.seed, self.state.epoch),
                                           deterministic=True)
            return
        urls = list(self.urls)
        if self.shuffle:
            # The same permutation on every rank and worker (no rank in the seed), so split_by_node and
            # split_by_worker afterwards cut it into disjoint parts that together cover every shard.
            random.Random(make_seed(self.state.seed, self.state.epoch)).shuffle(urls)
        for url in urls:
            yield {"url": url}


def _fail(error: DataError, on_error: str) -> None:
    """Raise ``error`` or, with on_error="skip", log it as a warning and carry on."""
    if on_error == "raise":
        raise error
    log.warning("%s (skipped)", error)


def _reason(exn: BaseException) -> str:
    # webdataset appends the stream and URL to an exception's args; the first arg is the readable part.
    text = str(exn.args[0]) if exn.args else ""
    return f"{type(exn).__name__}: {text}" if text else type(exn).__name__


class _ReadShards:
    """Shard URLs -> raw records (dicts of bytes keyed by extension, plus ``__key__`` and ``__url__``).

    A tar truncated at a member boundary, or with a garbled header, ends early without any error from ``tarfile``;
    counting records against the manifest turns that into an error too.
    """

    def __init__(self, expected: dict[str, int], on_error: str) -> None:
        self.expected = expected
        self.on_error = on_error

    def __call__(self, src: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for shard in src:
            url = shard["url"]
            n = 0
            try:
                for sample in wds.tarfile_samples([{"url": url}]):
                    n += 1
                    yield sample
                expected = self.expected.get(url)
                if expected is not None and n != expected:
                    raise DataError(
                        f"read {n} records but the manifest lists {expected}: the shard is truncated or corrupt",
                        path=url,
                        field="records",
                    )
            except DataError as exn:
                _fail(exn, self.on_error)
            except Exception as exn:  # tarfile, OS and gzip errors, whatever the cause
                error = DataError(f"unreadable, corrupt or truncated shard (after {n} records): {_reason(exn)}",
                                  path=url)
                error.__cause__ = exn
                _fail(error, self.on_error)


class _Shuffle:
    """A shuffle buffer of ``bufsize`` records, seeded from (seed, epoch, rank, worker)."""

    def __init__(self, bufsize: int, state: _EpochState) -> None:
        self.bufsize = bufsize
        self.state = state

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(make_seed(self.state.seed, self.state.epoch, rank, worker, _SALT_SHUFFLE))
        return wds.shuffle(self.bufsize, rng=rng)(src)


# The header np.save writes for a 1-D C-order array (records.npy_bytes); anything else goes through np.load.
_NPY_1D = re.compile(rb"\{'descr': '([<>|][a-z][0-9]+)', 'fortran_order': False, 'shape': \(([0-9]+),\), \} *\n")


def _npy_1d(data: bytes) -> np.ndarray:
    """Read a record's .npy bytes: a 1-D array as a read-only view of ``data``.

    ``np.load`` parses each header with ``ast.literal_eval``, which costs more than the rest of a record's
    non-image decoding together; the fixed header of a 1-D array is matched directly instead.
    """
    if data[:8] == b"\x93NUMPY\x01\x00":
        start = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_1D.fullmatch(data, 10, start)
        if match:
            return np.frombuffer(data, dtype=match[1].decode("ascii"), count=int(match[2]), offset=start)
    return records.npy_load(data)


@functools.cache
def _torchvision_decodes() -> bool:
    """Whether torchvision's native image decoder works in this install (it is an optional C++ extension)."""
    if _tv_decode_image is None:
        return False
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 150)).save(buf, format="JPEG")
    try:
        _tv_decode_image(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError):
        return False
    return True


def decode_image(data: bytes) -> torch.Tensor:
    """Decode JPEG or PNG bytes to a (3, H, W) uint8 RGB tensor.

    torchvision's libjpeg-turbo decoder writes the tensor directly (no PIL image, no NumPy round trip); PIL is the
    fallback where torchvision's image extension is missing.
    """
    if _torchvision_decodes():
        # bytearray: torch.frombuffer needs a writable buffer; copying ~20 kB costs far less than the decode.
        return _tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    with Image.open(io.BytesIO(data)) as image:
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)


class _Parse:
    """Raw record -> ``{"expression", "mask", "meta", "key", "__url__"}`` over the gene panel, plus the still
    encoded image under its extension (``"jpg"`` or ``"png"``), decoded later by :func:`_take_image`."""

    def __init__(
        self,
        vocab_size: int,
        panel_index: np.ndarray,
        sample_masks: dict[str, torch.Tensor],
        *,
        log1p: bool,
        target_sum: float | None,
        on_error: str,
    ) -> None:
        # (V,) vocabulary index -> panel position (-1: not in the panel), built once rather than per record.
        self.lookup = np.full(vocab_size, -1, dtype=np.int64)
        self.lookup[panel_index[panel_index >= 0]] = np.flatnonzero(panel_index >= 0)
        # the default panel is the vocabulary itself: records' indices are already panel positions
        self.whole_vocabulary = np.array_equal(panel_index, np.arange(vocab_size))
        self.n_genes = len(panel_index)
        self.sample_masks = sample_masks
        self.log1p = log1p
        self.target_sum = target_sum
        self.on_error = on_error

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in src:
            try:
                sample = self.parse(raw)
            except DataError as exn:
                _fail(exn, self.on_error)
                continue
            yield sample

    def parse(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = raw.get("__key__")
        field = records.META_EXT
        try:
            meta = json.loads(raw[field])
            field = f"{records.META_EXT}:sample_id"
            mask = self.sample_masks.get(meta["sample_id"])
            if mask is None:
                raise DataError(f"the record's sample {meta['sample_id']!r} is not among the manifest samples of "
                                f"the shards read", path=raw.get("__url__"), field=f"{key}.{field}")
            field = records.GENES_EXT
            # uint32 on disk; NumPy's fancy indexing with intp indices is ~3x faster than with uint32
            gene_index = _npy_1d(raw[field]).astype(np.intp)
            field = records.COUNTS_EXT
            counts = _npy_1d(raw[field])
            if gene_index.shape != counts.shape:
                raise ValueError(f"{records.GENES_EXT} has shape {gene_index.shape}, counts {counts.shape}")
            expression = np.zeros(self.n_genes, dtype=np.float32)
            if self.whole_vocabulary:
                expression[gene_index] = counts
            else:
                position = self.lookup[gene_index]
                keep = position >= 0
                expression[position[keep]] = counts[keep]
            if self.target_sum is not None:
                # library size over everything the spot measured, not just the panel (as scanpy's normalize_total)
                total = float(counts.sum())
                if total > 0:
                    expression *= self.target_sum / total
            if self.log1p:
                np.log1p(expression, out=expression)
            field = next((ext for ext in records.IMAGE_EXTS if ext in raw), records.IMAGE_EXTS[0])
            image = raw[field]
        except DataError:
            raise
        except Exception as exn:
            error = DataError(f"cannot decode record: {_reason(exn)}", path=raw.get("__url__"),
                              field=f"{key}.{field}")
            raise error from exn
        return {field: image, "expression": torch.from_numpy(expression), "mask": mask, "meta": meta, "key": key,
                "__url__": raw.get("__url__")}


def _take_image(sample: dict[str, Any]) -> torch.Tensor:
    """Decode and remove a parsed sample's encoded image; a DataError names the shard and the tar member."""
    ext = next(ext for ext in records.IMAGE_EXTS if ext in sample)
    try:
        return decode_image(sample.pop(ext))
    except Exception as exn:
        error = DataError(f"cannot decode record: {_reason(exn)}", path=sample["__url__"],
                          field=f"{sample['key']}.{ext}")
        raise error from exn


def _augment_generator(state: _EpochState) -> torch.Generator:
    """The augmentation generator of this rank and worker for the current epoch."""
    rank, _, worker, _ = pytorch_worker_info()
    return torch.Generator().manual_seed(make_seed(state.seed, state.epoch, rank, worker, _SALT_AUGMENT))


class _DecodeImages:
    """Per-sample stage (make_dataset): decode each image to a (3, H, W) uint8 tensor and optionally augment it."""

    def __init__(self, augment: Augment | None, state: _EpochState, on_error: str) -> None:
        self.augment = augment
        self.state = state
        self.on_error = on_error

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        generator = _augment_generator(self.state) if self.augment else None
        for sample in src:
            try:
                image = _take_image(sample)
            except DataError as exn:
                _fail(exn, self.on_error)
                continue
            sample["image"] = self.augment(image, generator) if self.augment else image
            yield sample


class Collate:
    """Per-sample dicts (as :func:`make_dataset` yields) -> a batch; use as a DataLoader's ``collate_fn``.

    Args:
        normalize: optional ``(mean, std)`` per RGB channel, applied to images scaled to [0, 1].

    Returns (when called on a list of B samples):
        ``image`` (B, 3, H, W) float32 in [0, 1] (or normalised) in channels-last memory format, ``expression``
        (B, G) float32, ``mask`` (B, G) bool, ``meta`` list of B dicts, ``key`` list of B str.

    Images stay in the (H, W, 3) memory order they decode to: a channels-last batch needs no transposition, which
    would cost more than the uint8 -> float conversion itself. Convolutions and patch embeddings take channels-last
    input as is (often faster on GPU); call ``.contiguous()`` where code needs ``.view``.
    """

    def __init__(self, normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
        # (x / 255 - mean) / std == x * scale + bias, per channel (the last axis of an (H, W, 3) image)
        self.scale: np.ndarray = np.float32(1 / 255)
        self.bias: np.ndarray | None = None
        if normalize is not None:
            mean, std = (np.asarray(v, dtype=np.float64).ravel() for v in normalize)
            if mean.size != 3 or std.size != 3 or not (std > 0).all():
                raise ValueError(f"normalize must be (mean, std) with 3 values each and std > 0, got {normalize}")
            self.scale = (1.0 / (255.0 * std)).astype(np.float32)
            self.bias = (-mean / std).astype(np.float32)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images: np.ndarray | None = None
        for i, sample in enumerate(samples):
            images = self.put(images, len(samples), i, sample["image"], sample)
        return self.finish(images, samples)

    def put(self, images: np.ndarray | None, batch_size: int, i: int, image: torch.Tensor,
            sample: dict[str, Any]) -> np.ndarray:
        """Scale ``image`` ((3, H, W) uint8) into row ``i`` of the (B, H, W, 3) float32 batch, made on first use."""
        if image.dtype != torch.uint8:
            raise TypeError(f"Collate expects uint8 images, got {image.dtype} for {sample['key']!r}")
        hwc = image.permute(1, 2, 0).numpy()  # a contiguous view for decoded images
        if images is None:
            images = np.empty((batch_size, *hwc.shape), dtype=np.float32)
        elif hwc.shape != images.shape[1:]:
            raise DataError(
                f"image shape {tuple(image.shape)} differs from the batch's {(images.shape[3], *images.shape[1:3])}",
                path=sample.get("__url__"),
                field=f"{sample['key']}.image",
            )
        # NumPy rather than torch: single-threaded, so no OpenMP fork/join per image when loading in the training
        # process (which costs more than the conversion on a busy machine); the row is scaled while in cache.
        row = images[i]
        np.copyto(row, hwc, casting="unsafe")
        np.multiply(row, self.scale, out=row)
        if self.bias is not None:
            np.add(row, self.bias, out=row)
        return images

    def finish(self, images: np.ndarray, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch dict from the filled (B, H, W, 3) images and their samples."""
        return {
            "image": torch.from_numpy(images).permute(0, 3, 1, 2),
            "expression": torch.from_numpy(np.stack([s["expression"].numpy() for s in samples])),
            "mask": torch.from_numpy(np.stack([s["mask"].numpy() for s in samples])),
            "meta": [s["meta"] for s in samples],
            "key": [s["key"] for s in samples],
        }


class _Batch:
    """Batching stage of make_loader: decodes (and augments) each image straight into the batch's float buffer.

    Decoding here rather than per sample means one decoded image is alive at a time: its buffer is reused by the
    allocator for the next, instead of a batch's worth of fresh allocations (page faults) per batch, and the copy
    into the batch reads it while it is still in cache.
    """

    def __init__(self, batch_size: int, collate: Collate, augment: Augment | None, state: _EpochState, *,
                 drop_last: bool, on_error: str) -> None:
        self.batch_size = batch_size
        self.collate = collate
        self.augment = augment
        self.state = state
        self.drop_last = drop_last
        self.on_error = on_error

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        generator = _augment_generator(self.state) if self.augment else None
        samples: list[dict[str, Any]] = []
        images: np.ndarray | None = None
        for sample in src:
            try:
                image = _take_image(sample)
            except DataError as exn:
                _fail(exn, self.on_error)
                continue
            if self.augment:
                image = self.augment(image, generator)
            images = self.collate.put(images, self.batch_size, len(samples), image, sample)
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield self.collate.finish(images, samples)
                samples, images = [], None
        if samples and not self.drop_last:
            yield self.collate.finish(images[: len(samples)], samples)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


class ShardDataset(wds.DataPipeline):
    """The webdataset pipeline :func:`make_dataset` returns; iterate it for per-sample dicts.

    Attributes:
        manifest_path: the manifest it was built from.
        genes: the panel's gene names, in the order of ``expression`` and ``mask``.
        shards: the shard paths of the split.
        num_records: records in those shards (one pass without resampling, over all ranks and workers).
    """

    def __init__(self, *stages: Any, state: _EpochState, manifest_path: Path, genes: list[str], shards: list[str],
                 num_records: int) -> None:
        super().__init__(*stages)
        self.state = state
        self.manifest_path = manifest_path
        self.genes = genes
        self.shards = shards
        self.num_records = num_records

    @property
    def epoch(self) -> int:
        """The epoch the next pass will use."""
        return self.state.epoch

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds shard order, shuffle buffer and augmentations of the next pass."""
        self.state.epoch = int(epoch)


def _build(
    source: str | Path,
    *,
    split: str | None,
    genes: Sequence[str] | None,
    shuffle: int,
    resampled: bool,
    seed: int,
    on_error: str,
    log1p: bool,
    target_sum: float | None,
) -> ShardDataset:
    """The pipeline up to parsed records (images still encoded); make_dataset and make_loader add the tail."""
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
    if shuffle < 0:
        raise ValueError(f"shuffle must be >= 0, got {shuffle}")
    if target_sum is not None and not target_sum > 0:
        raise ValueError(f"target_sum must be positive, got {target_sum}")
    path, manifest = _load_manifest(source)
    entries = _split_shards(path, manifest, split)
    vocabulary = [str(g) for g in manifest["genes"]]
    names, panel_index = _panel(path, vocabulary, genes)

    # The mask of each sample in the split, over the panel: measured in the sample and present in the vocabulary.
    sample_masks: dict[str, torch.Tensor] = {}
    for entry in entries:
        sid = entry.get("sample_id")
        if sid in sample_masks:
            continue
        info = manifest["samples"].get(sid)
        if not isinstance(info, dict) or "measured" not in info:
            raise DataError(f"shard {entry['path']} belongs to sample {sid!r}, which has no 'measured' gene mask",
                            path=path, field=f"samples.{sid}.measured" if isinstance(info, dict) else "samples")
        try:
            measured = records.decode_mask(info["measured"], len(vocabulary))
        except (ValueError, TypeError) as exn:
            raise DataError(f"not a gene mask: {exn}", path=path, field=f"samples.{sid}.measured") from exn
        sample_masks[sid] = torch.from_numpy(measured[np.maximum(panel_index, 0)] & (panel_index >= 0))

    urls = [str(path.parent / entry["path"]) for entry in entries]
    rank, world_size, _, _ = pytorch_worker_info()
    if not resampled and world_size > len(urls):
        log.warning("%d shards for %d ranks: rank %d may get no data; use resampled=True", len(urls), world_size,
                    rank)
    state = _EpochState(seed)
    stages: list[Any] = [_ShardList(urls, state, shuffle=shuffle > 0, resampled=resampled)]
    if not resampled:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(_ReadShards({url: entry["records"] for url, entry in zip(urls, entries)}, on_error))
    if shuffle > 0:
        stages.append(_Shuffle(shuffle, state))
    stages.append(_Parse(len(vocabulary), panel_index, sample_masks, log1p=log1p, target_sum=target_sum,
                         on_error=on_error))
    return ShardDataset(*stages, state=state, manifest_path=path, genes=names, shards=urls,
                        num_records=sum(entry["records"] for entry in entries))


def _augmenter(augment: bool | Augment | None) -> Augment | None:
    """``augment=True`` means the default :class:`Augment`."""
    return Augment() if augment is True else (augment or None)


def make_dataset(
    source: str | Path,
    *,
    split: str | None = "train",
    genes: Sequence[str] | None = None,
    shuffle: int = 1000,
    resampled: bool = False,
    augment: bool | Augment = False,
    seed: int = 0,
    on_error: OnError = "raise",
    log1p: bool = False,
    target_sum: float | None = None,
) -> ShardDataset:
    """A webdataset pipeline over the shards of one split, yielding per-sample dicts.

    Args:
        source: a shard directory (with ``manifest.json``) or the manifest file.
        split: ``"train"``, ``"val"``, ``"test"``, or None for every shard.
        genes: the gene panel (default: the manifest's whole vocabulary, in its order). Panel genes absent from the
            vocabulary are all-zero and unmeasured everywhere; a panel with no vocabulary gene is a DataError.
        shuffle: shuffle-buffer size in records; 0 keeps the manifest's shard order and each shard's record order
            (evaluation). Above 0, shards are shuffled too.
        resampled: draw shards with replacement, an endless stream per rank and worker (use with an epoch size).
        augment: True for :class:`Augment` with its defaults, or an ``Augment``.
        seed: seeds shard order, shuffle buffer and augmentations together with the epoch (see ``set_epoch``).
        on_error: ``"raise"``: a corrupt or truncated shard, or an undecodable record, raises a DataError naming
            the shard; ``"skip"``: log a warning and skip the rest of that shard (or that record).
        log1p: return ``log(1 + x)`` of the expression.
        target_sum: scale each spot's counts to this total (over all its genes, not only the panel) first.

    Yields:
        dicts with ``image`` (3, H, W) uint8 tensor (a view of (H, W, 3) memory), ``expression`` (G,) float32
        tensor, ``mask`` (G,) bool tensor (True where the record's sample measured the gene), ``meta`` (the
        record's JSON), ``key`` and ``__url__`` (the shard). Batch them with :class:`Collate`.
    """
    dataset = _build(source, split=split, genes=genes, shuffle=shuffle, resampled=resampled, seed=seed,
                     on_error=on_error, log1p=log1p, target_sum=target_sum)
    dataset.append(_DecodeImages(_augmenter(augment), dataset.state, on_error))
    return dataset


def _identity(batch: Any) -> Any:
    """The DataLoader's collate_fn: batches arrive ready, so skip its default_convert walk over every field."""
    return batch


class ShardLoader(wds.WebLoader):
    """A ``WebLoader`` (DataLoader with webdataset's fluid interface) that advances the epoch on every pass.

    Attributes:
        dataset: the :class:`ShardDataset` it loads (``.genes``, ``.num_records``).
    """

    def __init__(self, dataset: ShardDataset, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        # Batches are made inside the pipeline (in the workers); the DataLoader only moves them.
        super().__init__(dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                         collate_fn=_identity)
        self.dataset = dataset
        self.next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (to resume a run)."""
        self.next_epoch = int(epoch)

    def iterator1(self) -> Iterator[dict[str, Any]]:
        # Set the epoch in this process before the DataLoader starts its workers, which copy the pipeline.
        self.dataset.set_epoch(self.next_epoch)
        self.next_epoch += 1
        return super().iterator1()


def make_loader(
    source: str | Path,
    *,
    split: str | None = "train",
    genes: Sequence[str] | None = None,
    batch_size: int = 32,
    shuffle: int = 1000,
    resampled: bool = False,
    augment: bool | Augment = False,
    num_workers: int = 0,
    epoch_size: int | None = None,
    seed: int = 0,
    on_error: OnError = "raise",
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    log1p: bool = False,
    target_sum: float | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> ShardLoader:
    """An iterable of training batches over the shards of one split.

    Arguments as :func:`make_dataset`, plus:

    Args:
        batch_size: records per batch (each worker batches its own records).
        num_workers: DataLoader worker processes (0 loads in this process).
        epoch_size: records per epoch on this rank, rounded up to whole batches. Required to end an epoch with
            ``resampled=True``; without resampling it cuts or repeats passes over the split.
        normalize: ``(mean, std)`` per RGB channel for the [0, 1] images.
        drop_last: drop each worker's last, incomplete batch.
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.

    Returns:
        A :class:`ShardLoader` yielding dicts: ``image`` (B, 3, H, W) float32 (channels-last memory format, see
        :class:`Collate`), ``expression`` (B, G) float32, ``mask`` (B, G) bool, ``meta`` list of dicts, ``key``
        list of str. ``loader.dataset.genes`` names the G panel genes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epoch_size is not None and epoch_size < 1:
        raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")
    if resampled and epoch_size is None:
        raise ValueError("resampled=True streams without end: give epoch_size")
    collate = Collate(normalize)
    dataset = _build(source, split=split, genes=genes, shuffle=shuffle, resampled=resampled, seed=seed,
                     on_error=on_error, log1p=log1p, target_sum=target_sum)
    dataset.append(_Batch(batch_size, collate, _augmenter(augment), dataset.state, drop_last=drop_last,
                          on_error=on_error))
    loader = ShardLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)
    if epoch_size is not None:
        loader = loader.with_epoch(math.ceil(epoch_size / batch_size))
    return loader
