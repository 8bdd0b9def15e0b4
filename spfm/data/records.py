"""The shard record format, in one place: what ``spfm shard`` writes and the loaders read.

A record (one spot) in a WebDataset tar::

    {key}.jpg          the patch (or .png), size_px x size_px RGB at the manifest's patch pixel size
    {key}.genes.npy    uint32 (nnz,) indices into the manifest's gene vocabulary, ascending
    {key}.counts.npy   float32 (nnz,) the values at those indices (raw counts; zeros are not stored)
    {key}.json         sample_id, barcode, x, y (full-resolution pixels), array_row, array_col,
                       pixel_size_um (slide), technology, organ, species, patient, split

The key is ``{sample_id}_{barcode}`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``-``: WebDataset
splits a file name at its first dot, so a key must not contain one. Which vocabulary genes a sample measured at all
(zero or not) is stored once per sample in the manifest as a packed bit mask (:func:`encode_mask`), so loaders can
tell "measured zero" from "not measured".
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "spfm-shards"
MANIFEST_VERSION = 1
IMAGE_EXTS = ("jpg", "png")
GENES_EXT = "genes.npy"
COUNTS_EXT = "counts.npy"
META_EXT = "json"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
#: compact JSON; one encoder for every record (``json.dumps`` with options builds a new one per call)
_JSON = json.JSONEncoder(separators=(",", ":"))


def record_key(sample_id: str, barcode: str) -> str:
    """The WebDataset key of one spot: ``{sample_id}_{barcode}`` with no dots or other unsafe characters."""
    return _KEY_UNSAFE.sub("-", f"{sample_id}_{barcode}")


def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise an array as .npy bytes (no pickle), byte for byte what ``np.save`` writes.

    A 1-D array's header is built here: ``np.save`` spends twice as long on its general header code as on the data
    of a record's genes and counts arrays, and a shard holds two such arrays per spot.
    """
    array = np.asarray(array)
    if array.ndim != 1 or array.dtype.hasobject or array.dtype.names is not None:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return buf.getvalue()
    array = np.ascontiguousarray(array)
    n = str(len(array))
    # numpy's format 1.0: the dict literal, spare spaces for the length to grow to 21 digits, then spaces and a
    # newline so that magic (6 bytes) + header length (2) + header ends on a 64-byte boundary
    header = f"{{'descr': {array.dtype.str!r}, 'fortran_order': False, 'shape': ({n},), }}" + " " * (21 - len(n))
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return b"".join((b"\x93NUMPY\x01\x00", len(header).to_bytes(2, "little"), header.encode("latin1"), array.data))


def npy_load(data: bytes) -> np.ndarray:
    """Read .npy bytes without unpickling."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_record(
    key: str,
    image: bytes,
    image_ext: str,
    gene_index: np.ndarray,
    counts: np.ndarray,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """A record ready for ``webdataset.ShardWriter.write``; every value already bytes."""
    if image_ext not in IMAGE_EXTS:
        raise ValueError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r}")
    return {
        "__key__": key,
        image_ext: image,
        GENES_EXT: npy_bytes(np.asarray(gene_index, dtype=np.uint32)),
        COUNTS_EXT: npy_bytes(np.asarray(counts, dtype=np.float32)),
        META_EXT: _JSON.encode(meta).encode("utf-8"),
    }


def dense_expression(gene_index: np.ndarray, counts: np.ndarray, panel_index: np.ndarray) -> np.ndarray:
    """Expand a sparse record onto a panel.

    Args:
        gene_index: (nnz,) vocabulary indices of the record.
        counts: (nnz,) values.
        panel_index: (G,) vocabulary index of each panel gene (-1 for panel genes absent from the vocabulary).

    Returns:
        (G,) float32 values, zero where the record stores nothing.
    """
    lookup = np.full(int(max(gene_index.max(initial=-1), panel_index.max(initial=-1))) + 2, -1, dtype=np.int64)
    lookup[panel_index[panel_index >= 0]] = np.flatnonzero(panel_index >= 0)
    out = np.zeros(len(panel_index), dtype=np.float32)
    pos = lookup[gene_index.astype(np.int64)]
    keep = pos >= 0
    out[pos[keep]] = counts[keep]
    return out


def encode_mask(mask: np.ndarray) -> str:
    """A boolean (V,) mask as base64 of ``np.packbits`` (compact enough for 60k-gene vocabularies)."""
    return base64.b64encode(np.packbits(np.asarray(mask, dtype=bool)).tobytes()).decode("ascii")


def decode_mask(text: str, length: int) -> np.ndarray:
    """Inverse of :func:`encode_mask`."""
    bits = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return np.unpackbits(bits, count=length).astype(bool)
