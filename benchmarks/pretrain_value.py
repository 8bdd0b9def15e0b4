"""Is pretraining worth it? HEST-Benchmark Pearson on HER2ST of a ViT at random init against the same ViT pretrained.

Prints one JSON object (``--out`` also writes it under ``benchmarks/results/``). In one run:

1. The four HER2ST sections of ../shared/data (B4, C2, C3, C4; patient = the section's letter) are imported into
   a HEST root with ``spfm.data.importers.import_legacy_st``.
2. Every spot is embedded with ``spfm.models.embed.embed`` (patches of 112 um, the spot's field, at the backbone's
   input size) by the backbone at random init, one embedding per ``--seeds`` seed.
3. The pretrained arm, one of:
   - ``--pretrain-steps N`` (the issue's figure): for each split of each rule, the same architecture is pretrained
     with ``spfm.train`` (expression regression + image-expression InfoNCE over the 1000 genes with the highest
     mean log1p count in the training sections) on that split's *training* sections
     only, then embeds every section; the held-out section's patches and expression are never seen in pretraining.
   - ``--checkpoint DIR``: one backbone pretrained elsewhere (``spfm train``'s ``final/`` folder); if it was
     pretrained on these sections, its test sections leaked into it, and the figure is optimistic.
4. ``spfm.eval.hest_bench.bench_hest`` runs the HEST-Benchmark protocol (log1p of the top-50 genes by variance on
   each training split, scaler + PCA 256 fitted on train, Ridge lsqr without intercept, mean test Pearson over
   genes, mean and std over splits) under two split rules: leave one section out (the issue's figure: 4 splits;
   sections C2-C4 come from one patient, so a test section has sister sections in training) and leave one patient
   out (2 splits, no patient on both sides).

Figures: per arm and rule, the Pearson mean over splits (random init: mean over seeds, seeds listed) and
``ratio = pretrained / random init``.

    python benchmarks/pretrain_value.py --pretrain-steps 300 [--seeds 0 1 2] [--workdir DIR] [--out [PATH]]
    python benchmarks/pretrain_value.py --checkpoint runs/pretrain_her2st/final
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from her2st_folds import HER2ST_SECTIONS, SHARED_DATA, import_her2st, pretrain_fold
from report import emit, peak_memory_mb, versions

SPOT_FIELD_UM = 112.0  # 224 px at 0.5 um/px, HEST's patch: about one legacy-ST spot (100 um)
RULES = {"leave_one_section_out": "leave_one_sample_out", "leave_one_patient_out": "leave_one_patient_out"}


def architecture(backbone: str | None, checkpoint: Path | None) -> tuple[str, dict[str, Any]]:
    """(registry name, build options) of the ViT both arms use: the checkpoint's, else ``backbone``."""
    from spfm.models.embed import DEFAULT_BACKBONE

    if checkpoint is None:
        return backbone or DEFAULT_BACKBONE, {}
    from spfm.models.backbones.weights import resolve_checkpoint

    config = resolve_checkpoint(checkpoint).config or {}
    name = backbone or config.get("spfm_backbone") or config.get("backbone") or DEFAULT_BACKBONE
    kwargs = dict(config.get("model_args", {}))
    if "img_size" in config:  # spfm train records the image size it trained at
        kwargs.setdefault("img_size", config["img_size"])
    return name, kwargs


def random_checkpoint(name: str, kwargs: dict[str, Any], seed: int, folder: Path) -> Path:
    """Save the backbone at random init from ``seed`` (once: a rerun with --workdir reuses it and its embeddings)."""
    import torch

    from spfm.models.backbones.registry import create_backbone, save_backbone

    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        save_backbone(create_backbone(name, **kwargs), folder)
    return folder


def score(root: Path, emb_dir: Path, seed: int) -> dict[str, Any]:
    """The HEST protocol under each split rule: pearson mean/std over splits and the per-split means."""
    from spfm.eval.hest_bench import bench_hest

    out = {}
    for label, rule in RULES.items():
        res = bench_hest(root, emb_dir, splits=rule, genes=None, seed=seed)
        out[label] = {"pearson_mean": res["pearson_mean"], "pearson_std": res["pearson_std"],
                      "mean_per_split": res["mean_per_split"],
                      "test_per_split": [s["test"] for s in res["splits"]]}
    return out


def fold_splits(root: Path) -> dict[str, list[tuple[list[str], list[str]]]]:
    """Each rule's splits, as (train ids, test ids), in the order bench_hest scores them."""
    from spfm.data.hest import list_samples
    from spfm.eval.hest_bench import leave_one_patient_out, leave_one_sample_out

    table = list_samples(root)
    return {"leave_one_section_out": leave_one_sample_out(list(table["sample_id"])),
            "leave_one_patient_out": leave_one_patient_out(dict(zip(table["sample_id"], table["patient"])))}


