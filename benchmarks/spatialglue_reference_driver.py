"""Run the reference SpatialGlue 1.1.5 (JinmiaoChenLab); called by benchmarks/spatialglue.py.

Runs inside the reference's own venv (see benchmarks/spatialglue.py for how to build it):

    /tmp/spatialglue-venv/bin/python benchmarks/spatialglue_reference_driver.py IN.npz OUT.npz

IN.npz holds ``spatial`` (N, 2), ``datatype``, ``seed``, ``epochs`` (-1: the preset's), ``threads`` and either

* ``feat_1``, ``feat_2`` (N, D): preprocessed features (the same ones spfm trains on; quality comparisons), or
* ``counts_1``, ``counts_2`` (N, G) raw counts and ``n_comps``: the reference's own preprocessing as its tutorials
  run it (end-to-end timing): RNA ``filter_genes(min_cells=10)``, HVGs ``seurat_v3`` (3000), ``normalize_total``,
  ``log1p``, ``scale``, PCA of the HVGs (all genes when there are at most 3000); protein
  ``clr_normalize_each_cell``, ``scale``, PCA; both with the package's ``pca`` (scikit-learn) to ``n_comps``.

The reference's graph construction (``construct_neighbor_graph``, and the adjacency preprocessing inside
``Train_SpatialGlue``) and trainer are used unchanged. OUT.npz gets its embedding, modality latents, attention
weights, and the wall and CPU seconds of each stage (``prep``, ``graph``, ``train``), measured inside this process so
that interpreter start-up and imports are not counted.
"""

import sys
import time

import numpy as np


class Clock:
    """Wall and process-CPU seconds of consecutive stages."""

    def __init__(self) -> None:
        self.out: dict[str, float] = {}
        self._w, self._c = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        w, c = time.perf_counter(), time.process_time()
        self.out[f"{name}_s"], self.out[f"{name}_cpu_s"] = w - self._w, c - self._c
        self._w, self._c = w, c


def _preprocess(args, adatas) -> None:
    """The reference tutorials' preprocessing (SPOTS / 10x RNA + protein), writing ``obsm['feat']``."""
    import scanpy as sc
    from SpatialGlue.preprocess import clr_normalize_each_cell, pca

    rna, protein = adatas
    n_comps = int(args["n_comps"])
    sc.pp.filter_genes(rna, min_cells=10)
    if rna.n_vars > 3000:
        sc.pp.highly_variable_genes(rna, flavor="seurat_v3", n_top_genes=3000)
    else:  # scanpy's loess fails on tiny panels (skin: 10 genes); all genes are the top 3000 anyway
        rna.var["highly_variable"] = True
    sc.pp.normalize_total(rna, target_sum=1e4)
    sc.pp.log1p(rna)
    sc.pp.scale(rna)
    rna.obsm["feat"] = pca(rna[:, rna.var["highly_variable"]], n_comps=n_comps)
    protein = clr_normalize_each_cell(protein)
    sc.pp.scale(protein)
    protein.obsm["feat"] = pca(protein, n_comps=n_comps)


def main(inp: str, out: str) -> None:
    args = np.load(inp, allow_pickle=False)
    import torch

    torch.set_num_threads(int(args["threads"]))
    from threadpoolctl import threadpool_limits

    threadpool_limits(int(args["threads"]))
    import anndata
    from SpatialGlue.preprocess import construct_neighbor_graph, fix_seed
    from SpatialGlue.SpatialGlue_pyG import Train_SpatialGlue

    datatype = str(args["datatype"])
    seed = int(args["seed"])
    fix_seed(seed)
    full = "counts_1" in args.files
    clock = Clock()
    adatas = []
    for m in (1, 2):
        if full:
            a = anndata.AnnData(np.asarray(args[f"counts_{m}"], dtype=np.float32))
            a.var_names = [f"f{m}_{i}" for i in range(a.n_vars)]
        else:
            a = anndata.AnnData(np.zeros((args["spatial"].shape[0], 1), dtype=np.float32))
            a.obsm["feat"] = args[f"feat_{m}"]
        a.obs_names = [f"s{i}" for i in range(a.n_obs)]
        a.obsm["spatial"] = args["spatial"]
        adatas.append(a)
    if full:
        _preprocess(args, adatas)
    clock.lap("prep")
    data = construct_neighbor_graph(adatas[0], adatas[1], datatype=datatype)
    model = Train_SpatialGlue(data, datatype=datatype, device=torch.device("cpu"), random_seed=seed)
    clock.lap("graph")
    if int(args["epochs"]) >= 0:
        model.epochs = int(args["epochs"])
    output = model.train()
    clock.lap("train")
    np.savez(out, SpatialGlue=output["SpatialGlue"], latent_1=output["emb_latent_omics1"],
             latent_2=output["emb_latent_omics2"], alpha=output["alpha"], alpha_1=output["alpha_omics1"],
             alpha_2=output["alpha_omics2"], epochs=model.epochs, **clock.out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
