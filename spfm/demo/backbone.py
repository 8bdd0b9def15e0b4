"""The backbone half of ``spfm demo``: pretrain a tiny ViT on the demo's shards, fine-tune it with LoRA, save it as
a Hub model and load it back.

The recipes are the ones in ``recipes/pretrain_synthetic.yaml`` and ``recipes/finetune_synthetic.yaml``, shrunk to
CPU-seconds (fewer steps, 32 px inputs over the same 112 um field); the demo writes the exact recipes it ran to
``OUT/recipes/`` so they can be rerun with ``spfm train``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from spfm.atomic import atomic_write_text

#: The tiny backbone of the demo: HisToSGE's demo embeds with it at the same input size.
BACKBONE = "vit_tiny_patch16_224"
IMG_SIZE = 32


def pretrain_recipe(shards: Path, output_dir: Path, seed: int, steps: int) -> dict[str, Any]:
    """Expression + contrastive pretraining on the train split, evaluated on the validation patients."""
    return dict(
        data=dict(shards=str(shards), train_split="train", genes="vocabulary", batch_size=32, num_workers=0,
                  shuffle=500, augment=True, image_size=IMG_SIZE, log1p=True),
        model=dict(backbone=BACKBONE, pretrained=False, img_size=IMG_SIZE),
        objectives=[dict(name="expression", weight=1.0), dict(name="contrastive", weight=0.5)],
        optim=dict(lr=1e-3, weight_decay=0.05, warmup_steps=max(1, steps // 10), max_steps=steps, grad_accum=1,
                   clip_grad_norm=1.0, schedule="cosine"),
        eval=dict(split="val", every=steps),
        precision="no", seed=seed, output_dir=str(output_dir), checkpoint_every=steps, keep_last=1,
        tracker="none", log_every=max(1, steps // 4), progress=True,
    )


def finetune_recipe(shards: Path, checkpoint: Path, output_dir: Path, seed: int, steps: int) -> dict[str, Any]:
    """LoRA on the attention projections plus a fresh expression head, evaluated on the held-out test patient."""
    recipe = pretrain_recipe(shards, output_dir, seed, steps)
    recipe["model"] = dict(backbone=BACKBONE, checkpoint=str(checkpoint / "model.safetensors"), img_size=IMG_SIZE,
                           finetune=dict(mode="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0))
    recipe["objectives"] = [dict(name="expression", weight=1.0)]
    recipe["eval"] = dict(split="test", every=steps)
    return recipe


def _write_recipe(recipe: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(recipe, sort_keys=False))


def run_backbone_demo(shards: Path, out: Path, seed: int = 0, *, pretrain_steps: int = 40,
                      finetune_steps: int = 30) -> dict[str, Any]:
    """Pretrain, fine-tune, save as a Hub model and reload; return the metrics the demo prints.

    Writes ``out/recipes/{pretrain,finetune}.yaml`` (what ran), ``out/pretrain/`` and ``out/finetune/`` (``spfm
    train`` outputs, ``final/`` holding the backbone) and ``out/model/`` (``config.json`` + ``model.safetensors`` +
    model card, as ``push_to_hub`` would upload it).

    Returns:
        ``{"pretrain": {...}, "finetune": {...}, "reload_max_abs_diff": d, "checkpoint": path, "model": path}``:
        the final train metrics of both runs (``eval/...`` on held-out patients) and the largest difference between
        the embeddings of the trained backbone and of the reloaded Hub model on one batch of patches.
    """
    import torch

    import spfm
    from spfm.hub import save_pretrained
    from spfm.models.backbones import create_backbone
    from spfm.train import train
    from spfm.train.loop import make_train_loader
    from spfm.train.recipe import load_recipe

    out = Path(out)
    result: dict[str, Any] = {}
    pre = pretrain_recipe(shards, out / "pretrain", seed, pretrain_steps)
    fine = finetune_recipe(shards, out / "pretrain" / "final", out / "finetune", seed, finetune_steps)
    for name, recipe in (("pretrain", pre), ("finetune", fine)):
        _write_recipe(recipe, out / "recipes" / f"{name}.yaml")
        metrics = train(copy.deepcopy(recipe))
        result[name] = {k: round(float(v), 4) for k, v in metrics.items() if isinstance(v, (int, float))}
        evals = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/") and k.endswith("loss"))
        print(f"{name}: {metrics['step']} steps in {metrics['seconds']:.1f} s, train loss {metrics['loss']:.3f}; "
              f"{evals}", flush=True)

    # the fine-tuned backbone as a Hub model, loaded back the way a user of the Hub would
    model_dir = save_pretrained(str(out / "finetune"), out / "model", datasets=["spfm-synthetic"])
    reloaded = spfm.from_pretrained(model_dir).eval()
    trained = create_backbone(BACKBONE, checkpoint=out / "finetune" / "final").eval()
    batch = next(iter(make_train_loader(load_recipe(fine).data, seed=seed, split="test", training=False)))
    with torch.no_grad():
        # as training saw them: the shards' 224 px patches resized to the backbone's input, then normalised
        images = torch.nn.functional.interpolate(batch["image"], size=(IMG_SIZE, IMG_SIZE), mode="bilinear",
                                                 antialias=True, align_corners=False)
        images = trained.normalize(images)
        diff = (trained(images) - reloaded.embed(images)).abs().max().item()
    print(f"saved the fine-tuned backbone to {model_dir} (config.json, model.safetensors, README.md) and loaded it "
          f"back with spfm.from_pretrained: embeddings of {images.shape[0]} patches differ by at most {diff:.2e}")
    result.update(reload_max_abs_diff=diff, checkpoint=str(out / "finetune" / "final"), model=str(model_dir))
    return result
