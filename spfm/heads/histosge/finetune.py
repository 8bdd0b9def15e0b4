"""Adapting the backbone to the tissue: LoRA jointly with the head, or a fine-tuning stage before it.

The published model freezes its pathology backbone (UNI) and reads precomputed embeddings. spfm has two options.

* Joint (``HisToSGE(finetune="lora", backbone=NAME)``): LoRA adapters on the backbone's attention projections train
  together with the head, end to end from patches (``fit(..., patches=)``); :func:`lora_backbone` builds the adapted
  backbone, :func:`spfm.models.embed.patch_features` runs it on uint8 patches. The head's ``module.backbone`` keeps
  the adapters (unmerged) so its state_dict round-trips through ``from_config``.
* Two-stage (:func:`finetune_backbone`, the recipe's ``backbone.finetune``): the training
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

import numpy as np
import torch

from spfm.errors import DataError


def lora_backbone(name: str, build_kwargs: dict[str, Any], checkpoint: str | os.PathLike | None, *, r: int,
                  alpha: int) -> torch.nn.Module:
    """``create_backbone(name, checkpoint=..., **build_kwargs)`` with LoRA adapters (rank ``r``, scale alpha / r)
    on its attention projections; only the adapters train (``spfm.models.finetune.prepare_for_finetuning``)."""
    from spfm.models.backbones import create_backbone
    from spfm.models.finetune import prepare_for_finetuning

    backbone = create_backbone(name, checkpoint=checkpoint, **build_kwargs)
    return prepare_for_finetuning(backbone, "lora", lora_r=int(r), lora_alpha=int(alpha))


def check_patches(patches: Any, n_obs: int, where: str) -> np.ndarray:
    """(N, H, W, 3) uint8 patches of one slide, one per spot in row order (DataError otherwise)."""
    if patches is None:
        raise DataError(f"finetune='lora' trains the backbone from images: pass patches= for {where} (one (N, H, W, 3) "
                        "uint8 array per slide, e.g. from spfm.data.patches.iter_patches)", field="patches")
    arr = np.asarray(patches)
    if arr.ndim != 4 or arr.shape[0] != n_obs or arr.shape[-1] != 3:
        raise DataError(f"{where}: expected patches of shape ({n_obs}, H, W, 3), got {arr.shape}", field="patches")
    if arr.dtype != np.uint8:
        raise DataError(f"{where}: patches must be uint8 RGB, got {arr.dtype}", field="patches")
    return arr




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
