"""Subspot layouts: how a spot is split into K subspots, in which order, and where each subspot sits.

A layout is written as a short string (the CLI's ``--layout``):

==========================  ===  ==================================================================================
``square:A``                A*A  A x A square split (legacy ST, DBiT-seq, binned data); subspot pitch = pitch / A;
                                 row-major order: ``k = i * A + j`` with ``i`` the row (y) and ``j`` the column (x)
``square:A:reference``      A*A  the same split in the soScope reference's order: the centre subspot (odd A) moved
                                 to the end of each block, the others row-major
``visium7``                 7    the paper's Visium merge: one low-resolution spot = a centre Visium spot and its 6
                                 hexagonal neighbours; the 6 neighbours (by angle, starting at +x) then the centre
``visium_split``            7    spfm's split of a real 55 um Visium spot: 7 hexagonally packed sub-circles of
                                 radius R/3 (the densest packing of 7 equal circles in a circle), centres at 2R/3
                                 from the spot centre; the 6 outer ones by angle, then the centre
``cells``                   var  single-cell variant: an explicit region x cell assignment (``parent`` index per cell)
==========================  ===  ==================================================================================

Subspots of spot n are rows ``n*K .. n*K+K-1`` for the fixed layouts (the reference's convention). Offsets are
in units of the spot pitch (centre-to-centre distance of neighbouring low-resolution spots), as (dx, dy) in the
same orientation as ``obsm["spatial"]`` (x = column direction, y = row direction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spfm.errors import DataError

#: Visium spot diameter / centre-to-centre pitch (55 um / 100 um).
VISIUM_SPOT_FRACTION = 0.55


@dataclass(frozen=True)
class Layout:
    """A parsed layout string (see the module docstring)."""

    kind: str
    a: int = 1
    order: str = "row"

    @classmethod
    def parse(cls, spec: "str | Layout") -> "Layout":
        """``"square:5"``, ``"square:3:reference"``, ``"visium7"``, ``"visium_split"`` or ``"cells"``."""
        if isinstance(spec, Layout):
            return spec
        if not isinstance(spec, str) or not spec:
            raise DataError(f"layout must be a string such as 'square:3', got {spec!r}", field="layout")
        parts = spec.strip().lower().replace("-", "_").split(":")
        kind = parts[0]
        if kind == "square":
            if len(parts) not in (2, 3):
                raise DataError(f"square layout is 'square:A' or 'square:A:reference', got {spec!r}", field="layout")
            try:
                a = int(parts[1])
            except ValueError:
                raise DataError(f"square layout side must be an integer, got {parts[1]!r}", field="layout") from None
            if not 2 <= a <= 10:
                raise DataError(f"square layout side must be 2..10 (K = 4..100), got {a}", field="layout")
            order = parts[2] if len(parts) == 3 else "row"
            if order not in ("row", "reference"):
                raise DataError(f"square layout order must be 'row' or 'reference', got {order!r}", field="layout")
            return cls("square", a, order)
        if kind in ("visium7", "visium_split", "cells") and len(parts) == 1:
            return cls(kind)
        raise DataError(f"unknown layout {spec!r}; use square:A[:reference], visium7, visium_split or cells",
                        field="layout")

    @property
    def spec(self) -> str:
        """The layout string this was parsed from (canonical form)."""
        if self.kind == "square":
            return f"square:{self.a}" + (":reference" if self.order == "reference" else "")
        return self.kind

    @property
    def K(self) -> int | None:
        """Subspots per spot (None for ``cells``: it varies)."""
        if self.kind == "square":
            return self.a * self.a
        if self.kind in ("visium7", "visium_split"):
            return 7
        return None

    @property
    def hexagonal(self) -> bool:
        """Whether the low-resolution spots sit on a hexagonal lattice."""
        return self.kind in ("visium7", "visium_split")

    def square_order(self) -> np.ndarray:
        """(K,) permutation: position p of a block holds row-major subspot ``order[p]``."""
        from spfm.data.simulate.merge import square_order

        return square_order(self.a, self.order)

    def grid_offsets(self) -> np.ndarray:
        """(K, 2) integer (row i, col j) of each subspot inside its A x A block, in layout order (square only)."""
        rm = np.stack(np.divmod(np.arange(self.a * self.a), self.a), axis=1)
        return rm[self.square_order()]

    def offsets(self) -> np.ndarray:
        """(K, 2) subspot centre offsets (dx, dy) from the spot centre, in units of the spot pitch."""
        if self.kind == "square":
            ij = self.grid_offsets().astype(np.float64)
            c = (self.a - 1) / 2.0
            return np.stack([(ij[:, 1] - c) / self.a, (ij[:, 0] - c) / self.a], axis=1)
        if self.kind in ("visium7", "visium_split"):
            ang = np.arange(6) * math.pi / 3.0
            ring = np.stack([np.cos(ang), np.sin(ang)], axis=1)
            if self.kind == "visium7":
                # The 7 original spots tile the plane in flowers whose centres are sqrt(7) pitches apart.
                radius = 1.0 / math.sqrt(7.0)
            else:
                radius = VISIUM_SPOT_FRACTION / 2.0 * 2.0 / 3.0
            return np.concatenate([ring * radius, np.zeros((1, 2))], axis=0)
        raise DataError("the 'cells' layout has no fixed offsets; give subspot positions", field="layout")

    def subspot_pitch(self) -> float:
        """Centre-to-centre distance of neighbouring subspots, in spot pitches."""
        if self.kind == "square":
            return 1.0 / self.a
        if self.kind == "visium7":
            return 1.0 / math.sqrt(7.0)
        if self.kind == "visium_split":
            return VISIUM_SPOT_FRACTION / 2.0 * 2.0 / 3.0
        raise DataError("the 'cells' layout has no fixed subspot pitch", field="layout")


def spot_pitch(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance of (N, 2) spot centres (the lattice pitch), N >= 2."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        raise DataError("need at least 2 spots to measure the spot pitch", field='obsm["spatial"]')
    d, _ = cKDTree(xy).query(xy, k=2)
    pitch = float(np.median(d[:, 1]))
    if not pitch > 0:
        raise DataError("spots share coordinates, so the spot pitch is 0", field='obsm["spatial"]')
    return pitch


def subspot_positions(xy: np.ndarray, layout: Layout, pitch: float) -> np.ndarray:
    """(N*K, 2) subspot centres for (N, 2) spot centres, spot n's subspots at rows n*K .. n*K+K-1."""
    off = layout.offsets() * pitch
    return (np.asarray(xy, dtype=np.float64)[:, None, :] + off[None, :, :]).reshape(-1, 2)


def parent_index(n_spots: int, layout: Layout) -> np.ndarray:
    """(N*K,) parent spot of each subspot for a fixed layout."""
    return np.repeat(np.arange(n_spots), layout.K)
