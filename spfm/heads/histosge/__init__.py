"""HisToSGE: histology -> spatial gene expression at measured and denser positions (Shi et al.).

``HisToSGE`` is the AnnData-facing head (:mod:`.head`), ``HisToSGEModel`` its ``nn.Module`` (:mod:`.model`);
:mod:`.inputs` reads and checks AnnData inputs; :mod:`.tasks` has the recovery split, the denser lattice and patch
embedding at new positions; :mod:`.metrics` the per-gene Pearson / MSE / MAE; :mod:`.finetune` LoRA on the
backbone (jointly with the head, ``finetune="lora"``, or as a stage before it); :mod:`.recipe` runs
``spfm predict-expression``; :mod:`.demo` the synthetic-corpus demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spfm.heads.histosge.head import HisToSGE
from spfm.heads.histosge.model import HisToSGEModel

__all__ = ["HisToSGE", "HisToSGEModel", "run_demo_histosge"]


def run_demo_histosge(out_dir: Path, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """HisToSGE on the synthetic corpus; see :func:`spfm.heads.histosge.demo.run_demo_histosge`."""
    from spfm.heads.histosge.demo import run_demo_histosge as run

    return run(out_dir, seed, **kwargs)
