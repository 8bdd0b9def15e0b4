"""soScope: resolution enhancement of spatial omics profiles (Li, Bao et al., Nat. Commun. 2024).

:class:`SoScope` (AnnData in, an AnnData of K subspots per spot out), the layouts (:mod:`.layouts`), the networks
(:mod:`.model`), the losses (:mod:`.losses`), subspot image features from a registry backbone (:mod:`.image`) and
``run_demo_soscope`` for ``spfm demo``.
"""

from spfm.heads.soscope.head import SoScope
from spfm.heads.soscope.layouts import Layout


def run_demo_soscope(out_dir, seed: int = 0) -> dict:
    """Merge-and-recover demo on simulated data (see :mod:`spfm.heads.soscope.demo`)."""
    from spfm.heads.soscope.demo import run_demo_soscope as _run

    return _run(out_dir, seed)


__all__ = ["Layout", "SoScope", "run_demo_soscope"]
