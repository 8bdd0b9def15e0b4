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
