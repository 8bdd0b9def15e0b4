"""CellScape head: spatial domains (z_spatial) and cell types (z_intrinsic) from cell-cell interactions on a
spatial graph and gene-gene interactions on a genomic map (Yan et al.). See :class:`CellScape` and docs/cellscape.md.
"""

from spfm.heads.cellscape.demo import run_demo_cellscape
from spfm.heads.cellscape.head import DEFAULTS, CellScape
from spfm.heads.cellscape.model import CellScapeModule

__all__ = ["CellScape", "CellScapeModule", "DEFAULTS", "run_demo_cellscape"]
