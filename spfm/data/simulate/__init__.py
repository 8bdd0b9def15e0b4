"""Simulators that keep the ground truth, so a benchmark can score what a head recovers.

- :mod:`spfm.data.simulate.merge`: aggregate a higher-resolution AnnData (cells, small spots) into low-resolution
  spots (a x a squares, hexagonal 7-spot merges), keeping the truth (soScope).
- :mod:`spfm.data.simulate.spatialglue`: the SpatialGlue paper's two-modality simulation, settings 1-5.

Names load on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "spfm.data.simulate.merge": ["merge_spots"],
    "spfm.data.simulate.spatialglue": ["spatialglue_simulation"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'spfm.data.simulate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
