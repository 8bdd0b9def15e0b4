"""Simulated single-cell spatial tissue for CellScape's demo, tests and scaling runs.

Cells at uniform random positions in a square; the square is cut into ``n_domains`` vertical layers (as cortical
layers). Each domain has its own mixture of ``n_cell_types`` cell types (half its signature type, half a Dirichlet
draw), each type
its own gene program (log-normal mean expression), and counts are Poisson around the type's means times a
library-size factor. So one cell's profile says its type, and mostly its neighbourhood's composition says its
domain: a non-spatial clustering of expression finds types (half-informative of layers), a spatial method layers.

Writes ``obs["domain_true"]``, ``obs["cell_type_true"]``, ``obsm["spatial"]`` and ``uns["spfm"]`` (technology
"simulated single-cell", so ``graph="auto"`` picks Delaunay).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def simulate_tissue(n_cells: int = 2000, n_genes: int = 50, n_domains: int = 4, n_cell_types: int = 6, *,
                    seed: int = 0, concentration: float = 0.3, sparse: bool = True) -> ad.AnnData:
    """An AnnData (n_cells, n_genes) of raw counts with layered domains; see the module docstring."""
    rng = np.random.default_rng(seed)
    side = np.sqrt(n_cells) * 10.0  # ~10 units between neighbouring cells
    xy = rng.uniform(0, side, size=(n_cells, 2))
    domain = np.minimum((xy[:, 0] / side * n_domains).astype(np.int64), n_domains - 1)
    # Each domain: half its cells of its own signature type (d mod T), the rest a Dirichlet mixture of all types.
    comp = 0.5 * np.eye(n_cell_types)[np.arange(n_domains) % n_cell_types] + 0.5 * rng.dirichlet(
        np.full(n_cell_types, concentration), size=n_domains)  # (D, T)
    # cell type by inverse-CDF sampling of its domain's composition (vectorised for 1M cells)
    cdf = np.cumsum(comp, 1)[domain]
    ctype = np.minimum((rng.random(n_cells)[:, None] > cdf).sum(1), n_cell_types - 1)
    base = rng.normal(1.5, 1.0, size=n_genes)  # log mean counts: a few counts per gene, as imaging panels
    programs = base[None, :] + rng.normal(0.0, 1.5, size=(n_cell_types, n_genes)) * (
        rng.random((n_cell_types, n_genes)) < 0.3)
    library = rng.lognormal(0.0, 0.3, size=n_cells).astype(np.float32)
    mean = np.exp(programs).astype(np.float32)[ctype] * library[:, None]
    counts = rng.poisson(mean).astype(np.float32)
    obs = pd.DataFrame({"domain_true": pd.Categorical(domain.astype(str)),
                        "cell_type_true": pd.Categorical(ctype.astype(str))},
                       index=[f"cell{i}" for i in range(n_cells)])
    adata = ad.AnnData(sp.csr_matrix(counts) if sparse else counts, obs=obs,
                       var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]))
    adata.obsm["spatial"] = xy
    adata.uns["spfm"] = {"sample_id": f"sim{seed}", "pixel_size_um": 1.0, "technology": "simulated single-cell",
                         "species": "none", "organ": "none", "patient": f"sim{seed}"}
    return adata
