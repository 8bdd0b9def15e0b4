"""Shared fixtures. Real-data tests use ../shared/data relative to the project root and skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from fakehub import hub_server  # noqa: F401  (a fixture: a Hub-compatible server on loopback)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: ``--set`` overrides that shrink any training recipe to two steps at 32 px (tests/test_train.py,
#: test_recipes.py and test_readme.py run the shipped recipes this way).
TRAIN_SHRINK = ["optim.max_steps=2", "optim.warmup_steps=1", "checkpoint_every=2", "data.batch_size=8",
                "data.num_workers=0", "model.img_size=32", "data.image_size=32", "eval.every=2", "eval.max_batches=1",
                "data.epoch_size=32", "tracker=none", "progress=false"]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread (restored after): small models gain nothing from intra-op threads, and two
    OpenMP threads on a busy 2-core machine spin-wait and run several times slower. Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """Synthetic corpus -> 32 px shards: train SYN00+SYN01 (one shard each, so one per rank of two), val SYN02,
    test SYN03; 50 genes. Read-only for the tests that share it."""
    from spfm.data.patches import PatchConfig
    from spfm.data.shards import write_shards
    from spfm.data.synthetic import make_synthetic_corpus

    base = tmp_path_factory.mktemp("corpus")
    root = make_synthetic_corpus(base / "hest", n_samples=4, seed=0, n_genes=50, pixel_size_um=2.0,
                                 spots_per_sample=(40, 60))
    write_shards(root, base / "shards", patch=PatchConfig(size_px=32, pixel_size_um=2.0), progress=False, card=False)
    return base / "shards"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip the test when a fresh clone does not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def tissue_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 H&E-like image: pink tissue with purple speckles on a white border."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, np.uint8)
    m = max(4, min(width, height) // 20)
    tissue = np.array([225, 150, 190], np.float32) + rng.normal(0, 12, (height - 2 * m, width - 2 * m, 3))
    img[m:-m, m:-m] = np.clip(tissue, 0, 255).astype(np.uint8)
    return img


def tiny_adata(n_spots: int, genes: list[str], xy: np.ndarray, seed: int = 0) -> ad.AnnData:
    """Spots x genes Poisson counts with obsm["spatial"] = xy (N, 2) pixel (x, y)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(n_spots, len(genes))).astype(np.float32)
    adata = ad.AnnData(counts, obs=pd.DataFrame(index=[f"spot{i}" for i in range(n_spots)]),
                       var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
    return adata


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Run the README's first command, `spfm demo --out DIR/spfm_demo`, once per session; (DIR, what it printed).
    Read-only for the tests that share it (capsys is per test, so stdout is captured by hand)."""
    import contextlib
    import io

    from spfm.cli import main

    base = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--out", str(base / "spfm_demo")]) == 0
    return base, buf.getvalue()
