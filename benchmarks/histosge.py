"""HisToSGE on HER2ST: held-out sections and 50% recovery, against a mean predictor and Ridge probes.

Prints one JSON object (``--out`` also writes it under ``benchmarks/results/``). In one run:

1. The four HER2ST sections (B4, C2, C3, C4) are imported into a HEST root with ``import_legacy_st``
   (``import_her2st`` of ``benchmarks/pretrain_value.py``, imported from there), restricted to the genes every
   section's count table lists.
2. Features per spot: a small ViT (``vit_tiny_patch16_224`` at ``--img-size`` px) over HEST's 112 um patches
   (``--img-size`` px at 112 / img-size um/px), embedded by ``spfm.models.embed.embed``:
   (i) ``random``: the ViT at random init, one init per seed (``torch.manual_seed(seed)``);
   (ii) ``pretrained``: per fold, the ViT pretrained by ``spfm.train.train`` on the three training sections only
   (``her2st_folds.pretrain_fold``: shards of those sections, expression regression + image-expression InfoNCE
   over 1000 genes, ``--pretrain-steps`` steps, one pretraining per fold with seed 0; the held-out section is never
   seen).
   ``colour``: per-channel mean, std and 10/50/90th percentiles of each patch (15 numbers), the spec's floor.
3. Leave one section out (4 folds). Targets: the top ``--genes`` (50) seurat_v3 HVGs of the training sections'
   counts, normalise-total 1e4 + log1p. Per fold and seed: the mean predictor (training mean; its Pearson is
   undefined), Ridge on PCA-256 of the features (the HEST-Bench probe, ``spfm.eval.hest_bench.run_split``), the
   published HisToSGE (chunk attention), the published model without its array-coordinate embeddings
   (``positions="none"``, an spfm option reported separately) and spfm's variant (kNN attention in um), ``--epochs``
   epochs each, sharing one gene panel per split.
4. Recovery: per section, a random 50% of spots (per seed) trains, the other half is scored (random-init
   features; chunk model trained on the kept half as its own slide, as published).

Metrics: mean per-gene Pearson (NaN genes masked, as the paper; also with a constant-predicted gene counted as 0),
MSE, MAE on the held-out spots; means over folds then seeds. ``--summarize LOG...`` aggregates the ``--partial``
logs of runs cut short (the figures in docs/histosge.md come from one complete run, not a summary).

    python benchmarks/histosge.py --seeds 0 1 2 --epochs 40 --img-size 112 --pretrain-steps 300 --workdir DIR --out
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from her2st_folds import HER2ST_SECTIONS, SHARED_DATA, import_her2st, pretrain_fold  # noqa: E402
from report import emit, peak_memory_mb, versions  # noqa: E402

BACKBONE = "vit_tiny_patch16_224"
FIELD_UM = 112.0

DATASET = f"her2st ({', '.join(HER2ST_SECTIONS)}), leave one section out; imported with import_legacy_st"
METRIC = "mean per-gene Pearson over the top HVGs of the training sections (NaN genes masked), MSE, MAE"

#: The HisToSGE settings compared: the published model, the published model without its absolute array-coordinate
#: embeddings (an spfm option, reported separately), and spfm's variant. All share one gene panel per split.
HEADS: dict[str, dict[str, Any]] = {
    "histosge_chunk": dict(attention="chunk"),                        # faithful
    "histosge_chunk_nopos": dict(attention="chunk", positions="none"),  # option: no absolute positions
    "histosge_knn": dict(attention="knn"),                            # spfm's variant
    "histosge_knn_linear": dict(attention="knn", output="linear"),    # option: no final ReLU (no dead genes)
}


def patch_config(img: int):
    from spfm.data.patches import PatchConfig

    return PatchConfig(size_px=img, pixel_size_um=FIELD_UM / img)


def colour_features(root: Path, sid: str, img: int) -> tuple[np.ndarray, list[str]]:
    """(N_kept, 15) colour statistics of each patch, and the kept barcodes (same patches as the embeddings)."""
    from spfm.data.hest import read_sample
    from spfm.data.patches import iter_patches

    sample = read_sample(root, sid)
    rows, names = [], []
    for p in iter_patches(sample, patch_config(img)):
        px = p.image.reshape(-1, 3).astype(np.float32)
        rows.append(np.concatenate([px.mean(0), px.std(0), *np.percentile(px, [10, 50, 90], axis=0)]))
        names.append(p.barcode)
    sample.close()
    return np.asarray(rows, np.float32), names


def embed_arm(root: Path, out: Path, img: int, *, seed: int | None = None, checkpoint: Path | None = None):
    """Embeddings of every section: random init from ``seed``, or ``checkpoint``; list of AnnData in section order."""
    import torch

    from spfm.heads.histosge.tasks import embed_samples

    if checkpoint is None:
        torch.manual_seed(seed)
        slides = embed_samples(root, HER2ST_SECTIONS, out, backbone=BACKBONE, backbone_kwargs={"img_size": img},
                               patch=patch_config(img))
    else:
        slides = embed_samples(root, HER2ST_SECTIONS, out, checkpoint=checkpoint, patch=patch_config(img))
    # the sections' count tables list different genes (a gene absent from a table reads as unmeasured): keep the
    # genes every section lists, so a held-out section has every target gene
    common = slides[0].var_names
    for a in slides[1:]:
        common = common.intersection(a.var_names, sort=False)
    return [a[:, common].copy() for a in slides]


def evaluate_fold(train: list, test, colour_train: list, colour_test, *, seed: int, epochs: int,
                  n_genes: int, threads: int, methods: list[str]) -> dict[str, dict[str, float]]:
    """Every method on one split; {method: scores}."""
    from spfm.eval.hest_bench import run_split
    from spfm.heads.histosge import HisToSGE
    from spfm.heads.histosge.inputs import log1p_normalised
    from spfm.heads.histosge.metrics import scores

    out: dict[str, dict[str, float]] = {}
    genes = None  # the first head picks the HVG panel of the training sections; the others reuse it
    for name in methods:
        head = HisToSGE(**HEADS[name], n_top_genes=n_genes, genes=genes, epochs=epochs, seed=seed, device="cpu")
        t0 = time.perf_counter()
        head.fit(train, progress=False)
        genes = head.genes
        pred = head.predict(test)
        out[name] = {**scores(pred.layers["predicted"], pred.layers["measured"]),
                     "seconds": round(time.perf_counter() - t0, 1)}
    y_test = pred.layers["measured"]
    y_train = np.concatenate([log1p_normalised(a, head.genes, 1e4) for a in train])
    key = head.params["embedding_key"]
    mean = np.broadcast_to(y_train.mean(0), y_test.shape)
    out["mean"] = {**scores(mean, y_test), "pearson": None, "pearson_nan_as_zero": None}
    ridge = run_split(np.concatenate([a.obsm[key] for a in train]), y_train, test.obsm[key], y_test, seed=1)
    out["ridge_pca256"] = scores(ridge["pred"], y_test)
    if colour_train is not None:
        colour = run_split(np.concatenate(colour_train), y_train, colour_test, y_test, seed=1)
        out["ridge_colour"] = scores(colour["pred"], y_test)
    return out


def recovery(slides: list, *, seed: int, epochs: int, n_genes: int, methods: list[str]
             ) -> dict[str, dict[str, float]]:
    """50% recovery per section: {method: scores averaged over sections}."""
    from spfm.eval.hest_bench import run_split
    from spfm.heads.histosge import HisToSGE
    from spfm.heads.histosge.metrics import scores
    from spfm.heads.histosge.tasks import recovery_mask

    per: dict[str, list[dict[str, float]]] = {}
    for i, a in enumerate(slides):
        keep = recovery_mask(a.n_obs, 0.5, seed=seed * 100 + i)
        genes = None
        for name in methods:
            # chunks of ~50 spots need >= 50 kept spots: every HER2ST half has >= 90
            head = HisToSGE(**HEADS[name], n_top_genes=n_genes, genes=genes, epochs=epochs, seed=seed,
                            device="cpu")
            head.fit(a, train_mask=keep, progress=False)
            genes = head.genes
            pred = head.predict(a)
            per.setdefault(name, []).append(
                scores(pred.layers["predicted"][~keep], pred.layers["measured"][~keep]))
        y = pred.layers["measured"]
        key = head.params["embedding_key"]
        ridge = run_split(a.obsm[key][keep], y[keep], a.obsm[key][~keep], y[~keep], seed=1)
        per.setdefault("ridge_pca256", []).append(scores(ridge["pred"], y[~keep]))
    return {m: _mean(v) for m, v in per.items()}


def _mean(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    keys = [k for k in rows[0] if k not in ("n_genes",)]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = round(float(np.mean(vals)), 4) if vals else None
    return out


def goals_of(m: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the Ridge probe on the same features, and the issue's goals, from one arm's method means."""
    ridge = m["ridge_pca256"]["pearson"]
    g: dict[str, Any] = {}
    for name in [k for k in m if k.startswith("histosge_")]:
        ours = m[name]["pearson"]
        g[f"{name}_over_ridge"] = round(ours / ridge, 3) if ridge and ours is not None else None
        g[f"{name}_over_ridge_nan_as_zero"] = (
            round(m[name]["pearson_nan_as_zero"] / m["ridge_pca256"]["pearson_nan_as_zero"], 3) if ridge else None)
    if "histosge_knn" in m:
        g["goal_knn_1.2x_ridge"] = bool(ridge and m["histosge_knn"]["pearson"] >= 1.2 * ridge)
    if "histosge_chunk" in m:
        g["goal_chunk_ge_ridge"] = bool(ridge and m["histosge_chunk"]["pearson"] >= ridge)
    if "histosge_chunk_nopos" in m:  # the option, reported separately from the faithful setting
        g["option_chunk_nopos_ge_ridge"] = bool(ridge and m["histosge_chunk_nopos"]["pearson"] >= ridge)
    return g


