"""The README's first quick-start command, `spfm demo`: the whole story on the synthetic corpus (the demo runs once
per session, in conftest's `demo` fixture)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from spfm.cli import main


def test_demo_end_to_end(demo):
    base, printed = demo
    out = base / "spfm_demo"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["checksums_ok"] and "checksums OK" in printed
    # every train record comes back through the loader
    assert summary["read_back"]["records"] == summary["read_back"]["expected"] > 0
    assert summary["import"]["counts_identical"]
    assert summary["import"]["pixel_size_estimated"] == pytest.approx(summary["import"]["pixel_size_true"], rel=0.05)
    card = (out / "shards" / "README.md").read_text()
    assert card.startswith("---\n") and "train" in card
    assert (out / "figures" / "patches.png").stat().st_size > 10_000
    # Each head ran on its synthetic or simulated tissue and beat its simple reference there
    heads = summary["heads"]
    assert list(heads) == ["histosge", "soscope", "spatialglue", "cellscape"]
    assert heads["histosge"]["heldout_pearson"]["knn"] > 0.1 and heads["histosge"]["n_denser_positions"] > 0
    assert heads["soscope"]["soscope_mse_minmax"] < heads["soscope"]["parent_copy_mse_minmax"]
    assert heads["spatialglue"]["nmi_improved"] > heads["spatialglue"]["nmi_faithful"]
    assert heads["cellscape"]["nmi_cellscape"] > heads["cellscape"]["nmi_nonspatial_floor"]
    for name in heads:
        assert "== head: " + name in printed
        assert any(path.suffix == ".png" for path in (out / "heads" / name).rglob("*.png"))


def test_demo_backbone_story(demo):
    """Pretrain -> LoRA fine-tune -> Hub model -> reload: the recipes that ran validate, LoRA changed the attention
    weights of the pretrained backbone and nothing else, and the reload is exact."""
    from safetensors.torch import load_file

    from spfm.train.recipe import load_recipe

    base, printed = demo
    out = base / "spfm_demo"
    bb = json.loads((out / "summary.json").read_text())["backbone"]
    for name in ("pretrain", "finetune"):
        recipe = load_recipe(out / "backbone" / "recipes" / f"{name}.yaml")
        assert (out / "backbone" / name / "final" / "model.safetensors").is_file()
        assert bb[name]["step"] == recipe.optim.max_steps
    assert load_recipe(out / "backbone" / "recipes" / "finetune.yaml").model.finetune.mode == "lora"
    assert np.isfinite(bb["finetune"]["eval/expression/loss"])  # scored on the held-out test patient
    pre = load_file(out / "backbone" / "pretrain" / "final" / "model.safetensors")
    fine = load_file(out / "backbone" / "finetune" / "final" / "model.safetensors")
    assert pre.keys() == fine.keys()
    changed = {k for k in pre if not torch.equal(pre[k], fine[k])}
    assert changed and all(".attn." in k for k in changed)  # LoRA on the attention projections, merged
    assert bb["reload_max_abs_diff"] == 0.0
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (out / "backbone" / "model").iterdir()}
    assert "loaded it back with spfm.from_pretrained" in printed


def test_demo_report_links_every_figure(demo):
    base, _ = demo
    out = base / "spfm_demo"
    report = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    pngs = {p.relative_to(out).as_posix() for p in out.rglob("*.png")
            if p.parent.name == "figures" or "heads" in p.parts}
    assert set(links) == pngs and all((out / link).is_file() for link in links)
    for section in ("## Data", "## Backbone", "## histosge", "## soscope", "## spatialglue", "## cellscape"):
        assert section in report
    summary = json.loads((out / "summary.json").read_text())
    assert f"| `heldout_pearson.knn` | {summary['heads']['histosge']['heldout_pearson']['knn']:.4g} |" in report


def test_demo_rejects_an_unknown_head(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--heads", "histosge,segformer"]) == 2
    assert "unknown head(s) ['segformer']" in capsys.readouterr().err


def test_demo_keeps_an_existing_output(demo, capsys):
    base, _ = demo
    assert main(["demo", "--out", str(base / "spfm_demo")]) == 2
    assert "--overwrite" in capsys.readouterr().err
