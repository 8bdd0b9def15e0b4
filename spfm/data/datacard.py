"""Data cards for shard sets: markdown with YAML front matter, written from a shard manifest.

The front matter follows the Hugging Face dataset card fields (``pretty_name``, ``license``, ``size_categories``,
``task_categories``, ``tags``) and declares ``configs``/``data_files`` with one shard glob per split, so a shard
directory pushed to the Hub (or read locally) loads with ``datasets.load_dataset``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from spfm.atomic import atomic_write_text
from spfm.data.records import COUNTS_EXT, GENES_EXT, META_EXT
from spfm.data.splits import SPLITS

#: Licence texts seen in HEST metadata -> Hugging Face licence ids.
_LICENSE_IDS = {
    "creative commons attribution": "cc-by-4.0",
    "cc by 4.0": "cc-by-4.0",
    "cc-by-4.0": "cc-by-4.0",
    "cc by-nc 4.0": "cc-by-nc-4.0",
    "cc-by-nc-4.0": "cc-by-nc-4.0",
    "creative commons attribution-noncommercial": "cc-by-nc-4.0",
    "cc by-nc-sa 4.0": "cc-by-nc-sa-4.0",
    "cc-by-nc-sa-4.0": "cc-by-nc-sa-4.0",
    "cc0": "cc0-1.0",
    "cc0-1.0": "cc0-1.0",
    "mit": "mit",
    "apache-2.0": "apache-2.0",
}
#: The record's JSON fields and their Arrow types. Declared in the card because ``datasets`` otherwise infers them
#: from the first records, and a first sample without array coordinates (null) makes later integers fail to cast.
META_FEATURES = (("sample_id", "string"), ("barcode", "string"), ("x", "float64"), ("y", "float64"),
                 ("array_row", "int64"), ("array_col", "int64"), ("pixel_size_um", "float64"),
                 ("technology", "string"), ("organ", "string"), ("species", "string"), ("patient", "string"),
                 ("split", "string"))
_SIZE_BOUNDS = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def size_category(n: int) -> str:
    """The Hugging Face ``size_categories`` bucket of ``n`` records."""
    for bound, name in _SIZE_BOUNDS:
        if n < bound:
            return name
    return "n>1B"


def _license(manifest: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(Hub licence id or None when unknown, the distinct licence texts of the samples)."""
    texts = sorted({s["license"] for s in manifest["samples"].values() if s.get("license")})
    if not texts:
        return None, []
    unknown = any(not s.get("license") for s in manifest["samples"].values())
    ids = {_LICENSE_IDS.get(t.strip().lower(), "other") for t in texts}
    if unknown or len(ids) != 1:
        return "other", texts
    return ids.pop(), texts


def front_matter(manifest: dict[str, Any], pretty_name: str | None = None) -> dict[str, Any]:
    """The YAML front matter of a shard set's card."""
    samples = manifest["samples"]
    organs = sorted({s["organ"] for s in samples.values() if s.get("organ")})
    technologies = sorted({s["technology"] for s in samples.values() if s.get("technology")})
    meta: dict[str, Any] = {}
    meta["pretty_name"] = pretty_name or (
        f"spfm shards: {', '.join(technologies) or 'spatial transcriptomics'} ({', '.join(organs) or 'tissue'})")
    license_id, _ = _license(manifest)
    if license_id is not None:
        meta["license"] = license_id
    meta["size_categories"] = [size_category(manifest["totals"]["records"])]
    meta["task_categories"] = ["image-feature-extraction", "tabular-regression"]
    meta["tags"] = ["spatial-transcriptomics", "histopathology", "h-and-e", "webdataset", "biology", "spfm"]
    # one glob per split that has shards: datasets refuses a pattern that matches nothing
    present = [split for split in SPLITS if manifest["totals"]["records_per_split"].get(split)]
    meta["configs"] = [{
        "config_name": "default",
        "data_files": [{"split": split, "path": f"{split}/*.tar"} for split in present],
    }]
    meta["dataset_info"] = {"features": [
        {"name": manifest["image_format"], "dtype": "image"},
        {"name": GENES_EXT, "sequence": "uint32"},
        {"name": COUNTS_EXT, "sequence": "float32"},
        {"name": META_EXT, "struct": [{"name": name, "dtype": dtype} for name, dtype in META_FEATURES]},
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
    ]}
    return meta


