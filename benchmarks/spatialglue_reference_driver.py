"""Run the reference SpatialGlue 1.1.5 (JinmiaoChenLab) on preprocessed inputs; called by benchmarks/spatialglue.py.

Runs inside the reference's own venv (see benchmarks/spatialglue.py for how to build it):

    /tmp/spatialglue-venv/bin/python benchmarks/spatialglue_reference_driver.py IN.npz OUT.npz

IN.npz holds ``feat_1``, ``feat_2`` (N, D) the preprocessed features (the same ones spfm trains on), ``spatial``
(N, 2), ``datatype``, ``seed``, ``epochs`` (-1: the preset's) and ``threads``. The reference's own graph
construction (``construct_neighbor_graph``) and trainer (``Train_SpatialGlue``) are used unchanged; OUT.npz gets
its embedding, modality latents, attention weights, and the seconds spent building graphs and training.
"""

import sys
import time

import numpy as np


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
    adatas = []
    for m in (1, 2):
        a = anndata.AnnData(np.zeros((args["spatial"].shape[0], 1), dtype=np.float32))
        a.obsm["spatial"] = args["spatial"]
        a.obsm["feat"] = args[f"feat_{m}"]
        adatas.append(a)
    t = time.perf_counter()
    data = construct_neighbor_graph(adatas[0], adatas[1], datatype=datatype)
    model = Train_SpatialGlue(data, datatype=datatype, device=torch.device("cpu"), random_seed=seed)
    t_graph = time.perf_counter() - t
    if int(args["epochs"]) >= 0:
        model.epochs = int(args["epochs"])
    t = time.perf_counter()
    output = model.train()
    t_train = time.perf_counter() - t
    np.savez(out, SpatialGlue=output["SpatialGlue"], latent_1=output["emb_latent_omics1"],
             latent_2=output["emb_latent_omics2"], alpha=output["alpha"], alpha_1=output["alpha_omics1"],
             alpha_2=output["alpha_omics2"], graph_s=t_graph, train_s=t_train, epochs=model.epochs)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