def per_fold_arm(root: Path, work: Path, name: str, kwargs: dict[str, Any], steps: int, seed: int, embed_kw: dict,
                 protocol_seed: int) -> tuple[dict[str, Any], float]:
    """Pretrain on each split's training sections, embed with that backbone, score that split alone."""
    from spfm.eval.hest_bench import bench_hest
    from spfm.models.embed import embed

    img_size = int(kwargs["img_size"])
    arm: dict[str, Any] = {"mode": "per_fold", "steps": steps, "seed": seed}
    t0 = time.perf_counter()
    for label, splits in fold_splits(root).items():
        per_split = []
        for train_ids, test_ids in splits:
            final = pretrain_fold(root, train_ids, work, backbone=name, img_size=img_size, steps=steps, seed=seed)
            emb_dir = embed(root, final.parent / "embeddings", backbone=name, checkpoint=final, **embed_kw)
            res = bench_hest(root, emb_dir, splits=[(train_ids, test_ids)], genes=None, seed=protocol_seed)
            per_split.append({"train": train_ids, "test": test_ids, "pearson_mean": res["pearson_mean"],
                              "checkpoint": str(final)})
        means = [s["pearson_mean"] for s in per_split]
        arm[label] = {"pearson_mean": float(np.mean(means)) if None not in means else None,
                      "pearson_std": float(np.std(means)) if None not in means else None,
                      "mean_per_split": means, "splits": per_split}
    return arm, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="pretrain per split on its training sections for this many steps (the fair figure)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="or: one backbone pretrained elsewhere")
    parser.add_argument("--backbone", default=None, help="registry name (default: the checkpoint's, else vit_tiny)")
    parser.add_argument("--img-size", type=int, default=112, help="ViT input side for --pretrain-steps (default 112)")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-init seeds")
    parser.add_argument("--protocol-seed", type=int, default=1, help="PCA/Ridge random state (HEST's default: 1)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the HEST root, backbones and embeddings here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--out", nargs="?", type=Path, const=True, default=None,
                        help="write the JSON under benchmarks/results/ (or to the path given)")
    args = parser.parse_args(argv)
    if args.pretrain_steps is not None and args.checkpoint is not None:
        parser.error("give --pretrain-steps or --checkpoint, not both")

    import torch

    from spfm.data.patches import PatchConfig
    from spfm.models.embed import embed

    torch.set_num_threads(1)  # two threads on a shared 2-core machine spin and run slower than one
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spfm-pretrain-value-") as tmp:
        work = args.workdir or Path(tmp)
        root = work / "hest"
        t0 = time.perf_counter()
        import_her2st(args.data, root)
        seconds: dict[str, float] = {"import": round(time.perf_counter() - t0, 2)}
        name, kwargs = architecture(args.backbone, args.checkpoint)
        if args.pretrain_steps is not None:
            kwargs = {**kwargs, "img_size": args.img_size}
        size = int(kwargs.get("img_size", 224))
        patch = PatchConfig(size_px=size, pixel_size_um=SPOT_FIELD_UM / size)
        common = dict(batch_size=args.batch_size, precision=args.precision, device=args.device,
                      num_workers=args.num_workers, progress=False, patch=patch)

        per_seed = []
        t0 = time.perf_counter()
        for seed in args.seeds:
            ckpt = random_checkpoint(name, kwargs, seed, work / f"random_init_{name}_{size}px_seed{seed}")
            emb_dir = embed(root, ckpt / "embeddings", backbone=name, checkpoint=ckpt, **common)
            per_seed.append(score(root, emb_dir, args.protocol_seed))
        seconds["random_init"] = round(time.perf_counter() - t0, 2)
        random_arm = {"seeds": args.seeds, "per_seed": per_seed}
        for label in RULES:
            means = [s[label]["pearson_mean"] for s in per_seed]
            random_arm[label] = {"pearson_mean": float(np.mean(means)) if None not in means else None,
                                 "pearson_std_over_seeds": float(np.std(means)) if None not in means else None}

        pretrained_arm = None
        if args.pretrain_steps is not None:
            pretrained_arm, spent = per_fold_arm(root, work, name, kwargs, args.pretrain_steps, args.pretrain_seed,
                                                 common, args.protocol_seed)
            seconds["pretrained"] = round(spent, 2)
        elif args.checkpoint is not None:
            t0 = time.perf_counter()
            # one embedding folder per checkpoint, so a --workdir rerun resumes and another checkpoint never clashes
            tag = hashlib.sha1(str(args.checkpoint.resolve()).encode()).hexdigest()[:12]
            emb_dir = embed(root, work / f"emb_checkpoint_{tag}", backbone=name, checkpoint=args.checkpoint, **common)
            pretrained_arm = {"mode": "one_checkpoint", "checkpoint": str(args.checkpoint),
                              **score(root, emb_dir, args.protocol_seed)}
            seconds["pretrained"] = round(time.perf_counter() - t0, 2)
        ratio = None
        if pretrained_arm is not None:
            ratio = {}
            for label in RULES:
                p, r = pretrained_arm[label]["pearson_mean"], random_arm[label]["pearson_mean"]
                ratio[label] = None if p is None or not r else round(p / r, 4)

    result = dict(
        name="pretrain_value",
        dataset=f"her2st ({', '.join(HER2ST_SECTIONS)}; patient = section letter), imported with import_legacy_st",
        metric="HEST-Benchmark Pearson (mean over 50 genes, then over splits)",
        backbone=name,
        backbone_kwargs=kwargs,
        random_init=random_arm,
        pretrained=pretrained_arm,
        ratio=ratio,
        settings=dict(rules=RULES, protocol_seed=args.protocol_seed, genes="top 50 by variance of log1p on train",
                      pca_dim=256, patch=patch.to_dict(), embed=dict(precision=args.precision,
                                                                     batch_size=args.batch_size)),
        seconds={**seconds, "total": round(time.perf_counter() - began, 2)},
        peak_memory_mb=peak_memory_mb(),
        versions=versions("numpy", "torch", "timm", "sklearn"),
    )
    return emit(result, args.out, "pretrain_value_her2st.json")


if __name__ == "__main__":
    main()
