"""HisToSGE with ``finetune="lora"``: LoRA adapters on the backbone trained jointly with the head from patches."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from spfm.errors import DataError
from spfm.heads.histosge import HisToSGE
from spfm.models.backbones import create_backbone
from spfm.models.backbones.registry import save_backbone
from spfm.models.embed import patch_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKBONE = "vit_tiny_patch16_224"
SIDE = 32  # a 2 x 2-token, 2-block random-init ViT: small enough for a unit test
ARCH = {"img_size": SIDE, "depth": 2}
G = 8
HEAD = dict(heads=2, dim_head=8, mlp_dim=32, hidden=32, n_top_genes=G, seed=0, device="cpu", lr=3e-3,
            chunk_size=10, n_neighbors=4)


def slide_with_patches(seed: int, rows: int = 5, cols: int = 6, genes: int = 20) -> tuple[ad.AnnData, np.ndarray]:
    """A lattice of spots whose patches are colour blocks and whose counts follow the patch colour."""
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    n = len(rr)
    colour = rng.uniform(0, 1, size=(n, 3))
    patches = np.clip(colour[:, None, None, :] * 255 + rng.normal(0, 20, size=(n, SIDE, SIDE, 3)), 0, 255)
    w = np.random.default_rng(7).normal(size=(3, genes))
    counts = rng.poisson(np.exp(1.5 * np.tanh((colour - 0.5) @ w) + 3.0)).astype(np.float32)
    obs = pd.DataFrame({"array_row": rr, "array_col": cc}, index=[f"s{seed}_{i}" for i in range(n)])
    a = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))
    a.obsm["spatial"] = np.column_stack([cc, rr]) * 400.0
    a.uns["spfm"] = {"pixel_size_um": 0.5}
    return a, patches.astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.manual_seed(3)
    backbone = create_backbone(BACKBONE, **ARCH).eval()
    folder = save_backbone(backbone, tmp_path_factory.mktemp("bb") / "backbone")
    slides = [slide_with_patches(s) for s in range(3)]
    with torch.no_grad():  # the frozen arm reads these embeddings, as `spfm embed` would write them
        for a, tiles in slides:
            a.obsm["X_vit"] = patch_features(backbone, torch.from_numpy(tiles)).numpy()
    return str(folder), slides


def lora_head(folder: str, attention: str, **kw) -> HisToSGE:
    return HisToSGE(attention=attention, finetune="lora", backbone=BACKBONE, backbone_kwargs=ARCH,
                    backbone_checkpoint=folder, **{"epochs": 6, **HEAD, **kw})


@pytest.mark.parametrize("attention", ["chunk", "knn"])
def test_lora_trains_adapters_and_changes_predictions(data, attention):
    folder, slides = data
    train, (test, test_tiles) = [a for a, _ in slides[:2]], slides[2]
    tiles = [t for _, t in slides[:2]]
    frozen = HisToSGE(attention=attention, embedding_key="X_vit", epochs=6, **HEAD).fit(train, progress=False)
    tuned = lora_head(folder, attention).fit(train, patches=tiles, progress=False)
    state = tuned.module.state_dict()
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and all(state[k].abs().sum() > 0 for k in lora_b)  # lora_B starts at zero: it trained
    base = create_backbone(BACKBONE, checkpoint=folder).state_dict()
    qkv = next(k for k in state if k.endswith("blocks.0.attn.qkv.base_layer.weight"))
    assert torch.equal(state[qkv], base["trunk.blocks.0.attn.qkv.weight"])  # base weights stay frozen
    p_frozen = frozen.predict(test).X
    p_tuned = tuned.predict(test, patches=test_tiles).X
    assert not np.allclose(p_frozen, p_tuned, atol=1e-3)
    # with the adapters' learning rate at 0 the joint run is the frozen run: the difference above is the adapters'
    still = lora_head(folder, attention, backbone_lr=0.0).fit(train, patches=tiles, progress=False)
    np.testing.assert_allclose(still.predict(test, patches=test_tiles).X, p_frozen, atol=1e-4)


def test_lora_save_load_round_trip(data, tmp_path):
    folder, slides = data
    head = lora_head(folder, "knn", epochs=2).fit([slides[0][0]], patches=[slides[0][1]], progress=False)
    test, tiles = slides[1]
    expected = head.predict(test, patches=tiles).X
    again = HisToSGE.load(head.save(tmp_path / "head"))
    np.testing.assert_array_equal(again.predict(test, patches=tiles).X, expected)
    config = json.loads(json.dumps(head.to_config()))
    rebuilt = HisToSGE.from_config(config)
    rebuilt.module.load_state_dict(head.module.state_dict())
    np.testing.assert_array_equal(rebuilt.predict(test, patches=tiles).X, expected)
    assert config["finetune"] == "lora" and config["backbone"] == BACKBONE


def test_lora_bad_input(data):
    folder, slides = data
    (a, tiles) = slides[0]
    with pytest.raises(DataError, match="backbone"):
        HisToSGE(finetune="lora")
    with pytest.raises(DataError, match="finetune"):
        HisToSGE(finetune="full", backbone=BACKBONE)
    with pytest.raises(DataError, match="patches"):
        lora_head(folder, "knn").fit([a], progress=False)
    with pytest.raises(DataError, match="patches"):
        lora_head(folder, "knn").fit([a], patches=[tiles[:5]], progress=False)
    head = lora_head(folder, "knn", epochs=1).fit([a], patches=[tiles], progress=False)
    with pytest.raises(DataError, match="patches"):
        head.predict(slides[1][0])
