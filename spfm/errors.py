"""Exceptions raised by spfm.

Every error about bad input names the file (or directory) and the field at fault, so a user reading a traceback
from a long job knows exactly what to fix.
"""

from __future__ import annotations

from os import PathLike


class SpfmError(Exception):
    """Base class for spfm's own errors."""


class DataError(SpfmError, ValueError):
    """Bad input data: a missing file, a malformed field, values out of range.

    Args:
        message: what is wrong, in words.
        path: the file or directory at fault.
        field: the key, column or attribute at fault inside it (``obsm["spatial"]``, ``pixel_size_um_estimated``).
    """

    def __init__(self, message: str, *, path: str | PathLike | None = None, field: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.field = field
        where = ": ".join(part for part in (self.path, field) if part)
        super().__init__(f"{where}: {message}" if where else message)
