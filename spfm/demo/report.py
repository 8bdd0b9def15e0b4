"""The demo's one-page report: ``OUT/report.md``, the figures beside it as PNG, every number from ``summary.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spfm.atomic import atomic_write_text

#: What each head's demo shows, one line each (the report's captions).
HEAD_CAPTIONS = {
    "histosge": "HisToSGE: expression predicted from H&E on the held-out patient's slide, with features from the "
                "backbone pretrained and fine-tuned above (published chunk attention and spfm's kNN attention, "
                "against the Ridge probe on the same features), then on a 4x denser lattice.",
    "soscope": "soScope: a 2 x 2 merge of synthetic subspots enhanced back to subspot resolution, against copying "
               "the parent spot.",
    "spatialglue": "SpatialGlue: two modalities of the paper's simulation integrated; domains against the truth "
                   "(published model and spfm's improved option).",
    "cellscape": "CellScape: domains of simulated cortex-like layers against the truth and a non-spatial floor.",
}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(rows: dict[str, Any], header: tuple[str, str] = ("metric", "value")) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{k}` | {_value(v)} |" for k, v in rows.items()]
    return lines + [""]


def _figures(out: Path, folder: Path) -> list[str]:
    return [f"![{png.stem}]({png.relative_to(out).as_posix()})\n" for png in sorted(folder.rglob("*.png"))]


def write_report(summary: dict[str, Any], out: Path) -> Path:
    """Write ``out/report.md`` from the demo's summary and the figures under ``out``; return its path."""
    out = Path(out)
    seconds = summary.get("seconds", {})
    lines = ["# spfm demo report", "",
             f"Seed {summary.get('seed')}, {seconds.get('total', 0):.0f} s in all. Every figure below is in "
             f"`summary.json`; the folders are described in the README (`spfm demo`).", "",
             "| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {sec:.1f} |" for step, sec in seconds.items() if step != "total"] + [""]

    lines += ["## Data", "", "The synthetic corpus (HEST layout), one sample exported as legacy ST files and "
              "imported back, spot-centred patches and WebDataset shards split by patient.", ""]
    samples = summary.get("samples") or []
    if samples:
        keys = [k for k in ("sample_id", "organ", "technology", "patient", "n_spots") if k in samples[0]]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_value(s[k]) for k in keys) + " |" for s in samples] + [""]
    if "import" in summary:
        lines += _table(summary["import"])
    if "shards" in summary:
        shards = summary["shards"]
        lines += _table({**{f"totals.{k}": v for k, v in shards["totals"].items()},
                         **{f"split.{k}": ", ".join(v) or "-" for k, v in shards["splits"].items()},
                         "checksums_ok": shards["checksums_ok"]})
    lines += _figures(out, out / "figures")

    if "backbone" in summary:
        bb = summary["backbone"]
        lines += ["## Backbone", "", "A tiny ViT pretrained on the train split (expression + contrastive), "
                  "fine-tuned with LoRA for expression, evaluated on held-out patients, saved as a Hub model and "
                  "loaded back. The recipes that ran are in `backbone/recipes/`.", ""]
        for stage in ("pretrain", "finetune"):
            keep = {k: v for k, v in bb[stage].items() if k in ("step", "loss", "seconds") or k.startswith("eval/")}
            lines += [f"**{stage}**", ""] + _table(keep)
        lines += [f"Reloaded with `spfm.from_pretrained('{Path(bb['model']).relative_to(out).as_posix()}')`: "
                  f"embeddings differ from the trained backbone's by at most {bb['reload_max_abs_diff']:.1e}.", ""]

    for name, metrics in (summary.get("heads") or {}).items():
        lines += [f"## {name}", "", HEAD_CAPTIONS.get(name, ""), ""]
        lines += _table(_flat(metrics))
        lines += _figures(out, out / "heads" / name)

    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
