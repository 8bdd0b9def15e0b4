"""The ``spfm`` command line. ``spfm --help`` lists every subcommand; ``spfm CMD --help`` its options.

Imports of heavy modules happen inside each command so ``spfm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
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

    heads = [] if args.heads.strip() in ("", "none") else [h.strip() for h in args.heads.split(",") if h.strip()]
    run_demo(args.out, seed=args.seed, n_samples=args.samples, workers=args.workers, overwrite=args.overwrite,
             heads=heads, backbone=not args.no_backbone)
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


def _cmd_run(args: argparse.Namespace) -> int:
    from spfm.recipes import read_recipe, recipe_kind, run_recipe

    tree, where = read_recipe(args.recipe, args.set)
    kind = recipe_kind(tree, where)
    print(f"spfm run: {args.recipe} ({kind} recipe)", flush=True)
    result = run_recipe(tree, progress=not args.no_progress, where=where)
    if isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}, indent=1))
    elif hasattr(result, "n_obs"):
        print(f"done: {result.n_obs} x {result.n_vars} AnnData written as the recipe says")
    return 0


def _cmd_download_hest(args: argparse.Namespace) -> int:
    from spfm.data.download import download_hest
    from spfm.data.hest import list_samples

    root = download_hest(args.out, args.ids, organ=args.organ, species=args.species, technology=args.technology,
                         patches=args.patches, revision=args.revision)
    table = list_samples(root)
    print(table.to_string(index=False))
    print(f"{len(table)} sample(s) in {root}; next: spfm shard {root} SHARDS_DIR")
    return 0


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


def _cmd_push(args: argparse.Namespace) -> int:
    from spfm.hub.api import from_pretrained, push_to_hub
    from spfm.hub.convert import _is_training_output

    source = Path(args.source)
    # A training output folder is converted; a saved Hub folder is loaded (validated, pickles never read).
    obj = args.source if _is_training_output(source) else from_pretrained(source)
    card = {"license": args.license, "datasets": args.dataset or None, "tags": args.tag or None}
    info = push_to_hub(obj, args.repo_id, private=args.private or None, commit_message=args.message,
                       revision=args.revision, create_pr=args.create_pr,
                       include_restricted_weights=args.include_restricted_weights,
                       **{k: v for k, v in card.items() if v is not None})
    print(f"pushed {source} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from spfm.hub.api import pull

    folder = pull(args.repo_id, args.out, revision=args.revision)
    print(f"pulled {args.repo_id} into {folder}")
    return 0


def _cmd_domains(args: argparse.Namespace) -> int:
    from spfm.atomic import atomic_write_h5ad, read_h5ad
    from spfm.heads.cellscape import CellScape

    adata = read_h5ad(args.input, field="IN")
    hp = {"variant": "full" if args.method == "cellscape" else "cci", "graph": args.graph,
          "duplicates": args.duplicates, "refine_r": args.refine}
    if args.epochs:
        hp["epochs"] = args.epochs
    if args.batch_order:
        hp["batch_order"] = args.batch_order
    head = CellScape(**hp)
    head.run(adata, args.n_domains, n_cell_types=args.n_cell_types, batch_key=args.batch_key, seed=args.seed,
             device=args.device, progress=not args.no_progress)
    out = atomic_write_h5ad(adata, args.out)
    sizes = adata.obs["domain"].value_counts().sort_index().to_dict()
    print(f"CellScape ({args.method}): {adata.n_obs} cells, {len(head.genes)} genes, {head.graph_kind} graph; "
          f"domains {sizes} -> {out}")
    if args.plots:
        from spfm.pl import plot_cellscape_domains, plot_cellscape_umap

        stem = out.with_suffix("")
        print(plot_cellscape_domains(adata, f"{stem}_domains.png"))
        print(plot_cellscape_umap(adata, f"{stem}_umap.png"))
    return 0


def _cmd_enhance(args: argparse.Namespace) -> int:
    import numpy as np
    import scipy.sparse as sp

    from spfm.atomic import atomic_write_h5ad, read_h5ad
    from spfm.errors import DataError
    from spfm.heads.soscope import SoScope

    adatas = [read_h5ad(path, field="SPOTS") for path in args.inputs]
    if len(args.omics) != len(adatas):
        raise DataError(f"{len(adatas)} input file(s) but {len(args.omics)} --omics value(s); give one per modality",
                        field="--omics")
    feats = graph = None
    if args.image_features:
        try:
            feats = np.load(args.image_features, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read a .npy array: {exc}", path=args.image_features) from None
    if args.subspot_graph:
        try:
            graph = sp.load_npz(args.subspot_graph)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read a scipy sparse .npz: {exc}", path=args.subspot_graph) from None
    hp = {"omics": args.omics[0] if len(args.omics) == 1 else args.omics, "layout": args.layout,
          "normalize": args.normalize, "encoder_input": args.encoder_input, "image_loss": args.image_loss,
          "rounding": args.rounding, "no_image": args.no_image, "project": args.project, "seed": args.seed}
    if args.modalities:
        hp["modalities"] = args.modalities
    for key in ("stage1_epochs", "stage2_epochs", "batch_spots", "layer"):
        if getattr(args, key) is not None:
            hp[key] = getattr(args, key)
    head = SoScope(**hp)
    head.fit(adatas if len(adatas) > 1 else adatas[0], image_features=feats, subspot_graph=graph,
             device=args.device, progress=not args.no_progress)
    result = head.enhance()
    out = atomic_write_h5ad(result, args.out)
    print(f"soScope ({head.layout.spec}, {'+'.join(head.omics)}): {adatas[0].n_obs} spots -> {result.n_obs} "
          f"subspots x {result.n_vars} features -> {out}")
    if args.plots:
        from spfm.pl import plot_soscope_enhanced

        features = [f for f in args.plots.split(",") if f]
        print(plot_soscope_enhanced(adatas[0] if len(adatas) == 1 else adatas, result, features,
                                    out.with_suffix("").as_posix() + "_enhanced.png"))
    return 0


def _cmd_integrate(args: argparse.Namespace) -> int:
    from spfm.atomic import atomic_write_h5ad, read_h5ad
    from spfm.errors import DataError
    from spfm.heads.spatialglue import SpatialGlue

    paths = [Path(m) for m in args.modalities]
    if len(paths) not in (2, 3):
        raise DataError(f"integrate takes 2 or 3 modality files, got {len(paths)}", field="MOD")
    adatas = {}
    for i, path in enumerate(paths):
        name = args.names[i] if args.names else (args.kinds[i] if args.kinds else f"mod{i + 1}")
        adatas[name] = read_h5ad(path, "modality file", field="MOD")
    head = SpatialGlue(datatype=args.datatype, kinds=args.kinds, n_comps=args.n_comps, spatial_k=args.spatial_k,
                       epochs=args.epochs, lr=args.lr, n_domains=args.n_domains, cluster_method=args.method,
                       seed=args.seed, improved=args.improved)
    res = head.fit_transform(adatas, progress=not args.no_progress, device=args.device)
    out = atomic_write_h5ad(res, args.out)
    line = f"integrated {res.n_obs} spots of {', '.join(adatas)} -> {out} (obsm['X_spatialglue']"
    if "domain" in res.obs:
        line += f", obs['domain'] with {res.obs['domain'].nunique()} domains"
    print(line + ")")
    if args.plots:
        from spfm import pl

        stem = out.with_suffix("")
        if "domain" in res.obs:
            pl.plot_spatialglue_weights(res, f"{stem}_weights.png")
            print(f"figures: {pl.plot_spatialglue_domains(res, f'{stem}_domains.png')}, {stem}_weights.png")
    return 0


def _cmd_predict_expression(args: argparse.Namespace) -> int:
    from spfm.heads.histosge.recipe import load_recipe, run_recipe

    metrics = run_recipe(args.recipe, args.overrides, progress=not args.no_progress)
    out = load_recipe(args.recipe, args.overrides)["output_dir"]
    for sid, s in metrics.get("predict", {}).items():
        print(f"{sid}: mean per-gene Pearson {s['pearson']:.3f}, MSE {s['mse']:.3f}, MAE {s['mae']:.3f}")
    for sid, s in metrics.get("recovery", {}).items():
        print(f"{sid} (recovery, held-out spots): mean per-gene Pearson {s['pearson']:.3f}")
    for sid, s in metrics.get("denser", {}).items():
        print(f"{sid}: predicted {s['n_positions']} positions on the denser lattice ({s['n_measured']} measured)")
    print(f"outputs in {out}")
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

    p = sub.add_parser("demo", help="run the whole product end to end on built-in synthetic data (a few minutes)",
                       description="Generate the synthetic corpus, import a sample, cut patches, write shards, read "
                       "them back, pretrain and fine-tune a tiny ViT, save it as a Hub model and load it back, run "
                       "each head (HisToSGE, soScope, SpatialGlue, CellScape) on synthetic or simulated tissue, and "
                       "write a one-page report (report.md), a data card and figures under --out.")
    p.add_argument("--out", default="spfm_demo", help="output folder (default ./spfm_demo)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--samples", type=int, default=4, help="synthetic samples (default 4)")
    p.add_argument("--workers", type=int, default=1, help="shard-writing processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo output")
    p.add_argument("--heads", default="histosge,soscope,spatialglue,cellscape",
                   help="heads to run after the data path, comma-separated, or 'none' (default: all four)")
    p.add_argument("--no-backbone", action="store_true",
                   help="skip pretraining, fine-tuning and the Hub round trip of the tiny backbone")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("synthetic", help="write the synthetic HEST-layout corpus to a folder")
    p.add_argument("out", help="HEST root to create")
    p.add_argument("--samples", type=int, default=4, help="number of samples (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives identical files (default 0)")
    p.add_argument("--genes", type=int, default=200, help="genes in the corpus vocabulary (default 200)")
    p.add_argument("--pixel-size", type=float, default=1.0, help="slide micrometres per pixel (default 1.0)")
    p.add_argument("--overwrite", action="store_true", help="replace the generated samples if they exist")
    p.set_defaults(func=_cmd_synthetic)

    p = sub.add_parser("download", help="download a subset of HEST-1k from the Hugging Face Hub as a HEST root")
    dl = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    q = dl.add_parser("hest", help="HEST-1k (MahmoodLab/hest, gated: accept its terms and log in first)",
                      description="Download the chosen HEST-1k samples (st/, wsis/, metadata/; patches/ with "
                      "--patches) into OUT, in the HEST layout. Choose by --ids and/or the metadata filters.")
    q.add_argument("out", help="HEST root to fill (resumes: complete files are not fetched again)")
    q.add_argument("--ids", nargs="+", help="sample ids, e.g. TENX96 TENX99")
    q.add_argument("--organ", help="filter on the metadata table's organ, e.g. Bowel")
    q.add_argument("--species", help='filter on species, e.g. "Homo sapiens"')
    q.add_argument("--technology", help="filter on st_technology, e.g. Visium, Xenium, 'Spatial Transcriptomics'")
    q.add_argument("--patches", action="store_true", help="also fetch HEST's 224 px patches (patches/{id}.h5)")
    q.add_argument("--revision", help="branch, tag or commit of the dataset")
    q.set_defaults(func=_cmd_download_hest)

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

    p = sub.add_parser("run", help="run any recipe in recipes/ (training or a head), with --set overrides",
                       description="Run a recipe: a training recipe (objectives), HisToSGE (data + head sections) "
                       "or a head named by `head:` (SoScope, SpatialGlue, CellScape). --set key.path=value "
                       "changes any key before it runs.")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key (repeatable), e.g. --set optim.max_steps=10")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)

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

    p = sub.add_parser("push", help="upload a saved model or an `spfm train` output to the Hugging Face Hub",
                       description="Upload config.json, model.safetensors and a generated model card. The token "
                       "comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects the Hub.")
    p.add_argument("source", help="folder written by save_pretrained / `spfm pull`, or an `spfm train` output folder")
    p.add_argument("repo_id", help="owner/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", help="commit message")
    p.add_argument("--revision", help="branch to push to (default main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--include-restricted-weights", action="store_true",
                   help="also upload the weights of a no-derivatives backbone (UNI, Virchow2); by default only its "
                   "id is recorded and loading fetches it from its own repository")
    p.add_argument("--license", help="licence for the model card (default: the backbone's)")
    p.add_argument("--dataset", action="append", help="training dataset id for the card (repeatable)")
    p.add_argument("--tag", action="append", help="extra model-card tag (repeatable)")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("pull", help="download an spfm model repository from the Hub (pickle files skipped)")
    p.add_argument("repo_id", help="owner/name on the Hub")
    p.add_argument("out", help="local folder to write")
    p.add_argument("--revision", help="branch, tag or commit")
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("integrate", help="SpatialGlue: integrate 2-3 modalities measured on the same spots",
                       description="Preprocess each modality as the datatype preset says, train SpatialGlue, write "
                       "obsm['X_spatialglue'], per-modality embeddings, attention weights and obs['domain'].")
    p.add_argument("modalities", nargs="+", metavar="MOD.h5ad", help="2 or 3 AnnData files over the same spots "
                   "(RNA first; matched by obs_names; counts in X or layers['counts']; obsm['spatial'])")
    p.add_argument("-o", "--out", required=True, help="output h5ad")
    p.add_argument("--datatype", default="10x", help="preset: SPOTS, Stereo-CITE-seq, 10x (default), "
                   "Spatial-epigenome-transcriptome")
    p.add_argument("--n-domains", type=int, help="number of domains for obs['domain'] (default: no clustering)")
    p.add_argument("--kinds", nargs="+", choices=("rna", "protein", "atac"),
                   help="modality kinds in file order (default: the preset's; needed for three files)")
    p.add_argument("--names", nargs="+", help="modality names used in output keys (default: the kinds)")
    p.add_argument("--n-comps", type=int, help="shared input dimension (default: proteins - 1, or 50)")
    p.add_argument("--spatial-k", type=int, help="spatial neighbours (default: the preset's, 3 or 6)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4; 1e-3 with --improved)")
    p.add_argument("--improved", action="store_true", help="spfm's improvement: lr 1e-3, at most 30 epochs, domains "
                   "from the joint and per-modality embeddings together (default: the paper's method)")
    p.add_argument("--method", choices=("gmm", "kmeans", "leiden"), default="gmm",
                   help="clustering of the embedding (default gmm = mclust EEE)")
    p.add_argument("--seed", type=int, default=2022, help="seed (default 2022, the reference's)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--plots", action="store_true", help="also write OUT_domains.png and OUT_weights.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_integrate)

    p = sub.add_parser("domains", help="CellScape: spatial domains and cell types from expression + coordinates",
                       description="Train CellScape (or its spatial-only CCI variant) on one AnnData and write "
                       "obsm['X_cellscape_spatial'], obsm['X_cellscape_intrinsic'], obs['domain'] and "
                       "obs['cell_type_cluster'].")
    p.add_argument("input", metavar="IN.h5ad", help="raw counts in X or layers['counts'], coordinates in "
                   "obsm['spatial']")
    p.add_argument("-o", "--out", required=True, help="output h5ad")
    p.add_argument("--method", choices=("cellscape", "cellscape-cci"), default="cellscape",
                   help="full model, or the spatial branch only (spot platforms such as Visium)")
    p.add_argument("--n-domains", type=int, required=True, help="number of spatial domains (Gaussian mixture K)")
    p.add_argument("--n-cell-types", type=int, help="clusters of the intrinsic embedding (default: Leiden, res. 1)")
    p.add_argument("--batch-key", help="obs column of the sample: ComBat + block-diagonal graph")
    p.add_argument("--graph", choices=("auto", "knn", "delaunay"), default="auto",
                   help="spatial graph (default auto: kNN for grid platforms, Delaunay otherwise)")
    p.add_argument("--duplicates", choices=("error", "jitter"), default="error",
                   help="coincident cells under Delaunay: refuse (default) or move them by a tiny offset")
    p.add_argument("--epochs", type=int, help="training epochs (default 50)")
    p.add_argument("--batch-order", choices=("random", "spatial"),
                   help="mini-batch seeds at random (default, the paper's) or as compact patches of tissue "
                   "(spatial: much faster above ~10k cells)")
    p.add_argument("--refine", type=int, default=0, metavar="R",
                   help="majority-vote refinement over R spatial neighbours (default 0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--plots", action="store_true", help="also write OUT_domains.png and OUT_umap.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_domains)

    p = sub.add_parser("enhance", help="soScope: enhance spot profiles to K subspots per spot (resolution enhancement)",
                       description="Train soScope (VGAE pretraining, then enhancement) on spot-level data and write "
                       "an AnnData with K rows per spot, obs['parent_spot'] and subspot coordinates in "
                       "obsm['spatial'].")
    p.add_argument("inputs", nargs="+", metavar="SPOTS.h5ad",
                   help="spot-level AnnData (one per modality, same spots): values in X, obsm['spatial']")
    p.add_argument("-o", "--out", required=True, help="output h5ad of subspots")
    p.add_argument("--layout", default="square:2",
                   help="square:A[:reference], visium7, visium_split (default square:2)")
    p.add_argument("--omics", nargs="+", default=["nb"], choices=("nb", "poisson", "gaussian"),
                   help="distribution per modality (default nb)")
    p.add_argument("--modalities", nargs="+", help="modality names (default rna / mod0 mod1 ...)")
    p.add_argument("--image-features", help=".npy (N*K, L) subspot image features, row n*K+k = subspot k of spot n")
    p.add_argument("--subspot-graph", help="scipy sparse .npz (N*K x N*K) similarity graph W instead of features")
    p.add_argument("--stage1-epochs", type=int, help="VGAE pretraining epochs (default 2500)")
    p.add_argument("--stage2-epochs", type=int, help="enhancement epochs (default 2500)")
    p.add_argument("--normalize", choices=("none", "feature"), default="none",
                   help="none = the reference; feature = divide each feature by its mean per-subspot value")
    p.add_argument("--encoder-input", choices=("raw", "log1p"), default="raw", help="encoder input (default raw)")
    p.add_argument("--image-loss", choices=("auto", "dense", "sampled"), default="auto",
                   help="image BCE: exact dense, sparse + sampled negatives, or auto by size (default auto)")
    p.add_argument("--no-image", choices=("noise", "offset", "interp"), default="noise",
                   help="decoder input without image features (default noise, as the paper)")
    p.add_argument("--project", choices=("none", "aggregate"), default="none",
                   help="aggregate = subspots made to sum (counts) / average to the measured spot (default none)")
    p.add_argument("--batch-spots", type=int, help="spatial mini-batches of this many spots (default full batch)")
    p.add_argument("--layer", help="read values from this layer instead of X")
    p.add_argument("--rounding", action="store_true", help="round non-integer counts for nb/poisson")
    p.add_argument("--plots", metavar="F1,F2", help="also plot these features, spot level vs enhanced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_enhance)

    p = sub.add_parser("predict-expression", help="HisToSGE: train on H&E + expression, predict expression "
                       "(held-out slides, recovery, denser lattice) from a recipe")
    p.add_argument("recipe", type=Path, help="recipes/histosge_*.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set head.attention=chunk (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_predict_expression)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spfm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # torch_geometric's import-time torch.jit.script calls make torch print a FutureWarning that is neither the
    # user's nor spfm's to act on. The command line is an application, so it may quiet that one message (the
    # library leaves warning filters to its callers).
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
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
