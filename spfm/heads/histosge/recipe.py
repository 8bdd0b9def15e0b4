"""``spfm predict-expression RECIPE.yaml``: train HisToSGE on slides of a HEST root and predict others.

A recipe (see ``recipes/histosge_*.yaml``) has these sections; unknown keys are an error::

    data:     root (HEST root), train (sample ids), predict (sample ids), embeddings (folder for `spfm embed`)
    backbone: name, checkpoint, pretrained, img_size          -> spfm.models.embed.embed
              finetune: {mode: lora, steps: 200, lr: 1e-3}    -> fine-tune on the train slides first (optional)
    patch:    size_px, pixel_size_um, min_tissue_fraction     -> spfm.data.patches.PatchConfig
    head:     HisToSGE arguments (attention, n_top_genes, epochs, ...), or checkpoint: a saved head to reuse
    task:     recovery_fraction (train on that fraction of each train slide, score the rest), denser (also predict
              the 4x denser lattice of each predict slide), plot_genes (how many genes to map)
    output_dir, seed

Writes to ``output_dir``: ``head/`` (config.json + model.safetensors), ``{id}_predicted.h5ad`` (per predicted
slide: ``layers["predicted"]``, ``layers["measured"]``), ``{id}_denser.h5ad``, ``metrics.json`` and
``{id}_maps.png`` (measured vs predicted on the slide thumbnail).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from spfm.errors import DataError

SECTIONS: dict[str, dict[str, Any]] = {
    "data": {"root": None, "train": [], "predict": [], "embeddings": None},
    "backbone": {"name": None, "checkpoint": None, "pretrained": False, "img_size": None, "finetune": None},
    "patch": {"size_px": 224, "pixel_size_um": 0.5, "min_tissue_fraction": 0.1},
    "head": {},
    "task": {"recovery_fraction": None, "denser": False, "plot_genes": 3},
}
TOP_LEVEL = {"output_dir", "seed"}


def load_recipe(source: str | os.PathLike | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
                ) -> dict[str, Any]:
    """The recipe with defaults filled in and ``key.path=value`` overrides applied; unknown keys raise DataError."""
    from spfm.recipes import read_recipe

    tree, where = read_recipe(source, overrides)
    unknown = set(tree) - set(SECTIONS) - TOP_LEVEL
    if unknown:
        raise DataError(f"unknown section(s) {sorted(unknown)}; known: {sorted(set(SECTIONS) | TOP_LEVEL)}",
                        path=where, field=sorted(unknown)[0])
    out: dict[str, Any] = {}
    for name, defaults in SECTIONS.items():
        given = tree.get(name) or {}
        if not isinstance(given, dict):
            raise DataError("must be a mapping", path=where, field=name)
        if name != "head":
            bad = set(given) - set(defaults)
            if bad:
                raise DataError(f"unknown key(s) {sorted(bad)}; known: {sorted(defaults)}", path=where,
                                field=f"{name}.{sorted(bad)[0]}")
        out[name] = {**defaults, **given}
    out["output_dir"] = tree.get("output_dir") or "runs/histosge"
    out["seed"] = int(tree.get("seed", 0))
    data = out["data"]
    for key in ("root", "embeddings"):
        if not data[key]:
            raise DataError("required", path=where, field=f"data.{key}")
    if not data["predict"]:
        raise DataError("no slide to predict", path=where, field="data.predict")
    if not data["train"] and not out["head"].get("checkpoint"):
        raise DataError("no training slide and no head.checkpoint", path=where, field="data.train")
    return out


def run_recipe(source: str | os.PathLike | dict[str, Any], overrides: list[str] | tuple[str, ...] = (), *,
               progress: bool = True) -> dict[str, Any]:
    """Run a recipe; returns the metrics written to ``output_dir/metrics.json``."""
    import torch

    from spfm import pl
    from spfm.atomic import atomic_write_h5ad, atomic_write_json
    from spfm.data.patches import PatchConfig
    from spfm.heads.histosge.head import HisToSGE
    from spfm.heads.histosge.metrics import scores
    from spfm.heads.histosge.tasks import denser_positions, embed_positions, embed_samples, recovery_mask

    r = load_recipe(source, overrides)
    data, bb, task = r["data"], r["backbone"], r["task"]
    out = Path(r["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    patch = PatchConfig(size_px=int(r["patch"]["size_px"]), pixel_size_um=float(r["patch"]["pixel_size_um"]),
                        min_tissue_fraction=float(r["patch"]["min_tissue_fraction"]))
    embed_kw = dict(backbone=bb["name"], checkpoint=bb["checkpoint"], pretrained=bool(bb["pretrained"]),
                    backbone_kwargs={"img_size": int(bb["img_size"])} if bb["img_size"] else None)
    torch.manual_seed(r["seed"])  # a random-init backbone is drawn from the recipe's seed
    embeddings = Path(data["embeddings"])
    if bb["finetune"]:
        from spfm.heads.histosge.finetune import finetune_backbone

        ft = dict(bb["finetune"])
        bad = set(ft) - {"mode", "steps", "lr", "batch_size", "lora_r"}
        if bad:
            raise DataError(f"unknown key(s) {sorted(bad)}", field="backbone.finetune")
        final = finetune_backbone(data["root"], data["train"], out / "finetune", backbone=bb["name"], patch=patch,
                                  checkpoint=bb["checkpoint"], pretrained=bool(bb["pretrained"]),
                                  img_size=int(bb["img_size"]) if bb["img_size"] else None, seed=r["seed"],
                                  progress=progress, **ft)
        embed_kw = dict(checkpoint=final)
        embeddings = out / "finetune" / "embeddings"  # other weights: another embedding folder
    ids = list(dict.fromkeys([*data["train"], *data["predict"]]))
    slides = dict(zip(ids, embed_samples(data["root"], ids, embeddings, patch=patch, progress=progress,
                                         **embed_kw)))
    head_cfg = dict(r["head"])
    checkpoint = head_cfg.pop("checkpoint", None)
    metrics: dict[str, Any] = {"predict": {}}
    if checkpoint:
        head = HisToSGE.load(checkpoint)
    else:
        head = HisToSGE(**{"seed": r["seed"], **head_cfg})
        train = [slides[s] for s in data["train"]]
        masks = None
        if task["recovery_fraction"]:
            masks = [recovery_mask(a.n_obs, float(task["recovery_fraction"]), seed=r["seed"] + i)
                     for i, a in enumerate(train)]
        head.fit(train, train_mask=masks, progress=progress)
        head.save(out / "head")
        if masks is not None:
            rec = {}
            for sid, a, m in zip(data["train"], train, masks):
                pred = head.predict(a, inplace=False)
                rec[sid] = scores(pred.layers["predicted"][~m], pred.layers["measured"][~m])
            metrics["recovery"] = rec
    for sid in data["predict"]:
        a = slides[sid]
        pred = head.predict(a, measured=a.n_vars > 0 and all(g in a.var_names for g in head.genes), inplace=False)
        atomic_write_h5ad(pred, out / f"{sid}_predicted.h5ad")
        if "measured" in pred.layers:
            metrics["predict"][sid] = scores(pred.layers["predicted"], pred.layers["measured"])
            order = np.argsort(-pred.layers["measured"].var(axis=0))
        else:
            order = np.argsort(-pred.layers["predicted"].var(axis=0))
        genes = [head.genes[i] for i in order[: int(task["plot_genes"])]]
        if genes:
            pl.plot_expression_maps(pred, genes, out / f"{sid}_maps.png", root=data["root"], sample_id=sid)
        if task["denser"]:
            dense = embed_positions(data["root"], sid, denser_positions(a), patch=patch, **embed_kw)
            dpred = head.predict(dense, measured=False, inplace=False)
            dpred.obs["origin"] = dense.obs["origin"].astype(str)
            atomic_write_h5ad(dpred, out / f"{sid}_denser.h5ad")
            if genes:
                pl.plot_expression_maps(dpred, genes, out / f"{sid}_denser_maps.png", root=data["root"],
                                        sample_id=sid)
            metrics.setdefault("denser", {})[sid] = {"n_positions": int(dense.n_obs),
                                                     "n_measured": int((dense.obs["origin"] == "measured").sum())}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
