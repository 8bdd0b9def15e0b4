"""``spfm demo``: the whole product end to end on the built-in synthetic corpus, on a CPU in a few minutes.

generate -> import (a legacy-ST export of one sample, read back through the importer) -> patch -> shard ->
read back through the training loader -> pretrain a tiny ViT -> fine-tune it (LoRA) -> save it as a Hub model and
load it back -> the heads (HisToSGE, soScope, SpatialGlue, CellScape; ``--heads`` chooses) -> a one-page report.
Everything lands under one folder::

    OUT/hest/               the synthetic HEST root (st/, wsis/, metadata/)
    OUT/raw/legacy_st/      one sample exported as legacy ST files (counts TSV, spot selection, JPEG)
    OUT/imported/           ... and imported back with the legacy-ST importer
    OUT/shards/             WebDataset shards per split, manifest.json, README.md (the data card)
    OUT/figures/patches.png slide thumbnails with their spots and example patches
    OUT/backbone/recipes/   the pretraining and fine-tuning recipes that ran (rerun them with ``spfm train``)
    OUT/backbone/pretrain/  ``spfm train`` output: checkpoints, metrics.json, final/ (the backbone)
    OUT/backbone/finetune/  the same for the LoRA fine-tune (LoRA merged into final/)
    OUT/backbone/model/     the fine-tuned backbone as a Hub model (config.json, model.safetensors, README.md)
    OUT/heads/histosge/     HisToSGE on the demo slides with the fine-tuned backbone: maps, denser lattice
    OUT/heads/soscope/      soScope: a 2 x 2 merge enhanced back, subspot AnnData and figure
    OUT/heads/spatialglue/  SpatialGlue: the paper's simulation integrated, domains and modality-weight figures
    OUT/heads/cellscape/    CellScape: simulated cortex-like layers, domains beside the truth
    OUT/summary.json        the figures the demo prints
    OUT/report.md           one page: every step's figures and plots
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from spfm.atomic import atomic_write_json
from spfm.errors import DataError


def _step(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def export_legacy_st(root: Path, sample_id: str, out: Path) -> dict[str, Path]:
    """Write one HEST sample as legacy Spatial Transcriptomics files (what a user brings to ``spfm import``).

    Spot ids are ``{array_col}x{array_row}``; the image is saved as a JPEG without pixel-size metadata, as in HER2ST.
    """
    import pandas as pd
    import scipy.sparse as sp
    from PIL import Image

    from spfm.data.hest import read_sample

    sample = read_sample(root, sample_id)
    adata = sample.adata
    if "array_row" not in adata.obs or "array_col" not in adata.obs:
        raise DataError("legacy ST export needs array_row/array_col in obs", path=root / "st" / f"{sample_id}.h5ad")
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"{c}x{r}" for r, c in zip(adata.obs["array_row"], adata.obs["array_col"])]
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    paths = dict(counts=out / f"{sample_id}.tsv.gz", spots=out / f"{sample_id}_selection.tsv",
                 image=out / f"{sample_id}.jpg")
    pd.DataFrame(X.astype(np.int64), index=ids, columns=adata.var_names).to_csv(paths["counts"], sep="\t")
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    pd.DataFrame(dict(x=adata.obs["array_col"].to_numpy(), y=adata.obs["array_row"].to_numpy(), pixel_x=xy[:, 0],
                      pixel_y=xy[:, 1], selected=1)).to_csv(paths["spots"], sep="\t", index=False)
    w, h = sample.slide.dimensions
    Image.fromarray(sample.slide.read_region(0, 0, w, h)).save(paths["image"], quality=92)
    sample.close()
    return paths


HEADS = ("histosge", "soscope", "spatialglue", "cellscape")


def _one_thread(fn, *args, **kwargs):
    """Run ``fn`` on one torch thread: the demo's problems are small (a few hundred to a few thousand spots, 32 px
    images), where intra-op threads cost more than they give; on a busy 2-core machine two threads ran the soScope
    demo 15x slower than one (56 s against 3.5 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _run_head(name: str, out: Path, seed: int, **kwargs) -> dict:
    """One head's demo (``spfm.heads.<name>.run_demo_<name>``), its metrics as it returns them."""
    import importlib

    module = importlib.import_module(f"spfm.heads.{name}")
    return _one_thread(getattr(module, f"run_demo_{name}"), out, seed, **kwargs)


def _print_metrics(metrics: dict, indent: str = "  ") -> None:
    for key, value in metrics.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_metrics(value, indent + "  ")
        elif isinstance(value, float):
            print(f"{indent}{key}: {value:.4g}")
        else:
            print(f"{indent}{key}: {value}")


def run_demo(out: str | os.PathLike = "spfm_demo", *, seed: int = 0, n_samples: int = 4, workers: int = 1,
             overwrite: bool = False, heads: tuple[str, ...] | list[str] = HEADS, backbone: bool = True) -> dict:
    """Run the demo and return its summary (also written to ``OUT/summary.json``; ``OUT/report.md`` shows it).

    Args:
        out: the output folder (must be empty or absent unless ``overwrite``).
        seed: seeds the corpus, the training runs and the heads.
        n_samples: samples in the synthetic corpus.
        workers: shard-writing processes.
        overwrite: replace an existing output folder.
        heads: the heads to run after the data path (default all four; empty: none).
        backbone: pretrain, fine-tune, save and reload the tiny backbone after the data path.
    """
    unknown = sorted(set(heads) - set(HEADS))
    if unknown:
        raise DataError(f"unknown head(s) {unknown}; choose from {', '.join(HEADS)}", field="heads")
    from spfm.data.hest import list_samples, read_sample
    from spfm.data.importers import import_legacy_st
    from spfm.data.loader import make_loader
    from spfm.data.patches import PatchConfig, PatchStats, iter_patches
    from spfm.data.shards import verify_shards, write_shards
    from spfm.data.synthetic import make_synthetic_corpus
    from spfm.pl import plot_patches

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError("output folder exists and is not empty; pass --overwrite to replace it", path=out)
        shutil.rmtree(out)
    summary: dict = {"out": str(out), "seed": seed, "seconds": {}}
    start = time.perf_counter()

    t = _step(f"generate: synthetic HEST corpus ({n_samples} samples, seed {seed})")
    root = make_synthetic_corpus(out / "hest", n_samples=n_samples, seed=seed)
    table = list_samples(root)
    print(table.to_string(index=False))
    summary["samples"] = table.to_dict(orient="records")
    summary["seconds"]["generate"] = time.perf_counter() - t

    t = _step("import: export one sample as legacy ST files and import it back")
    technology = table.set_index("sample_id").technology
    legacy = next((sid for sid in table.sample_id if technology[sid] == "Spatial Transcriptomics"), None)
    if legacy is None:
        print("no legacy-ST sample in this corpus; skipping the import step")
    else:
        files = export_legacy_st(root, legacy, out / "raw" / "legacy_st")
        meta = table.set_index("sample_id").loc[legacy]
        import_legacy_st(files["counts"], files["spots"], files["image"], legacy, out / "imported",
                         organ=meta.organ, species=meta.species, patient=meta.patient)
        original, imported = read_sample(root, legacy), read_sample(out / "imported", legacy)
        same_counts = float(np.asarray(original.adata.X.sum())) == float(np.asarray(imported.adata.X.sum()))
        print(f"{legacy}: {imported.adata.n_obs} spots imported, counts identical: {same_counts}, pixel size "
              f"estimated from the spot pitch {imported.pixel_size_um:.3f} um/px (true {original.pixel_size_um:.3f})")
        summary["import"] = dict(sample_id=legacy, n_spots=int(imported.adata.n_obs), counts_identical=same_counts,
                                 pixel_size_estimated=imported.pixel_size_um, pixel_size_true=original.pixel_size_um)
    summary["seconds"]["import"] = time.perf_counter() - t

    t = _step("patch: spot-centred patches, 224 px at 0.5 um/px, tissue filter")
    config = PatchConfig()
    examples = {}
    for sid in table.sample_id:
        sample = read_sample(root, sid)
        stats = PatchStats()
        examples[sid] = []
        step = max(1, sample.adata.n_obs // 6)  # six examples spread over the slide, not its first row
        for i, patch in enumerate(iter_patches(sample, config, stats)):
            if i % step == step // 2 and len(examples[sid]) < 6:
                examples[sid].append(patch)
        print(f"{sid}: level {stats.level}, {stats.source_px:.0f} px source region, kept {stats.n_kept}/"
              f"{stats.n_spots} (dropped {stats.n_dropped_tissue} off tissue, {stats.n_padded} padded at the edge)")
        sample.close()
    figure = plot_patches(root, examples, out / "figures" / "patches.png")
    print(f"figure: {figure}")
    summary["seconds"]["patch"] = time.perf_counter() - t

    t = _step("shard: WebDataset shards, split by patient, manifest and data card")
    manifest = write_shards(root, out / "shards", patch=config, workers=workers)
    problems = verify_shards(out / "shards")
    print(f"{manifest['totals']['records']} records, {manifest['totals']['shards']} shards, "
          f"{manifest['totals']['bytes'] / 1e6:.1f} MB, {len(manifest['genes'])} genes; checksums "
          f"{'OK' if not problems else 'FAILED: ' + '; '.join(problems)}")
    for split, ids in manifest["splits"].items():
        patients = sorted({manifest["samples"][s]["patient"] for s in ids})
        print(f"  {split:5s}: samples {', '.join(ids) or '-'}; patients {', '.join(map(str, patients)) or '-'}")
    summary["shards"] = dict(totals=manifest["totals"], splits=manifest["splits"], checksums_ok=not problems,
                             data_card=str(out / "shards" / "README.md"))
    summary["seconds"]["shard"] = time.perf_counter() - t

    t = _step("read back: training loader (shuffle, augmentation, gene panel with mask)")
    def read_back() -> tuple[int, dict | None]:
        n_seen, batch = 0, None
        for batch in make_loader(out / "shards", split="train", batch_size=32, shuffle=256, augment=True, seed=seed):
            n_seen += batch["image"].shape[0]
        return n_seen, batch

    n_seen, batch = _one_thread(read_back)
    if batch is None:
        raise DataError("the train split is empty", path=out / "shards")
    train_records = sum(manifest["samples"][s]["n_records"] for s in manifest["splits"]["train"])
    print(f"read {n_seen} of {train_records} train records; last batch image {tuple(batch['image'].shape)} "
          f"{batch['image'].dtype}, expression {tuple(batch['expression'].shape)}, measured fraction "
          f"{batch['mask'].float().mean():.2f}")
    summary["read_back"] = dict(records=n_seen, expected=train_records, image_shape=list(batch["image"].shape),
                                expression_shape=list(batch["expression"].shape))
    summary["seconds"]["read_back"] = time.perf_counter() - t

    if backbone:
        from spfm.demo.backbone import run_backbone_demo

        t = _step("backbone: pretrain a tiny ViT, fine-tune it with LoRA, save it as a Hub model and load it back")
        summary["backbone"] = _one_thread(run_backbone_demo, out / "shards", out / "backbone", seed)
        summary["seconds"]["backbone"] = time.perf_counter() - t

    summary["heads"] = {}
    for name in heads:
        t = _step(f"head: {name}")
        # HisToSGE embeds the demo's own slides with the backbone trained above (random init without it)
        extra = {} if name != "histosge" else dict(
            root=root, checkpoint=summary["backbone"]["checkpoint"] if backbone else None)
        metrics = _run_head(name, out / "heads" / name, seed, **extra)
        _print_metrics(metrics)
        summary["heads"][name] = metrics
        summary["seconds"][name] = time.perf_counter() - t

    from spfm.demo.report import write_report

    summary["seconds"]["total"] = time.perf_counter() - start
    atomic_write_json(out / "summary.json", summary)
    report = write_report(summary, out)
    print(f"\ndone in {summary['seconds']['total']:.1f} s; report {report}, data card {out / 'shards' / 'README.md'}, "
          f"summary {out / 'summary.json'}")
    return summary
