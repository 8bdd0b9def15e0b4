"""HisToSGE on a HEST root: embeddings at new positions, the recipe runner behind `spfm predict-expression`,
save/load, and the expression-map plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spfm.data.patches import PatchConfig
from spfm.errors import DataError
from spfm.heads.histosge import HisToSGE
from spfm.heads.histosge.recipe import load_recipe, run_recipe
from spfm.heads.histosge.tasks import denser_positions, embed_positions, embed_samples

PATCH = PatchConfig(size_px=32, pixel_size_um=3.5)
BACKBONE = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32})
TINY_HEAD = dict(heads=2, dim_head=8, mlp_dim=32, hidden=32, n_top_genes=10, epochs=3, chunk_size=20)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from spfm.data.synthetic import make_synthetic_corpus

    root = tmp_path_factory.mktemp("histosge_corpus")
    make_synthetic_corpus(root, n_samples=4, seed=0, spots_per_sample=(60, 90))
    return root


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    import torch

    from spfm.models.backbones.registry import create_backbone, save_backbone

    torch.manual_seed(0)
    return save_backbone(create_backbone(**{"name": BACKBONE["backbone"]}, **BACKBONE["backbone_kwargs"]),
                         tmp_path_factory.mktemp("ckpt") / "vit")


def test_embeddings_at_measured_positions_match_spfm_embed(corpus, checkpoint, tmp_path):
    (slide,) = embed_samples(corpus, ["SYN03"], tmp_path / "emb", checkpoint=checkpoint, patch=PATCH)
    again = embed_positions(corpus, "SYN03", slide, checkpoint=checkpoint, patch=PATCH)
    assert list(again.obs_names) == list(slide.obs_names)
    key = "X_vit_tiny_patch16_224"
    np.testing.assert_allclose(again.obsm[key], slide.obsm[key], rtol=1e-4, atol=1e-5)
    dense = embed_positions(corpus, "SYN03", denser_positions(slide), checkpoint=checkpoint, patch=PATCH)
    assert dense.n_obs > 2 * slide.n_obs and dense.obsm[key].shape[1] == 192
    assert (dense.obs["origin"] == "new").sum() > slide.n_obs


def test_embed_positions_outside_the_slide(corpus, checkpoint, tmp_path):
    (slide,) = embed_samples(corpus, ["SYN03"], tmp_path / "emb", checkpoint=checkpoint, patch=PATCH)
    bad = slide[:3].copy()
    bad.obsm["spatial"] = bad.obsm["spatial"] + np.array([1e6, 0.0])
    with pytest.raises(DataError, match="outside the"):
        embed_positions(corpus, "SYN03", bad, checkpoint=checkpoint, patch=PATCH)


def _recipe(corpus, checkpoint, tmp_path, **head):
    return {
        "data": {"root": str(corpus), "train": ["SYN00", "SYN01"], "predict": ["SYN03"],
                 "embeddings": str(tmp_path / "emb")},
        "backbone": {"name": "vit_tiny_patch16_224", "checkpoint": str(checkpoint)},
        "patch": {"size_px": 32, "pixel_size_um": 3.5},
        "head": {**TINY_HEAD, **head},
        "task": {"denser": True, "plot_genes": 2},
        "output_dir": str(tmp_path / "out"),
    }


@pytest.mark.slow
def test_recipe_runs_and_head_reloads(corpus, checkpoint, tmp_path):
    metrics = run_recipe(_recipe(corpus, checkpoint, tmp_path, attention="knn"), progress=False)
    out = tmp_path / "out"
    assert set(metrics["predict"]) == {"SYN03"} and np.isfinite(metrics["predict"]["SYN03"]["mse"])
    assert json.loads((out / "metrics.json").read_text())["denser"]["SYN03"]["n_positions"] > 0
    for name in ("SYN03_predicted.h5ad", "SYN03_denser.h5ad", "SYN03_maps.png", "SYN03_denser_maps.png",
                 "head/model.safetensors", "head/config.json"):
        assert (out / name).is_file(), name
    import anndata as ad

    pred = ad.read_h5ad(out / "SYN03_predicted.h5ad")
    head = HisToSGE.load(out / "head")
    (slide,) = embed_samples(corpus, ["SYN03"], tmp_path / "emb", checkpoint=checkpoint, patch=PATCH)
    np.testing.assert_allclose(head.predict(slide).layers["predicted"], pred.layers["predicted"], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow
def test_recipe_recovery_and_overrides(corpus, checkpoint, tmp_path):
    recipe = _recipe(corpus, checkpoint, tmp_path)
    recipe["data"]["train"] = ["SYN00"]
    recipe["data"]["predict"] = ["SYN00"]
    recipe["task"] = {"recovery_fraction": 0.5, "denser": False, "plot_genes": 0}
    metrics = run_recipe(recipe, ["head.attention=knn", "head.epochs=2"], progress=False)
    assert set(metrics["recovery"]) == {"SYN00"} and "denser" not in metrics
    assert HisToSGE.load(tmp_path / "out" / "head").params["epochs"] == 2


def test_recipe_bad_keys(tmp_path):
    base = {"data": {"root": "r", "train": ["a"], "predict": ["b"], "embeddings": "e"}}
    with pytest.raises(DataError, match="unknown key"):
        load_recipe({**base, "task": {"denser": True, "bogus": 1}})
    with pytest.raises(DataError, match="unknown section"):
        load_recipe({**base, "model": {}})
    with pytest.raises(DataError, match="no slide to predict"):
        load_recipe({"data": {"root": "r", "train": ["a"], "embeddings": "e"}})
    with pytest.raises(DataError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_load_rejects_other_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"spfm_head": "SoScope"}))
    with pytest.raises(DataError, match="not a HisToSGE head"):
        HisToSGE.load(tmp_path)


@pytest.mark.slow
def test_recipe_lora_finetunes_the_backbone_first(corpus, checkpoint, tmp_path):
    recipe = _recipe(corpus, checkpoint, tmp_path, attention="knn")
    recipe["backbone"]["img_size"] = 32
    recipe["backbone"]["finetune"] = {"mode": "lora", "steps": 2, "batch_size": 8}
    recipe["task"] = {"denser": False, "plot_genes": 0}
    metrics = run_recipe(recipe, progress=False)
    final = tmp_path / "out" / "finetune" / "train" / "final"
    assert (final / "model.safetensors").is_file()
    import anndata as ad

    tuned = ad.read_h5ad(tmp_path / "out" / "finetune" / "embeddings" / "SYN03.h5ad").obsm["X_vit_tiny_patch16_224"]
    (frozen,) = embed_samples(corpus, ["SYN03"], tmp_path / "emb", checkpoint=checkpoint, patch=PATCH)
    assert tuned.shape == frozen.obsm["X_vit_tiny_patch16_224"].shape
    assert not np.allclose(tuned, frozen.obsm["X_vit_tiny_patch16_224"])  # the adapters changed the features
    assert np.isfinite(metrics["predict"]["SYN03"]["mse"])
    with pytest.raises(DataError, match="fine-tuning mode"):
        run_recipe({**recipe, "backbone": {**recipe["backbone"], "finetune": {"mode": "frozen"}},
                    "output_dir": str(tmp_path / "out2")}, progress=False)
