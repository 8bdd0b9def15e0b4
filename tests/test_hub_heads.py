"""Every real head round-trips through the Hub layer: fit tiny -> save_pretrained -> from_pretrained / AutoModel.

The reloaded head (built from config.json + model.safetensors alone) must give identical outputs on new data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import spfm
from spfm.hub import save_pretrained
from spfm.hub.modeling_spfm import PICKLE_SUFFIXES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _round_trip(head: Any, folder: Path, model_type: str) -> list[Any]:
    """Save ``head``, check the folder, and return the head reloaded by spfm.from_pretrained and by AutoModel."""
    from transformers import AutoModel

    save_pretrained(head, folder)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)], names
    assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    heads = []
    for model in (spfm.from_pretrained(folder), AutoModel.from_pretrained(folder)):
        assert type(model.head) is type(head) and model.head is not head
        # every tensor (parameters and fitted buffers) came back exactly
        ours, theirs = head.module.state_dict(), model.head.module.state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(theirs[key].cpu(), ours[key].cpu(), rtol=0, atol=0, msg=key)
        heads.append(model.head)
    return heads


# --- HisToSGE: spot embeddings -> gene expression ----------------------------------------------------------------

def _histosge_slide(seed: int, side: int = 8, dim: int = 16, genes: int = 20) -> ad.AnnData:
    """A square lattice of spots whose counts are a smooth function of their random embeddings (obsm["X_test"])."""
    rng = np.random.default_rng(seed)
    rr, cc = (a.ravel() for a in np.meshgrid(np.arange(side), np.arange(side), indexing="ij"))
    feats = rng.normal(size=(len(rr), dim)).astype(np.float32)
    w = np.random.default_rng(100).normal(size=(dim, genes))
    counts = rng.poisson(np.exp(2.5 * np.tanh(feats @ w / 4) + 3.0)).astype(np.float32)
    obs = pd.DataFrame({"array_row": rr + 2, "array_col": cc + 3}, index=[f"s{seed}_{i}" for i in range(len(rr))])
    a = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))
    a.obsm["X_test"] = feats
    a.obsm["spatial"] = np.column_stack([100 + cc * 200.0, 80 + rr * 174.0]) / 0.5
    a.uns["spfm"] = {"pixel_size_um": 0.5, "technology": "Spatial Transcriptomics"}
    return a


def test_histosge_hub_round_trip(tmp_path):
    from spfm.heads.histosge import HisToSGE

    head = HisToSGE(attention="knn", epochs=3, n_neighbors=4, heads=2, dim_head=8, mlp_dim=32, hidden=32,
                    n_top_genes=12, seed=0, device="cpu", lr=3e-3, embedding_key="X_test")
    head.fit([_histosge_slide(0)], progress=False)
    new = _histosge_slide(7)
    expected = head.predict(new.copy(), inplace=False)
    for loaded in _round_trip(head, tmp_path / "histosge", "spfm-histosge"):
        got = loaded.predict(new.copy(), inplace=False)
        assert list(got.var_names) == list(expected.var_names) == head.genes
        np.testing.assert_array_equal(np.asarray(got.X), np.asarray(expected.X))


# --- SoScope: spot profiles + subspot image features -> subspot profiles -----------------------------------------

def _grid_spots(side: int = 6, genes: int = 4, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    r, c = np.divmod(np.arange(side * side), side)
    a = ad.AnnData(rng.poisson(6.0, (side * side, genes)).astype(np.float32),
                   obs=pd.DataFrame(index=[f"s{i}" for i in range(side * side)]),
                   var=pd.DataFrame(index=[f"g{i}" for i in range(genes)]))
    a.obs["array_row"], a.obs["array_col"] = r, c
    a.obsm["spatial"] = np.stack([c * 100.0, r * 100.0], axis=1)
    return a


def test_soscope_hub_round_trip(tmp_path):
    from spfm.heads.soscope import SoScope

    feats = np.random.default_rng(1).normal(size=(36 * 4, 3)).astype(np.float32)
    head = SoScope(omics="nb", layout="square:2", normalize="feature", stage1_epochs=2, stage2_epochs=2, z_dim=8,
                   hidden_dim=8, seed=0)
    head.fit(_grid_spots(seed=3), image_features=feats, progress=False)
    new = _grid_spots(seed=11)
    new_feats = np.random.default_rng(12).normal(size=(36 * 4, 3)).astype(np.float32)
    expected = head.enhance(new.copy(), image_features=new_feats, device="cpu")
    for loaded in _round_trip(head, tmp_path / "soscope", "spfm-soscope"):
        got = loaded.enhance(new.copy(), image_features=new_feats, device="cpu")
        assert got.shape == expected.shape == (36 * 4, 4)
        np.testing.assert_array_equal(np.asarray(got.X), np.asarray(expected.X))
        np.testing.assert_array_equal(got.obsm["spatial"], expected.obsm["spatial"])


# --- SpatialGlue: several modalities of the same spots -> one integrated embedding -------------------------------

def test_spatialglue_hub_round_trip(tmp_path):
    from spfm.data.simulate.spatialglue import spatialglue_simulation
    from spfm.heads.spatialglue import SpatialGlue

    rna, protein = spatialglue_simulation(setting=1, seed=3, block=3, n_features=(120, 24))
    head = SpatialGlue(datatype="SPOTS", epochs=3, lr=1e-3, n_comps=12, n_domains=None, seed=0)
    head.fit({"rna": rna, "protein": protein}, progress=False)
    new_rna, new_protein = spatialglue_simulation(setting=2, seed=8, block=3, n_features=(120, 24))
    expected = head.transform({"rna": new_rna.copy(), "protein": new_protein.copy()}, device="cpu")
    for loaded in _round_trip(head, tmp_path / "spatialglue", "spfm-spatialglue"):
        got = loaded.transform({"rna": new_rna.copy(), "protein": new_protein.copy()}, device="cpu")
        for key in ("X_spatialglue", "X_spatialglue_rna", "X_spatialglue_protein", "spatialglue_beta"):
            np.testing.assert_array_equal(np.asarray(got.obsm[key]), np.asarray(expected.obsm[key]), err_msg=key)


# --- CellScape: single-cell spatial profiles -> spatial and intrinsic embeddings ---------------------------------

def test_cellscape_hub_round_trip(tmp_path):
    from spfm.heads.cellscape import CellScape
    from spfm.heads.cellscape.simulate import simulate_tissue

    head = CellScape(epochs=2, hidden_dim=16, latent_dim=8, fused_dim=8, heads=2, batch_size=256)
    head.fit(simulate_tissue(300, 12, n_domains=3, n_cell_types=4, seed=1), seed=0, progress=False)
    new = simulate_tissue(150, 12, n_domains=3, seed=9)[:, ::-1].copy()  # genes in another order
    z_spatial, z_intrinsic = head.embed(new.copy(), device="cpu")
    assert z_spatial.shape == (150, 8) and z_intrinsic is not None
    for loaded in _round_trip(head, tmp_path / "cellscape", "spfm-cellscape"):
        s, i = loaded.embed(new.copy(), device="cpu")
        np.testing.assert_array_equal(s, z_spatial)
        np.testing.assert_array_equal(i, z_intrinsic)
