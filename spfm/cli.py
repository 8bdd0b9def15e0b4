"""The ``spfm`` command line. ``spfm --help`` lists every subcommand; ``spfm CMD --help`` its options.

Imports of heavy modules happen inside each command so ``spfm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from spfm import __version__
from spfm.errors import SpfmError


def _patch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("patches")
    g.add_argument("--size", type=int, default=224, help="patch side in pixels (default 224)")
    g.add_argument("--pixel-size", type=float, default=0.5, help="patch micrometres per pixel (default 0.5)")
    g.add_argument("--edge", choices=("pad", "drop"), default="pad",
                   help="patches past the slide edge: pad with white or drop (default pad)")
    g.add_argument("--min-tissue", type=float, default=0.1,
                   help="drop patches with a smaller tissue fraction (default 0.1; 0 keeps all)")


def _patch_config(args: argparse.Namespace):
    from spfm.data.patches import PatchConfig

    return PatchConfig(size_px=args.size, pixel_size_um=args.pixel_size, edge=args.edge,
                       min_tissue_fraction=args.min_tissue)


def _cmd_demo(args: argparse.Namespace) -> int:
    from spfm.demo import run_demo

    run_demo(args.out, seed=args.seed, n_samples=args.samples, workers=args.workers, overwrite=args.overwrite)
    return 0


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from spfm.data.synthetic import make_synthetic_corpus

    root = make_synthetic_corpus(args.out, n_samples=args.samples, seed=args.seed, n_genes=args.genes,
                                 pixel_size_um=args.pixel_size, overwrite=args.overwrite)
    print(f"wrote a synthetic HEST root to {root}")
    return 0


def _cmd_import_legacy_st(args: argparse.Namespace) -> int:
    from spfm.data.importers import import_legacy_st

    root = import_legacy_st(args.counts, args.spots, args.image, args.sample_id, args.out, organ=args.organ,
                            species=args.species, patient=args.patient, pixel_size_um=args.pixel_size_um,
                            overwrite=args.overwrite)
    _print_import_summary(root, args.sample_id)
    return 0


def _print_import_summary(root: Path, sample_id: str) -> None:
    from spfm.data.hest import pixel_size_from_metadata, read_metadata

    meta = read_metadata(root, sample_id)
    size, source = pixel_size_from_metadata(meta)
    dropped = meta.get("spots_dropped") or {}
    dropped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in dropped.items() if n) or "none"
    line = (f"imported {sample_id} into {root}: {meta.get('spots_under_tissue')} spots kept; dropped: {dropped}; "
            f"pixel size {size:.4f} um/px ({source})")
    if meta.get("image_source"):
        line += f"; image: {meta['image_source']}"
    print(line)


def _cmd_import_visium(args: argparse.Namespace) -> int:
    from spfm.data.importers import import_visium

    root = import_visium(args.outs, args.sample_id, args.out, image=args.image, organ=args.organ,
                         species=args.species, patient=args.patient, pixel_size_um=args.pixel_size_um,
                         overwrite=args.overwrite)
    _print_import_summary(root, args.sample_id)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from spfm.data.hest import list_samples

    table = list_samples(args.root)
    if args.json:
        print(table.to_json(orient="records", indent=2))
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(table.to_string(index=False) if len(table) else f"no samples under {args.root}")
    return 0


def _cmd_patch(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from spfm.data.hest import read_sample, sample_ids
    from spfm.data.patches import write_patches_h5

    config = _patch_config(args)
    for sid in tqdm(args.samples or sample_ids(args.root), desc="patching", unit="sample"):
        sample = read_sample(args.root, sid)
        try:
            path = write_patches_h5(sample, config)
        finally:
            sample.close()
        tqdm.write(f"{sid}: {path}")
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from spfm.data.shards import write_shards
    from spfm.data.splits import read_split_mapping
    from spfm.data.vocab import read_gene_panel

    genes: str | list[str] = args.genes
    if genes not in ("union", "intersection"):
        genes = read_gene_panel(genes)
    manifest = write_shards(
        args.root,
        args.out,
        samples=args.samples,
        genes=genes,
        patch=_patch_config(args),
        image_format=args.format,
        jpeg_quality=args.quality,
        split_fractions=tuple(args.split_fractions),
        split_seed=args.split_seed,
        splits=read_split_mapping(args.splits) if args.splits else None,
        workers=args.workers,
        rank=args.rank,
        world_size=args.world_size,
        overwrite=args.overwrite,
        card_path=args.card_path,
    )
    if manifest:
        totals = manifest.get("totals", {})
        print(f"wrote {totals.get('records', '?')} records in {totals.get('shards', '?')} shards to {args.out}")
    else:
        print(f"this rank's samples are done; the manifest is written by the last rank to finish ({args.out})")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from spfm.data.shards import verify_shards

    problems = verify_shards(args.dir)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{args.dir}: every shard matches the manifest")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from spfm.models.backbones import describe_backbones

    rows = describe_backbones()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    import pandas as pd

    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(pd.DataFrame(rows).to_string(index=False))
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from spfm.data.patches import PatchConfig
    from spfm.models.embed import embed

    patch = None
    if args.patch_px is not None or args.patch_um is not None:
        patch = PatchConfig(size_px=args.patch_px or 224, pixel_size_um=args.patch_um or 0.5)
    out = embed(args.source, args.out, backbone=args.backbone, pretrained=args.pretrained, checkpoint=args.checkpoint,
                backbone_kwargs={"img_size": args.img_size} if args.img_size else None, batch_size=args.batch_size,
                precision=args.precision, device=args.device, patch=patch, samples=args.samples, splits=args.splits,
                num_workers=args.num_workers, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"embeddings written to {out}")
    return 0


def _cmd_bench_hest(args: argparse.Namespace) -> int:
    from spfm.atomic import atomic_write_json
    from spfm.eval.hest_bench import bench_hest

    result = bench_hest(args.root, args.embeddings, splits_dir=args.splits_dir, splits=args.rule,
                        genes=args.genes or "auto", n_genes=args.n_genes,
                        pca_dim=None if args.pca_dim == "none" else int(args.pca_dim), seed=args.seed,
                        nan_policy=args.nan_policy)
    print(f"HEST-Benchmark Pearson: {result['pearson_mean']} +- {result['pearson_std']} over "
          f"{len(result['mean_per_split'])} splits {result['mean_per_split']}")
    if args.out:
        atomic_write_json(args.out, result)
        print(f"full result: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spfm",
        description="spfm: a foundation-model toolkit for spatial omics (HEST-style corpora, WebDataset shards, "
        "pathology ViT backbones and heads).",
    )
    parser.add_argument("--version", action="version", version=f"spfm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run the data path end to end on the built-in synthetic corpus",
                       description="Generate the synthetic corpus, import a sample, cut patches, write shards, read "
                       "them back, print a summary and write a data card and figures under --out.")
    p.add_argument("--out", default="spfm_demo", help="output folder (default ./spfm_demo)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--samples", type=int, default=4, help="synthetic samples (default 4)")
    p.add_argument("--workers", type=int, default=1, help="shard-writing processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo output")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("synthetic", help="write the synthetic HEST-layout corpus to a folder")
    p.add_argument("out", help="HEST root to create")
    p.add_argument("--samples", type=int, default=4, help="number of samples (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives identical files (default 0)")
    p.add_argument("--genes", type=int, default=200, help="genes in the corpus vocabulary (default 200)")
    p.add_argument("--pixel-size", type=float, default=1.0, help="slide micrometres per pixel (default 1.0)")
    p.add_argument("--overwrite", action="store_true", help="replace the generated samples if they exist")
    p.set_defaults(func=_cmd_synthetic)

    p = sub.add_parser("import", help="import a user's data (legacy ST, Space Ranger Visium) into a HEST root")
    imp = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = imp.add_parser("legacy-st", help="legacy Spatial Transcriptomics: counts TSV, spot selection, H&E image")
    q.add_argument("--counts", required=True, help="counts TSV(.gz), spots x genes, spot ids 'XxY'")
    q.add_argument("--spots", required=True, help="spot selection TSV with x, y, pixel_x, pixel_y")
    q.add_argument("--image", required=True, help="full-resolution H&E image")
    q.set_defaults(func=_cmd_import_legacy_st)
    q2 = imp.add_parser("visium", help="Space Ranger outs/ folder (matrix h5, spatial/ positions and scale factors)")
    q2.add_argument("outs", help="Space Ranger outs/ folder")
    q2.add_argument("--image", help="full-resolution image (default: one beside outs/ that fits the scale factors, "
                    "else the hires image, with a warning)")
    q2.set_defaults(func=_cmd_import_visium)
    for q in (q, q2):
        q.add_argument("--sample-id", required=True, help="sample id (letters, digits, '_' and '-')")
        q.add_argument("--out", required=True, help="HEST root to write into")
        q.add_argument("--organ")
        q.add_argument("--species")
        q.add_argument("--patient")
        q.add_argument("--pixel-size-um", type=float,
                       help="micrometres per pixel of the image (default: estimated from the spot pitch)")
        q.add_argument("--overwrite", action="store_true", help="replace the sample if it exists")

    p = sub.add_parser("list", help="list the samples of a HEST root with their metadata")
    p.add_argument("root")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("patch", help="cut spot-centred patches into HEST's patches/{id}.h5")
    p.add_argument("root")
    p.add_argument("--samples", nargs="+", help="sample ids (default: all)")
    _patch_options(p)
    p.set_defaults(func=_cmd_patch)

    p = sub.add_parser("shard", help="write WebDataset shards, a manifest and a data card from a HEST root")
    p.add_argument("root", help="HEST root")
    p.add_argument("out", help="output folder for shards, manifest.json and README.md (the data card)")
    p.add_argument("--samples", nargs="+", help="sample ids (default: all)")
    p.add_argument("--genes", default="union",
                   help="gene vocabulary: union, intersection, or a file with one gene per line (default union)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="patch encoding (default jpg)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--split-fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of patients per split (default 0.8 0.1 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient split (default 0)")
    p.add_argument("--splits", help="explicit split: JSON {sample_id: split} or CSV/TSV with sample_id, split columns")
    p.add_argument("--card-path", help="also write the data card here (e.g. data_cards/my-corpus.md)")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine (default 1)")
    p.add_argument("--rank", type=int, help="this node's rank (default: RANK or SLURM_PROCID, else 0)")
    p.add_argument("--world-size", type=int, help="number of nodes (default: WORLD_SIZE or SLURM_NTASKS, else 1)")
    p.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    _patch_options(p)
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser("backbones", help="list the registered image backbones (embedding size, source, licence)")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=_cmd_backbones)

    from spfm.train.__main__ import add_arguments as add_train_arguments
    from spfm.train.__main__ import run as run_train

    p = sub.add_parser("train", help="pretrain or fine-tune a backbone as a recipe says (Accelerate: CPU, GPUs, nodes)",
                       description="Train as a recipe says. Under `accelerate launch -m spfm.train RECIPE` the same "
                       "command runs on every process.")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("embed", help="patch embeddings of a HEST root or shards with a backbone, to AnnData/h5")
    p.add_argument("source", help="HEST root (one h5ad per sample) or shard folder (one h5 per split)")
    p.add_argument("out", help="output folder")
    p.add_argument("--backbone", help="registry name (default: the checkpoint's, else vit_tiny_patch16_224)")
    p.add_argument("--pretrained", action="store_true", help="load the published weights (Hub or HF cache)")
    p.add_argument("--checkpoint", help="local weights file or an `spfm train` output folder")
    p.add_argument("--img-size", type=int, help="backbone input size override")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"), default="auto")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--samples", nargs="+", help="sample ids of a HEST root (default: all)")
    p.add_argument("--splits", nargs="+", help="splits of a shard folder (default: all)")
    p.add_argument("--patch-px", type=int, help="patch side in pixels (default: the backbone's input size)")
    p.add_argument("--patch-um", type=float, help="patch micrometres per pixel (default 0.5)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace outputs made with another configuration")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("bench", help="benchmarks: `spfm bench hest ROOT EMBEDDINGS` runs the HEST-Benchmark protocol")
    bench = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    q = bench.add_parser("hest", help="HEST-Benchmark: PCA-256 + Ridge on embeddings, mean Pearson of top-50 genes")
    q.add_argument("root", help="HEST root with the expression")
    q.add_argument("embeddings", help="`spfm embed` output folder for that root")
    q.add_argument("--splits-dir", help="folder with train_K.csv/test_K.csv (default: ROOT/splits if present)")
    q.add_argument("--rule", choices=("auto", "leave_one_patient_out", "leave_one_sample_out"), default="auto",
                   help="automatic split when there are no split files (default auto: leave one patient out)")
    q.add_argument("--genes", help="gene list JSON/text (default: ROOT/var_50genes.json or top variance)")
    q.add_argument("--n-genes", type=int, default=50)
    q.add_argument("--pca-dim", default="256", help="PCA components, or none (default 256)")
    q.add_argument("--seed", type=int, default=1)
    q.add_argument("--nan-policy", choices=("propagate", "omit"), default="propagate")
    q.add_argument("--out", help="write the full JSON result here")
    q.set_defaults(func=_cmd_bench_hest)

    p = sub.add_parser("verify", help="check shards against their manifest (sizes, checksums, record counts)")
    p.add_argument("dir", help="shard folder with manifest.json")
    p.set_defaults(func=_cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spfm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpfmError as exc:
        if args.debug or os.environ.get("SPFM_DEBUG"):
            raise
        print(f"spfm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume where supported", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
