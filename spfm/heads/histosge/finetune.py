"""Fine-tune the backbone on the training slides (LoRA by default) before HisToSGE uses its features.

The published model freezes its pathology backbone (UNI). spfm's option adapts it to the tissue first: the training
slides become WebDataset shards (:func:`spfm.data.shards.write_shards`), and :func:`spfm.train.train` fits the
backbone with an expression-regression objective over the slides' genes, LoRA adapters on the attention
projections (``spfm.models.finetune.prepare_for_finetuning(mode="lora")``; ``"last_k"``/``"full"`` also work).
The adapters are merged into the saved backbone, whose embeddings then feed HisToSGE as usual. This is two-stage
(fine-tune, then fit the head on frozen features), not joint training of backbone and head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spfm.errors import DataError


def finetune_backbone(root: str | os.PathLike, train_ids: Sequence[str], out_dir: str | os.PathLike, *,
                      backbone: str, patch: Any, checkpoint: str | os.PathLike | None = None,
                      pretrained: bool = False, img_size: int | None = None, mode: str = "lora", steps: int = 200,
                      batch_size: int = 32, lr: float = 1e-3, lora_r: int = 8, seed: int = 0,
                      progress: bool = False) -> Path:
    """Fine-tune ``backbone`` on ``train_ids`` of a HEST root; returns the saved backbone folder (``final/``).

    Reruns reuse a finished ``out_dir/train/final``.
    """
    from spfm.data.shards import write_shards
    from spfm.train import train

    if not train_ids:
        raise DataError("no training slides to fine-tune on", field="data.train")
    if mode not in ("lora", "last_k", "full"):
        raise DataError(f"backbone fine-tuning mode must be lora, last_k or full, got {mode!r}",
                        field="backbone.finetune.mode")
    out_dir = Path(out_dir)
    final = out_dir / "train" / "final"
    if (final / "config.json").is_file():
        return final
    shards = out_dir / "shards"
    write_shards(root, shards, samples=list(train_ids), patch=patch, splits={s: "train" for s in train_ids},
                 progress=progress, card=False, overwrite=True)
    recipe = {
        "data": {"shards": str(shards), "train_split": "train", "genes": "vocabulary", "batch_size": batch_size,
                 "num_workers": 0, "shuffle": 500, "augment": True, "log1p": True, "target_sum": 1e4},
        "model": {"backbone": backbone, "pretrained": bool(pretrained),
                  "checkpoint": None if checkpoint is None else str(checkpoint), "img_size": img_size,
                  "finetune": {"mode": mode, "lora_r": lora_r, "lora_alpha": 2 * lora_r}},
        "objectives": [{"name": "expression"}],
        "optim": {"lr": lr, "weight_decay": 0.01, "warmup_steps": max(1, steps // 10), "max_steps": steps},
        "seed": seed, "output_dir": str(out_dir / "train"), "checkpoint_every": steps, "keep_last": 1,
        "tracker": "none", "progress": progress, "log_every": max(1, steps // 5),
    }
    train(recipe)
    return final
