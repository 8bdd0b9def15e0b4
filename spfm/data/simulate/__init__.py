"""Simulators that keep the ground truth, so a benchmark can score what a head recovers.

- :mod:`spfm.data.simulate.merge`: aggregate a higher-resolution AnnData (cells, small spots) into low-resolution
  spots (a x a squares, hexagonal 7-spot merges), keeping the truth (soScope).
- :mod:`spfm.data.simulate.spatialglue`: the SpatialGlue paper's two-modality simulation, settings 1-5.

Names load on first use (PEP 562).
"""

from __future__ import annotations

from spfm._lazy import lazy_exports

_EXPORTS = {
    "spfm.data.simulate.merge": ["merge_spots"],
    "spfm.data.simulate.spatialglue": ["spatialglue_simulation"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