def summarize(paths: list[Path]) -> dict[str, Any]:
    """Aggregate ``--partial`` logs of runs that did not finish: per arm, the folds/seeds present and their means."""
    blocks: dict[str, Any] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            item = json.loads(line)
            blocks[item["block"]] = item["value"]
    out: dict[str, Any] = {"name": "histosge", "partial": True, "blocks_present": sorted(blocks)}
    for value in blocks.values():  # logs written before scores() reported it
        for sc in value.values():
            if "pearson_nan_as_zero" not in sc and sc.get("pearson") is not None:
                g = sc.get("n_genes", 50)  # recovery blocks are averaged over sections and drop n_genes (50 there)
                sc["pearson_nan_as_zero"] = sc["pearson"] * (g - sc["n_nan_genes"]) / g
    arms: dict[str, dict[str, list]] = {}
    for block, value in blocks.items():
        kind = block.split("/")[0]
        for method, sc in value.items():
            arms.setdefault(kind, {}).setdefault(method, []).append(sc)
    out["means_over_present_blocks"] = {k: {m: _mean(v) for m, v in ms.items()} for k, ms in arms.items()}
    out["ratios"] = {k: goals_of(v) for k, v in out["means_over_present_blocks"].items() if "ridge_pca256" in v}
    out["per_block_pearson"] = {b: {m: (None if sc.get("pearson") is None else round(sc["pearson"], 4))
                                    for m, sc in v.items()} for b, v in blocks.items()}
    out["per_block_pearson_nan_as_zero"] = {
        b: {m: (None if sc.get("pearson") is None else round(sc["pearson_nan_as_zero"], 4)) for m, sc in v.items()}
        for b, v in blocks.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40,
                        help="HisToSGE epochs (published: 1000; held-out Pearson of the chunk model falls with more)")
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--arms", nargs="*", default=["random", "pretrained"], choices=["random", "pretrained"],
                        help="feature arms of the held-out-section benchmark (none: recovery only)")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--folds", nargs="+", default=list(HER2ST_SECTIONS), choices=list(HER2ST_SECTIONS),
                        help="held-out sections to run (default all four; fewer only for a quick check)")
    parser.add_argument("--recovery-methods", nargs="+", default=["histosge_chunk", "histosge_knn"],
                        choices=list(HEADS), help="HisToSGE settings in the 50%% recovery task")
    parser.add_argument("--no-recovery", action="store_true")
    parser.add_argument("--methods", nargs="+", default=list(HEADS), choices=list(HEADS),
                        help="HisToSGE settings to run (mean predictor and Ridge probes always run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one ran fastest on a busy 2-core box)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the HEST root, embeddings, pretraining")
    parser.add_argument("--partial", type=Path, default=None, help="append each finished block's JSON here")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None,
                        help="only aggregate these --partial logs (runs cut short) and print/write that JSON")
    parser.add_argument("--out", nargs="?", type=Path, const=True, default=None)
    args = parser.parse_args(argv)
    if args.summarize:
        result = summarize(args.summarize)
        # the settings of the run that wrote the logs: pass the same --epochs/--img-size/--pretrain-steps/--seeds
        result.update(dataset=DATASET, metric=METRIC, features=f"{BACKBONE} at {args.img_size} px, patches of "
                      f"{FIELD_UM:g} um", settings=dict(epochs=args.epochs, published_epochs=1000, lr=1e-3,
                                                        chunk_size=50, n_neighbors=8, seeds=args.seeds,
                                                        img_size=args.img_size, pretrain_steps=args.pretrain_steps,
                                                        methods={m: HEADS[m] for m in args.methods}))
        result["versions"] = versions("numpy", "torch", "timm", "sklearn")
        return emit(result, args.out, "histosge_her2st_partial.json")

    import torch

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    seconds: dict[str, float] = {}
    folds = list(HER2ST_SECTIONS)
    held_out = list(args.folds)

    def log(block: str, value: Any) -> None:
        if args.partial is not None:
            with open(args.partial, "a") as f:
                f.write(json.dumps({"block": block, "value": value}) + "\n")
        print(f"[histosge bench] {block}: {json.dumps(value)}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="spfm-histosge-") as tmp:
        work = args.workdir or Path(tmp)
        root = work / "hest"
        t0 = time.perf_counter()
        import_her2st(args.data, root)
        colour = {sid: colour_features(root, sid, args.img_size) for sid in folds}
        seconds["import_and_colour"] = round(time.perf_counter() - t0, 1)

        arms: dict[str, Any] = {}
        for arm in args.arms:
            t0 = time.perf_counter()
            per_seed = []
            for seed in args.seeds:
                per_fold = {}
                for held in held_out:
                    if arm == "random":
                        slides = embed_arm(root, work / f"emb_random_{seed}", args.img_size, seed=seed)
                    else:
                        ckpt = pretrain_fold(root, [s for s in folds if s != held], work, backbone=BACKBONE,
                                             img_size=args.img_size, steps=args.pretrain_steps, seed=0)
                        slides = embed_arm(root, work / f"emb_pretrained_{held}", args.img_size, checkpoint=ckpt)
                    by_id = dict(zip(folds, slides))
                    train_ids = [s for s in folds if s != held]

                    def colour_of(sid: str, a) -> np.ndarray:
                        row = {name: i for i, name in enumerate(colour[sid][1])}
                        missing = [n for n in a.obs_names if n not in row]
                        if missing:  # embed and colour cut the same patches (same PatchConfig)
                            raise RuntimeError(f"{sid}: {len(missing)} embedded spots have no colour patch")
                        return colour[sid][0][[row[n] for n in a.obs_names]]

                    res = evaluate_fold([by_id[s] for s in train_ids], by_id[held],
                                        [colour_of(s, by_id[s]) for s in train_ids], colour_of(held, by_id[held]),
                                        seed=seed, epochs=args.epochs, n_genes=args.genes, threads=args.threads,
                                        methods=args.methods)
                    per_fold[held] = res
                    log(f"{arm}/seed{seed}/{held}", res)
                per_seed.append({"seed": seed, "folds": per_fold,
                                 "mean": {m: _mean([per_fold[f][m] for f in held_out]) for m in per_fold[held_out[0]]}})
            methods = per_seed[0]["mean"].keys()
            arms[arm] = {"seeds": args.seeds, "mean_over_seeds": {m: _mean([s["mean"][m] for s in per_seed])
                                                                  for m in methods},
                         "per_seed": per_seed}
            if arm == "pretrained":
                arms[arm]["pretraining"] = {"steps": args.pretrain_steps, "per_fold": "one run, seed 0",
                                            "how": "her2st_folds.pretrain_fold (expression + InfoNCE, 1000 genes)"}
            seconds[arm] = round(time.perf_counter() - t0, 1)

        rec = None
        if not args.no_recovery:
            t0 = time.perf_counter()
            rows = []
            for seed in args.seeds:
                slides = embed_arm(root, work / f"emb_random_{seed}", args.img_size, seed=seed)
                r = recovery(slides, seed=seed, epochs=args.epochs, n_genes=args.genes,
                             methods=args.recovery_methods)
                log(f"recovery/seed{seed}", r)
                rows.append(r)
            rec = {"fraction_kept": 0.5, "features": "random", "seeds": args.seeds,
                   "mean_over_seeds": {m: _mean([r[m] for r in rows]) for m in rows[0]}}
            seconds["recovery"] = round(time.perf_counter() - t0, 1)

    goals = {arm: goals_of(res["mean_over_seeds"]) for arm, res in arms.items()}
    result = dict(
        name="histosge",
        dataset=DATASET,
        metric=METRIC,
        targets=f"top {args.genes} seurat_v3 HVGs of the training sections, normalise_total 1e4 + log1p",
        features=f"{BACKBONE} at {args.img_size} px, patches of {FIELD_UM:g} um",
        settings=dict(epochs=args.epochs, published_epochs=1000, lr=1e-3, chunk_size=50, n_neighbors=8,
                      threads=args.threads, methods={m: HEADS[m] for m in args.methods},
                      pretrain_steps=args.pretrain_steps, img_size=args.img_size, folds=held_out),
        arms=arms, ratios=goals, recovery=rec,
        seconds={**seconds, "total": round(time.perf_counter() - began, 1)},
        peak_memory_mb=peak_memory_mb(),
        versions=versions("numpy", "torch", "timm", "sklearn"),
    )
    return emit(result, args.out, "histosge_her2st.json")


if __name__ == "__main__":
    main()
