"""Is pretraining worth it? HEST-Benchmark Pearson on HER2ST of a ViT at random init against the same ViT pretrained.

Prints one JSON object (``--out`` also writes it under ``benchmarks/results/``). In one run:

1. The four HER2ST sections of ../shared/data (B4, C2, C3, C4; patient = the section's letter) are imported into
   a HEST root with ``spfm.data.importers.import_legacy_st``.
2. Every spot is embedded with ``spfm.models.embed.embed`` (patches at the backbone's input size, 0.5 um/px):
   (i) by the backbone at random init, one embedding per ``--seeds`` seed (``torch.manual_seed(seed)`` before
   building it); (ii) by the checkpoint ``--checkpoint`` (``spfm train``'s final folder or a ``save_backbone``
   directory), when given. Both arms use the same architecture: the checkpoint's ``config.json`` names it.
3. ``spfm.eval.hest_bench.bench_hest`` runs the HEST-Benchmark protocol (log1p of the top-50 genes by variance on
   each training split, scaler + PCA 256 fitted on train, Ridge lsqr without intercept, mean test Pearson over
   genes, mean and std over splits) under two split rules: leave one section out (the issue's figure: 4 splits;
   sections C2-C4 come from one patient, so a test section has sister sections in training) and leave one patient
   out (2 splits, no patient on both sides).

Figures: per arm and rule, the Pearson mean over splits (random init: mean over seeds, seeds listed) and
``ratio = pretrained / random init``.

    python benchmarks/pretrain_value.py [--checkpoint DIR] [--seeds 0 1 2] [--workdir DIR] [--out [PATH]]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
RESULTS = PROJECT_ROOT / "benchmarks" / "results"
HER2ST_SECTIONS = ("B4", "C2", "C3", "C4")
RULES = {"leave_one_section_out": "leave_one_sample_out", "leave_one_patient_out": "leave_one_patient_out"}


def import_her2st(data: Path, root: Path) -> None:
    """The four HER2ST sections as a HEST root (kept when already there, so a --workdir run resumes)."""
    from spfm.data.importers import import_legacy_st

    her2st = data / "her2st"
    if not her2st.is_dir():
        sys.exit(f"{her2st} not found; pass --data")
    for section in HER2ST_SECTIONS:
        if (root / "metadata" / f"{section}.json").is_file():
            continue
        import_legacy_st(her2st / "cnts" / f"{section}.tsv.gz", her2st / "spots" / f"{section}_selection.tsv",
                         her2st / "img" / f"{section}.jpg", section, root, organ="Breast", species="Homo sapiens",
                         patient=section[0])


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


def versions() -> dict[str, str]:
    import sklearn
    import timm
    import torch

    import spfm

    return dict(python=platform.python_version(), spfm=spfm.__version__, numpy=np.__version__,
                torch=torch.__version__, timm=timm.__version__, sklearn=sklearn.__version__,
                platform=platform.platform())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="the pretrained backbone (a checkpoint dir)")
    parser.add_argument("--backbone", default=None, help="registry name (default: the checkpoint's, else vit_tiny)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-init seeds")
    parser.add_argument("--protocol-seed", type=int, default=1, help="PCA/Ridge random state (HEST's default: 1)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the HEST root and embeddings here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--out", nargs="?", type=Path, const=True, default=None,
                        help="write the JSON under benchmarks/results/ (or to the path given)")
    args = parser.parse_args(argv)

    from spfm.models.embed import embed

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spfm-pretrain-value-") as tmp:
        work = args.workdir or Path(tmp)
        root = work / "hest"
        t0 = time.perf_counter()
        import_her2st(args.data, root)
        seconds: dict[str, float] = {"import": round(time.perf_counter() - t0, 2)}
        name, kwargs = architecture(args.backbone, args.checkpoint)
        common = dict(batch_size=args.batch_size, precision=args.precision, device=args.device,
                      num_workers=args.num_workers, progress=False)

        per_seed = []
        t0 = time.perf_counter()
        for seed in args.seeds:
            ckpt = random_checkpoint(name, kwargs, seed, work / f"random_init_seed{seed}")
            emb_dir = embed(root, work / f"emb_random_seed{seed}", backbone=name, checkpoint=ckpt, **common)
            per_seed.append(score(root, emb_dir, args.protocol_seed))
        seconds["random_init"] = round(time.perf_counter() - t0, 2)
        random_arm = {"seeds": args.seeds, "per_seed": per_seed}
        for label in RULES:
            means = [s[label]["pearson_mean"] for s in per_seed]
            random_arm[label] = {"pearson_mean": float(np.mean(means)) if None not in means else None,
                                 "pearson_std_over_seeds": float(np.std(means)) if None not in means else None}

        pretrained_arm = None
        ratio = None
        if args.checkpoint is not None:
            t0 = time.perf_counter()
            # one embedding folder per checkpoint, so a --workdir rerun resumes and another checkpoint never clashes
            tag = hashlib.sha1(str(args.checkpoint.resolve()).encode()).hexdigest()[:12]
            emb_dir = embed(root, work / f"emb_checkpoint_{tag}", backbone=name, checkpoint=args.checkpoint, **common)
            pretrained_arm = {"checkpoint": str(args.checkpoint), **score(root, emb_dir, args.protocol_seed)}
            seconds["pretrained"] = round(time.perf_counter() - t0, 2)
            ratio = {}
            for label in RULES:
                p, r = pretrained_arm[label]["pearson_mean"], random_arm[label]["pearson_mean"]
                ratio[label] = None if p is None or not r else round(p / r, 4)
        embed_config = json.loads((work / f"emb_random_seed{args.seeds[0]}" / "embed.json").read_text())

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
                      pca_dim=256, embed=dict(device=embed_config["device"], precision=embed_config["precision"],
                                              patch=embed_config["config"].get("patch"),
                                              batch_size=args.batch_size)),
        seconds={**seconds, "total": round(time.perf_counter() - began, 2)},
        peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        versions=versions(),
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        path = RESULTS / "pretrain_value_her2st.json" if args.out is True else args.out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