def render_data_card(manifest: dict[str, Any], pretty_name: str | None = None) -> str:
    """The card as markdown text with YAML front matter."""
    meta = front_matter(manifest, pretty_name)
    totals, patch = manifest["totals"], manifest["patch"]
    present = [split for split in SPLITS if totals["records_per_split"].get(split)]
    _, license_texts = _license(manifest)
    per_split = ", ".join(f"{split}: {totals['records_per_split'][split]}" for split in SPLITS)
    image = "JPEG (quality {})".format(manifest["jpeg_quality"]) if manifest["image_format"] == "jpg" else "PNG"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {meta['pretty_name']}",
        "",
        f"WebDataset shards written by `spfm shard` (spfm {manifest['spfm_version']}, {manifest['created']}). "
        "Each record is one spot: an H&E patch centred on it, its raw counts over the gene vocabulary, and its "
        "metadata. Splits are by patient (a sample without a patient is its own group), never by spot.",
        "",
        "## Samples",
        "",
        "| sample | organ | species | technology | patient | split | spots | records |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sid, s in manifest["samples"].items():
        cells = [sid, s.get("organ"), s.get("species"), s.get("technology"), s.get("patient"), s["split"],
                 s["n_spots"], s["n_records"]]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    lines += [
        "",
        "## Totals",
        "",
        f"- samples: {totals['samples']}; shards: {totals['shards']}; records: {totals['records']} "
        f"({per_split}); "
        f"bytes: {totals['bytes']:,}",
        f"- spots: {totals['spots']}; dropped as mostly off tissue: {totals['dropped_tissue']}; "
        f"dropped at the slide edge: {totals['dropped_edge']}",
        "",
        "## Patches",
        "",
        f"- {patch['size_px']} x {patch['size_px']} px at {patch['pixel_size_um']} um/px "
        f"({patch['size_px'] * patch['pixel_size_um']:g} um field), stored as {image}",
        f"- tissue threshold: a pixel is tissue when max(RGB) - min(RGB) > {patch['tissue_saturation']}; "
        f"patches with less than {patch['min_tissue_fraction']:g} tissue are dropped",
        f"- slide edge: patches reaching past it are {'padded with white' if patch['edge'] == 'pad' else 'dropped'}",
        "",
        "## Genes",
        "",
        f"- vocabulary: {manifest['n_genes']} genes ({manifest['gene_mode']}); the list is in `manifest.json` "
        "(`genes`), with each sample's measured genes as a packed bit mask (`samples.{id}.measured`)",
        f"- record fields: `{manifest['image_format']}` patch, `genes.npy` (uint32 vocabulary indices), "
        "`counts.npy` (float32 raw counts at those indices; zeros not stored), `json` (sample_id, barcode, x, y, "
        "array_row, array_col, pixel_size_um, technology, organ, species, patient, split)",
        "",
        "## Splits",
        "",
        f"- by {manifest['split_by']} ({manifest['split_assignment']}"
        + (f", seed {manifest['split_seed']}, fractions {manifest['split_fractions']}"
           if manifest["split_assignment"] == "seeded" else "") + ")",
    ]
    for split in SPLITS:
        lines.append(f"- {split}: {', '.join(manifest['splits'][split]) or '(none)'}")
    if license_texts:
        lines += ["", "## Licence", "", "Sample licences as recorded in their metadata: "
                  + "; ".join(license_texts) + "."]
    data_files = "{" + ", ".join(f'"{sp}": "SHARDS/{sp}/*.tar"' for sp in present) + "}"
    lines += [
        "",
        "## Loading",
        "",
        "Paths are relative to the shard directory (`SHARDS` below), which holds `manifest.json` and this card.",
        "",
        "```python",
        "from spfm.data.loader import make_loader",
        "",
        'loader = make_loader("SHARDS", split="train", batch_size=32)',
        "batch = next(iter(loader))  # image (B, 3, H, W), expression (B, G), mask (B, G), meta, key",
        "```",
        "",
        "With Hugging Face `datasets`, load the directory (this card declares the splits and the column types) or "
        "name the shards yourself:",
        "",
        "```python",
        "import datasets",
        "",
        'ds = datasets.load_dataset("SHARDS")',
        "# naming the shards: column types are inferred from the first records, which fails when some samples",
        "# have array coordinates and others not; pass features= (this card's dataset_info) in that case",
        f'ds = datasets.load_dataset("webdataset", data_files={data_files})',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_data_card(manifest: dict[str, Any], path: str | os.PathLike, *, pretty_name: str | None = None) -> Path:
    """Write the data card of a shard manifest to ``path`` (atomically)."""
    path = Path(path)
    atomic_write_text(path, render_data_card(manifest, pretty_name))
    return path


def _counts(series: Any, top: int | None = None) -> str:
    counts = series.fillna("(not recorded)").astype(str).value_counts()
    shown = counts if top is None else counts.head(top)
    text = ", ".join(f"{name} {n}" for name, n in shown.items())
    rest = counts.iloc[len(shown):].sum()
    return text + (f", {len(counts) - len(shown)} others {rest}" if rest else "")


def render_hest1k_card(table_path: str | os.PathLike) -> str:
    """The HEST-1k card (``data_cards/hest1k.md``), every figure computed from a HEST metadata table.

    Args:
        table_path: ``HEST_v*.csv`` from the dataset's root (one row per sample).
    """
    import pandas as pd

    table_path = Path(table_path)
    t = pd.read_csv(table_path)
    n = len(t)
    by_tech = t.groupby("st_technology")
    spots = int(t["spots_under_tissue"].sum())
    no_patient = int(t["patient"].isna().sum())
    meta = {
        "pretty_name": "HEST-1k",
        "license": "cc-by-nc-sa-4.0",
        "size_categories": [size_category(n)],
        "task_categories": ["image-feature-extraction", "tabular-regression"],
        "tags": ["spatial-transcriptomics", "histopathology", "h-and-e", "visium", "xenium", "biology"],
        "source_datasets": ["https://huggingface.co/datasets/MahmoodLab/hest"],
        "metadata_table": table_path.name,
        "size": {"samples": n, "spots_or_cells_under_tissue": spots, "patients_recorded": int(t["patient"].nunique()),
                 "download_gb": 743},
    }
    tech_rows = [f"| {tech} | {len(g)} | {int(g['spots_under_tissue'].sum()):,} | "
                 f"{int(g['spots_under_tissue'].median()):,} | {int(g['nb_genes'].median()):,} |"
                 for tech, g in sorted(by_tech, key=lambda kv: -len(kv[1]))]
    px = t["pixel_size_um_estimated"]
    organs = t["organ"].value_counts()
    top2, share = [str(o).lower() for o in organs.index[:2]], organs.iloc[:2].sum() / n
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        "# HEST-1k", "",
        "HEST-1k (Jaume et al. 2024, *HEST-1k: A Dataset for Spatial Transcriptomics and Histology Image "
        "Analysis*, Mahmood Lab) pairs spatial transcriptomics profiles with their H&E whole-slide images, "
        "collected from public studies and re-processed into one layout. It is the corpus spfm pretrains on and "
        "the layout every spfm reader and importer uses. This card is computed from the dataset's metadata table "
        f"(`{table_path.name}`) by `spfm.data.datacard.render_hest1k_card`; the dataset itself lives at "
        "https://huggingface.co/datasets/MahmoodLab/hest.", "",
        "## Licence and access", "",
        "- HEST-1k is distributed under **CC BY-NC-SA 4.0** (attribution, non-commercial, share-alike). Models "
        "trained on it inherit the non-commercial condition in practice; say so on their model cards "
        "(`spfm push ... --dataset hest-1k` records it).",
        "- Each sample also carries its source study's licence in the `license` column (counts: "
        f"{_counts(t['license'], top=4)}); the most restrictive applies to that sample.",
        "- The Hub dataset is gated: accept its terms at https://huggingface.co/datasets/MahmoodLab/hest while "
        "logged in, then `huggingface-cli login` or set `HF_TOKEN`.", "",
        "## Contents", "",
        f"{n} samples ({_counts(t['hest_version_added'])} by release), {spots:,} spots (or cells) under tissue.", "",
        "| technology | samples | spots under tissue | median per sample | median genes |",
        "|---|---|---|---|---|", *tech_rows, "",
        f"- species: {_counts(t['species'])}",
        f"- organs: {_counts(t['organ'], top=12)}",
        f"- disease state: {_counts(t['disease_state'])}",
        f"- preservation: {_counts(t['preservation_method'])}",
        f"- magnification: {_counts(t['magnification'])}",
        f"- pixel size (um/px, estimated): median {px.median():.3f}, range {px.min():.3f}-{px.max():.3f}",
        f"- patient recorded for {n - no_patient} samples ({int(t['patient'].nunique())} patients); "
        f"missing for {no_patient}", "",
        "## Files (per sample id)", "",
        "| path | what | spfm reads it |", "|---|---|---|",
        "| `st/{id}.h5ad` | AnnData: raw counts, `obsm[\"spatial\"]` full-resolution pixel (x, y) | yes |",
        "| `wsis/{id}.tif` | pyramidal TIFF of the H&E slide | yes |",
        "| `metadata/{id}.json` | the row of the metadata table, plus pixel sizes | yes |",
        "| `patches/{id}.h5` | 224 px patches at 0.5 um/px (`img`, `coords`, `barcode`) | with `--patches` |",
        "| `cellvit_seg/`, `tissue_seg/`, `xenium_seg/`, `transcripts/`, `thumbnails/`, `spatial_plots/` | "
        "segmentations, transcripts and previews | no |", "",
        "## How spfm uses it", "",
        "```bash",
        "spfm download hest hest_data --ids TENX96 TENX99             # by id",
        'spfm download hest hest_data --organ Bowel --species "Homo sapiens" --technology Visium',
        "spfm list hest_data",
        "spfm shard hest_data hest_shards --genes union --workers 8     # WebDataset shards + manifest + card",
        "spfm train recipes/pretrain_hest1k.yaml",
        "```", "",
        "`spfm download hest` is `huggingface_hub.snapshot_download(\"MahmoodLab/hest\", repo_type=\"dataset\", "
        "allow_patterns=[\"st/{id}.*\", \"wsis/{id}.*\", \"metadata/{id}.*\"])` for the chosen ids (filters read "
        "the newest `HEST_v*.csv`), so it fetches only what spfm reads and resumes where it stopped. `spfm shard` "
        "cuts 224 px patches at 0.5 um/px around every spot under tissue (Xenium samples are HEST's pseudo-spots), "
        "maps counts onto one gene vocabulary (union, intersection or a panel; human and mouse symbols differ, so "
        "a mixed-species union is roughly the sum of both) and splits by patient.", "",
        "## Caveats", "",
        f"- Splits: {no_patient} of {n} samples record no patient, and spfm then treats each such sample as its "
        "own group. Sections of one patient from one study can therefore land in different splits. For "
        "benchmarks, split by study (`dataset_title`) or use the HEST-Benchmark splits (`spfm bench hest` reads "
        "them), and pass explicit splits to `spfm shard --splits`.",
        "- Technologies differ in spot size (legacy ST 100-150 um, Visium 55 um, Visium HD 2 um bins, Xenium "
        "cells) and depth; a 112 um patch sees one Visium spot but many Xenium cells.",
        "- Gene panels differ widely (Xenium panels have a few hundred genes; Visium whole-transcriptome ~18k). "
        "The shard manifest records which vocabulary genes each sample measured, and spfm's loader masks the rest.",
        f"- HEST-1k is not a random sample of tissue: some organs and studies dominate ({top2[0]} and "
        f"{top2[1]} are {share:.0%} of the samples).", "",
        "## Citation", "",
        "Jaume G., Doucet P., Song A. H., et al. HEST-1k: A Dataset for Spatial Transcriptomics and Histology "
        "Image Analysis. NeurIPS Datasets and Benchmarks, 2024.", "",
    ]
    return "\n".join(lines)
