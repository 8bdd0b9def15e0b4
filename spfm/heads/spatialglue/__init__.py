"""SpatialGlue: spatial multi-omics integration (2-3 modalities on the same spots) with dual attention.

- :class:`SpatialGlue` (``head.py``): the AnnData-facing head, ``fit`` / ``transform`` / ``to_config`` /
  ``from_config``; the trained network is ``head.module`` (:class:`model.SpatialGlueModule`).
- ``presets.py``: the reference's datatype presets; ``preprocess.py``: per-modality preprocessing (fitted, replayable);
  ``graphs.py``: spatial and feature graphs; ``demo.py``: :func:`run_demo_spatialglue`.
"""

from spfm.heads.spatialglue.demo import run_demo_spatialglue
from spfm.heads.spatialglue.head import SpatialGlue
from spfm.heads.spatialglue.model import SpatialGlueModule
from spfm.heads.spatialglue.presets import PRESETS

__all__ = ["PRESETS", "SpatialGlue", "SpatialGlueModule", "run_demo_spatialglue"]
