"""HER2ST for benchmarks: the four sections as a HEST root, and a backbone pretrained per fold without its test section.

Benchmarks that compare a backbone "pretrained by spfm on the other sections" with one at random init need, for each
leave-one-out fold, a backbone that never saw the held-out section's patches or expression. :func:`pretrain_fold`
shards the fold's training sections and runs ``spfm.train`` on them with a small recipe; a rerun with the same
work folder reuses what is done.

Import from a benchmark script (``benchmarks/`` is on ``sys.path`` when one runs ``python benchmarks/x.py``)::

    from her2st_folds import HER2ST_SECTIONS, fold_checkpoint, import_her2st, pretrain_fold
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
HER2ST_SECTIONS = ("B4", "C2", "C3", "C4")


def import_her2st(data: Path, root: Path) -> Path:
    """The four HER2ST sections as a HEST root, patient = the section's letter (kept when already there)."""
    from spfm.data.importers import import_legacy_st

    her2st = Path(data) / "her2st"
    if not her2st.is_dir():
        sys.exit(f"{her2st} not found; pass --data")
    for section in HER2ST_SECTIONS:
        if (root / "metadata" / f"{section}.json").is_file():
            continue
        import_legacy_st(her2st / "cnts" / f"{section}.tsv.gz", her2st / "spots" / f"{section}_selection.tsv",
                         her2st / "img" / f"{section}.jpg", section, root, organ="Breast", species="Homo sapiens",
                         patient=section[0])
    return root


def training_panel(root: Path, train_ids: Sequence[str], n_genes: int) -> list[str]:
    """The ``n_genes`` genes measured in every training section with the highest mean log1p count over their spots.

    Chosen from the training sections only. A panel rather than the ~15k-gene union keeps the expression heads
    (D -> G and G -> D layers) smaller than the ViT they train.
    """
    import anndata as ad
    import numpy as np

    means, common = [], None
    for sid in train_ids:
        adata = ad.read_h5ad(root / "st" / f"{sid}.h5ad")
        X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        means.append(dict(zip(adata.var_names.astype(str), np.log1p(X).mean(0))))
        common = set(means[-1]) if common is None else common & set(means[-1])
    score = {g: float(np.mean([m[g] for m in means])) for g in common}
    return sorted(score, key=lambda g: (-score[g], g))[:n_genes]


def pretrain_recipe(shards: Path, out: Path, *, backbone: str, img_size: int, steps: int, seed: int,
                    genes: list[str], batch_size: int = 32) -> dict[str, Any]:
    """The small pretraining recipe a fold runs: expression regression + image-expression InfoNCE, cosine schedule.

    Shards hold 224 px patches at 0.5 um/px (112 um, about one legacy-ST spot); they are resized to ``img_size`` on
    the fly, so the field of view stays the spot's.
    """
    return {
        "data": {"shards": str(shards), "train_split": "train", "genes": genes, "batch_size": batch_size,
                 "shuffle": 500, "resampled": True, "epoch_size": 512, "augment": True, "image_size": img_size,
                 "log1p": True, "num_workers": 0},
        "model": {"backbone": backbone, "pretrained": False, "img_size": img_size},
        "objectives": [{"name": "expression", "weight": 1.0}, {"name": "contrastive", "weight": 0.5}],
        "optim": {"lr": 5e-4, "weight_decay": 0.05, "warmup_steps": max(1, steps // 10), "max_steps": steps,
                  "clip_grad_norm": 1.0, "schedule": "cosine", "min_lr_ratio": 0.05},
        "precision": "no", "seed": seed, "output_dir": str(out), "checkpoint_every": max(1, steps // 4),
        "keep_last": 1, "tracker": "none", "log_every": max(1, steps // 10), "progress": False,
    }


def _fold_prefix(train_ids: Sequence[str]) -> str:
    return f"pretrain_{'-'.join(sorted(train_ids))}"


def fold_checkpoint(work: Path, held_out: str) -> Path:
    """The ``final/`` folder :func:`pretrain_fold` wrote under ``work`` for the fold that holds ``held_out`` out
    (trained on the other sections, any backbone / size / steps / seed: the first in name order)."""
    prefix = _fold_prefix([s for s in HER2ST_SECTIONS if s != held_out])
    found = sorted(Path(work).glob(f"{prefix}_*/final"))
    if not found:
        sys.exit(f"no {prefix}_*/final under {work} (pretrain with her2st_folds.pretrain_fold)")
    return found[0]


def pretrain_fold(root: Path, train_ids: Sequence[str], work: Path, *, backbone: str, img_size: int, steps: int,
                  seed: int = 0, n_genes: int = 1000) -> Path:
    """Shard ``train_ids`` of ``root`` and pretrain ``backbone`` on them; returns the ``final/`` checkpoint folder.

    The folder name carries the training sections, the architecture, the step count and the seed, so folds and
    settings never share one; a finished fold is reused as it is.
    """
    from spfm.data.shards import write_shards
    from spfm.train import train

    tag = f"{_fold_prefix(train_ids)}_{backbone}_{img_size}px_{steps}steps_{n_genes}genes_seed{seed}"
    out = work / tag
    final = out / "final"
    if (final / "config.json").is_file():
        return final
    shards = work / f"shards_{'-'.join(sorted(train_ids))}"
    write_shards(root, shards, samples=sorted(train_ids), splits={s: "train" for s in train_ids}, progress=False,
                 card=False, overwrite=True)
    genes = training_panel(root, train_ids, n_genes)
    train(pretrain_recipe(shards, out, backbone=backbone, img_size=img_size, steps=steps, seed=seed, genes=genes),
          resume=(out / "checkpoints").is_dir())
    return final
