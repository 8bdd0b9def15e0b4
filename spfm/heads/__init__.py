"""The heads users run on new tissue, each set up from AnnData, trained with ``.fit()``, results written back.

=============  ======================================================================================
``HisToSGE``   histology -> expression, at measured and denser positions (``layers["predicted"]``)
``SoScope``    resolution enhancement of measured profiles (an AnnData of subspots, ``obs["parent_spot"]``)
``SpatialGlue`` integration of 2-3 modalities on the same spots (``obsm["X_spatialglue"]``, ``obs["domain"]``)
``CellScape``  spatial domains and cell types (``obsm["X_cellscape_spatial"]``, ``obsm["X_cellscape_intrinsic"]``)
=============  ======================================================================================

:func:`spfm.heads.domains.cluster_embedding` turns any embedding into domains the same way for every head.
Names load on first use (PEP 562), so importing one head does not import the others.
"""

from __future__ import annotations

from spfm._lazy import lazy_exports

_EXPORTS = {
    "spfm.heads.histosge": ["HisToSGE"],
    "spfm.heads.soscope": ["SoScope"],
    "spfm.heads.spatialglue": ["SpatialGlue"],
    "spfm.heads.cellscape": ["CellScape"],
    "spfm.heads.domains": ["cluster_embedding"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
