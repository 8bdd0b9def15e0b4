"""Atomic file writes (write to a temporary name in the same directory, then rename) and checked JSON / h5ad reads.

A job killed half-way leaves either the old file or the new one, never a truncated file under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error remove it.

    Args:
        path: the final file (or directory, with ``directory=True``) name.
        directory: create the temporary as a directory (for outputs made of several files).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would have
    try:
        yield tmp
        if directory and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_readable(obj: Any, indent: int = 2) -> str:
    """JSON with objects (and lists holding objects or lists) spread one entry per line, and every list of plain
    values on one line.

    ``json.dumps(indent=...)`` falls back to the pure-Python encoder, which spends ~50 ms on a manifest listing a
    15k-gene vocabulary one name per line; here each flat list goes through the C encoder in one call, and the file
    is shorter to read too. ``json.loads`` gives back the same value.
    """

    def spread(value: Any) -> bool:
        if isinstance(value, dict):
            return bool(value)
        return isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value)

    def encode(value: Any, depth: int) -> str:
        if not spread(value):
            return json.dumps(value)
        pad, inner = " " * (indent * depth), " " * (indent * (depth + 1))
        if isinstance(value, dict):
            items = [f"{inner}{json.dumps(str(k))}: {encode(v, depth + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        return "[\n" + ",\n".join(inner + encode(v, depth + 1) for v in value) + "\n" + pad + "]"

    return encode(obj, 0)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (see :func:`dumps_readable`) to ``path`` atomically."""
    atomic_write_text(path, dumps_readable(obj) + "\n")


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """Read a JSON object from ``path``; a missing file, bad JSON or a non-object raise :class:`DataError`
    naming the file (``what`` says what the file is, e.g. ``"metadata file"``)."""
    from spfm.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found", path=path)
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"invalid JSON: {exc}", path=path) from exc
    if not isinstance(value, dict):
        raise DataError(f"{what} must hold a JSON object", path=path)
    return value


def atomic_write_h5ad(adata: Any, path: str | os.PathLike) -> Path:
    """Write an AnnData to ``path`` atomically (parent folders created); returns the path."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def read_h5ad(path: str | os.PathLike, what: str = "AnnData file", field: str | None = None) -> Any:
    """Read an ``.h5ad`` file; a missing or unreadable file raises :class:`DataError` naming it (and ``field``, the
    option or recipe key that gave the path)."""
    import anndata as ad

    from spfm.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found", path=path, field=field)
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"cannot read {what} as h5ad: {exc}", path=path, field=field) from None
