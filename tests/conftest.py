"""Shared fixtures. Real-data tests use ../shared/data relative to the project root and skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


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
