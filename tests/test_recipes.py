"""Every recipe in recipes/ runs through `spfm run` in a shrunken form: the recipe as shipped, with `--set`
overrides that point it at small inputs and cut its epochs or steps. A new recipe without a shrink rule here fails
the first test, so none ships untested."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import PROJECT_ROOT, TRAIN_SHRINK

from spfm.recipes import read_recipe, recipe_kind, run_recipe

RECIPES = sorted((PROJECT_ROOT / "recipes").glob("*.yaml"))
RECIPE_SHRINK = [*TRAIN_SHRINK, "precision=no"]  # bf16 recipes are for GPUs; one process keeps one Accelerate state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(synthetic_shards, tmp_path_factory):
    """Small stand-ins for every kind of input a recipe reads."""
    from spfm.data.simulate import spatialglue_simulation
    from spfm.heads.cellscape.simulate import simulate_tissue
    from spfm.train import train

    base = tmp_path_factory.mktemp("recipe_inputs")
    root = synthetic_shards.parent / "hest"
    pre = base / "pretrained"
    train(PROJECT_ROOT / "recipes" / "pretrain_synthetic.yaml",
          overrides=[f"data.shards={synthetic_shards}", f"output_dir={pre}", *RECIPE_SHRINK])
    simulate_tissue(n_cells=300, n_genes=30, n_domains=4, seed=0).write_h5ad(base / "cells.h5ad")
    rna, protein = spatialglue_simulation(setting=1, seed=0, block=2)
    for name, a in (("rna", rna), ("protein", protein), ("atac", protein)):
        a.X = np.round(a.X.toarray() if hasattr(a.X, "toarray") else a.X)  # counts, as soScope's nb/poisson need
        a.write_h5ad(base / f"{name}.h5ad")
    visium = ad.read_h5ad(root / "st" / "SYN00.h5ad")
    visium = visium[visium.obs["in_tissue"].astype(bool)].copy()
    visium.write_h5ad(base / "visium.h5ad")
    rng = np.random.default_rng(0)
    np.save(base / "visium_features.npy", rng.normal(size=(visium.n_obs * 7, 8)).astype(np.float32))
    return dict(base=base, root=root, shards=synthetic_shards, pretrained=pre / "final")


def shrink(path: Path, inputs: dict, out: Path) -> list[str]:
    """The overrides that make the recipe at ``path`` small, by its kind and name."""
    tree, _ = read_recipe(path)
    kind, name, base = recipe_kind(tree, path), path.stem, inputs["base"]
    if kind == "train":
        sets = [f"data.shards={inputs['shards']}", f"output_dir={out}", *RECIPE_SHRINK]
        if tree["model"].get("checkpoint"):
            sets.append(f"model.checkpoint={inputs['pretrained']}")
        return sets
    if kind == "histosge":
        ids = "[SYN03]" if "recovery" in name else "[SYN00, SYN01]"
        return [f"data.root={inputs['root']}", f"data.train={ids}", "data.predict=[SYN03]",
                f"data.embeddings={out / 'emb'}", "backbone.img_size=32", "patch.size_px=32",
                "patch.pixel_size_um=3.5", "head.epochs=2", "head.n_top_genes=20", f"output_dir={out}"]
    if kind == "cellscape":
        return [f"input={base / 'cells.h5ad'}", "annotation=domain_true", "params.epochs=1", "params.n_top_genes=30",
                "run.n_domains=4", f"output={out / 'domains.h5ad'}"]
    if kind == "spatialglue":
        mods = tree["modalities"]
        sets = [f"modalities.{m}={base / (m if m in ('rna', 'protein', 'atac') else 'protein')}.h5ad" for m in mods]
        return [*sets, "params.epochs=2", f"output={out / 'integrated.h5ad'}"]
    if kind == "soscope":
        if "visium" in name:
            return [f"inputs=[{base / 'visium.h5ad'}]", f"image_features={base / 'visium_features.npy'}",
                    "params.stage1_epochs=2", "params.stage2_epochs=2", f"output={out / 'enhanced.h5ad'}"]
        return [f"inputs=[{base / 'rna.h5ad'}, {base / 'protein.h5ad'}]", "params.stage1_epochs=2",
                "params.stage2_epochs=2", f"output={out / 'enhanced.h5ad'}"]
    raise AssertionError(f"no shrink rule for {path.name} ({kind})")


def test_every_recipe_has_a_kind_and_a_shrink_rule(inputs, tmp_path):
    assert len(RECIPES) >= 15
    for path in RECIPES:
        assert shrink(path, inputs, tmp_path)  # raises for a recipe this file does not know


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_shrunken(path, inputs, tmp_path):
    out = tmp_path / "out"
    result = run_recipe(path, shrink(path, inputs, out), progress=False)
    kind = recipe_kind(read_recipe(path)[0])
    if kind == "train":
        assert result["step"] == 2 and (out / "final" / "model.safetensors").is_file()
    elif kind == "histosge":
        assert np.isfinite(result["predict"]["SYN03"]["pearson"]) and (out / "SYN03_predicted.h5ad").is_file()
        assert ("recovery" in result) == ("recovery" in path.stem)
    else:
        written = next(p for p in out.glob("*.h5ad"))
        assert ad.read_h5ad(written).n_obs == result.n_obs > 0


def test_unknown_recipes_are_refused(tmp_path):
    from spfm.errors import DataError

    with pytest.raises(DataError, match="unknown head 'Segformer'"):
        recipe_kind({"head": "Segformer"})
    with pytest.raises(DataError, match="cannot tell what this recipe runs"):
        recipe_kind({"data": {}})
    with pytest.raises(DataError, match="recipe not found"):
        run_recipe(tmp_path / "missing.yaml")


def test_spfm_run_names_the_recipe_file_in_a_head_recipes_error(tmp_path, capsys):
    from spfm.cli import main

    recipe = tmp_path / "glue.yaml"
    recipe.write_text("head: SpatialGlue\nmodalities: {rna: a.h5ad, protein: b.h5ad}\nparams: {bogus: 1}\n"
                      "output: out.h5ad\n")
    assert main(["run", str(recipe)]) == 2
    assert f"{recipe}: params.bogus: unknown SpatialGlue parameter(s) ['bogus']" in capsys.readouterr().err
