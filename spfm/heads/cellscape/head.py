"""The AnnData-facing CellScape head: set up from AnnData, ``.fit()``, embeddings and domains written back.

Keys written by :meth:`CellScape.annotate` (and :meth:`CellScape.run` = fit + annotate):

* ``obsm["X_cellscape_spatial"]`` (N, latent_dim): z_spatial, for spatial domains;
* ``obsm["X_cellscape_intrinsic"]`` (N, latent_dim): z_intrinsic, for cell types (full variant only);
* ``obs["domain"]`` (categorical): PCA(30) + tied-covariance Gaussian mixture of z_spatial at ``n_domains``
  (:func:`spfm.heads.domains.cluster_embedding`), optionally majority-vote refined over ``refine_r`` neighbours;
* ``obs["cell_type_cluster"]`` (categorical, full variant): the same clustering of z_intrinsic at
  ``n_cell_types`` (Leiden at resolution 1 when not given);
* ``uns["cellscape"]``: the config and training summary.
"""

from __future__ import annotations

import copy
import logging
import random
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from spfm.errors import DataError
from spfm.heads.cellscape import prep
from spfm.heads.cellscape.genomap import genomic_layout
from spfm.heads.cellscape.losses import neighbourhood_contrastive, pcgrad_backward, sce_loss
from spfm.heads.cellscape.model import CellScapeModule, edges_into
from spfm.heads.cellscape.sampler import CSRGraph, epoch_batches, locality_order

log = logging.getLogger(__name__)

#: Hyperparameters (constructor keywords) and their defaults. [open] values were chosen on osmFISH / STARmap.
DEFAULTS: dict[str, Any] = {
    "variant": "full",          # "full" (both branches) or "cci" (spatial branch only, spot platforms)
    "n_top_genes": 3000,        # seurat_v3 HVGs (all genes when fewer)
    "target_sum": 1e4,
    "graph": "auto",            # "auto" | "knn" | "delaunay"
    "duplicates": "error",      # coincident cells under Delaunay: "error" or "jitter" (tiny random offset)
    "k": 6,                     # kNN neighbours for grid platforms [open: 6 hexagonal Visium, 8 square bins]
    "mask_ratio": 0.3,          # [open]
    "hidden_dim": 512,          # [open] GAT hidden width
    "latent_dim": 64,           # [open] z_spatial and z_intrinsic width
    "fused_dim": 64,            # [open] fused z width
    "heads": 4,                 # [open] attention heads of the hidden GAT layers
    "n_layers": 2,              # [open] GAT encoder layers
    "tau": 1.0,                 # [open] contrastive temperature (search on BZ5: 0.1-2.0, see docs/cellscape.md)
    "epochs": 50,               # [open]
    "batch_size": 4096,         # seed cells per mini-batch
    "batch_order": "random",    # "random" seeds (paper) or "spatial": runs of the Z-order, cheaper at scale
    "fanout": None,             # neighbours kept per node per hop (None: all; spatial graphs have small degree)
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "lr_step": 50,
    "lr_gamma": 0.5,
    "sce_gamma": 3.0,
    "pcgrad": True,             # False sums the two losses (ablation)
    "n_pcs": 30,
    "refine_r": 0,              # majority-vote refinement neighbours (0: off)
    "gw_max_iter": 200,
    "map_side": None,           # genomic-map side q (None: ceil(sqrt(genes)), the paper's square map)
    "gw_max_cells": 20000,      # cells used for the gene-gene correlations of the genomic map
}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class CellScape:
    """CellScape (Yan et al.): dual-view self-supervised embeddings of cells for spatial domains and cell types.

    Construct with keyword hyperparameters (see :data:`DEFAULTS`), then :meth:`fit` on an AnnData with raw counts
    in ``X`` (or ``layers["counts"]``) and coordinates in ``obsm["spatial"]``; :meth:`annotate` writes the
    embeddings and clusters. ``head.module`` is the trained :class:`CellScapeModule`; its ``grid_index`` buffer
    holds the genomic map so new data (same genes) are embedded the same way.

    Example::

        head = CellScape(variant="full", epochs=100)
        head.run(adata, n_domains=7, seed=0)      # fit + annotate
        adata.obs["domain"], adata.obsm["X_cellscape_spatial"]
    """

    def __init__(self, **hparams: Any) -> None:
        unknown = set(hparams) - set(DEFAULTS)
        if unknown:
            raise DataError(f"unknown CellScape hyperparameter(s) {sorted(unknown)}", field="hparams")
        self.hparams = {**DEFAULTS, **hparams}
        if self.hparams["variant"] not in ("full", "cci"):
            raise DataError(f"variant must be 'full' or 'cci', got {self.hparams['variant']!r}", field="variant")
        if self.hparams["batch_order"] not in ("random", "spatial"):
            raise DataError(f"batch_order must be 'random' or 'spatial', got {self.hparams['batch_order']!r}",
                            field="batch_order")
        if not 0.0 < float(self.hparams["mask_ratio"]) < 1.0:
            raise DataError(f"mask_ratio must be in (0, 1), got {self.hparams['mask_ratio']}", field="mask_ratio")
        self.genes: list[str] | None = None
        self.graph_kind: str | None = None
        self.batch_key: str | None = None
        self.layer: str | None = None
        self.module: CellScapeModule | None = None
        self.history: list[dict[str, float]] = []
        self.timing: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ config
    def to_config(self) -> dict[str, Any]:
        """Hyperparameters + fitted state (gene panel, graph kind, batch column); JSON-able."""
        return {"hparams": copy.deepcopy(self.hparams), "genes": self.genes, "graph_kind": self.graph_kind,
                "batch_key": self.batch_key, "layer": self.layer}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CellScape:
        """A head whose ``module`` has the fitted shapes; load the state_dict into it to restore the model."""
        head = cls(**config["hparams"])
        head.genes = config.get("genes")
        head.graph_kind = config.get("graph_kind")
        head.batch_key = config.get("batch_key")
        head.layer = config.get("layer")
        if head.genes is not None:
            head.module = head._build(len(head.genes))
        return head

    def _build(self, n_genes: int) -> CellScapeModule:
        h = self.hparams
        return CellScapeModule(n_genes, variant=h["variant"], hidden_dim=h["hidden_dim"], latent_dim=h["latent_dim"],
                               fused_dim=h["fused_dim"], heads=h["heads"], n_layers=h["n_layers"],
                               map_side=h["map_side"])

    # ------------------------------------------------------------------------------------------ data
    def _prepare(self, adata: ad.AnnData, batch_key: str | None):
        """Expression (N, p) tensor and CSR graph of an AnnData, with the fitted panel and graph kind."""
        x = prep.expression(adata, self.genes, layer=self.layer, target_sum=self.hparams["target_sum"],
                            batch_key=batch_key)
        graph = prep.spatial_graph(adata, self.graph_kind, self.hparams["k"], batch_key, self.hparams["duplicates"])
        return torch.from_numpy(x), graph

    # ------------------------------------------------------------------------------------------ training
    def fit(self, adata: ad.AnnData, *, batch_key: str | None = None, layer: str | None = None, seed: int = 0,
            device: str = "auto", progress: bool = True, max_steps: int | None = None) -> CellScape:
        """Train on ``adata`` (raw counts, ``obsm["spatial"]``); several samples need ``batch_key``.

        Args:
            adata: cells x genes counts (N, G) with coordinates (N, 2).
            batch_key: ``obs`` column of the sample of each cell: ComBat + a block-diagonal graph.
            layer: read counts from this layer (default ``layers["counts"]`` when present, else ``X``).
            seed: seeds Python, numpy and torch (initialisation, masks, batch order).
            device: ``"auto"`` (cuda when available), ``"cpu"``, ``"cuda"``...
            progress: tqdm bar over epochs.
            max_steps: stop each epoch after this many mini-batches (timing runs on huge data; None: all).

        Sets ``self.history`` (per-epoch mean losses) and ``self.timing`` (setup and training seconds, steps).
        """
        import time

        from tqdm.auto import tqdm

        t_start = time.perf_counter()

        prep.check_inputs(adata)
        prep.counts_matrix(adata, layer)
        if batch_key is not None and batch_key not in adata.obs:
            raise DataError(f"batch column {batch_key!r} not found", field=f'obs["{batch_key}"]')
        _seed_everything(seed)
        h = self.hparams
        self.layer, self.batch_key = layer, batch_key
        self.graph_kind = prep.resolve_graph(adata, h["graph"])
        self.genes = prep.select_genes(adata, layer, int(h["n_top_genes"]), batch_key)
        if len(self.genes) < 2:
            raise DataError(f"a gene panel of {len(self.genes)} gene(s): need at least 2", field="var_names")
        x, graph = self._prepare(adata, batch_key)
        n = x.shape[0]
        module = self._build(x.shape[1])
        if h["variant"] == "full":
            rng = np.random.default_rng(seed)
            rows = rng.choice(n, size=min(n, int(h["gw_max_cells"])), replace=False)
            module.grid_index.copy_(torch.from_numpy(genomic_layout(x[rows].numpy(), max_iter=h["gw_max_iter"],
                                                                    q=module.q)))
        dev = _device(device)
        module.to(dev)
        csr = CSRGraph(graph.edge_index, n)
        zorder = _zorder(adata, batch_key) if h["batch_order"] == "spatial" else None
        hops = int(h["n_layers"]) + 1  # encoder layers + one decoder layer: seeds' outputs are exact
        opt = torch.optim.Adam(module.parameters(), lr=h["lr"], weight_decay=h["weight_decay"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(h["lr_step"]), gamma=float(h["lr_gamma"]))
        params = [p for p in module.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(seed)
        bs = int(h["batch_size"])
        self.history = []
        t_setup = time.perf_counter() - t_start
        total_steps = 0
        bar = tqdm(range(int(h["epochs"])), desc="CellScape", disable=not progress, leave=False)
        for _epoch in bar:
            module.train()
            tot = {"recon": 0.0, "contrast": 0.0, "conflict": 0.0}
            steps = 0
            for seeds in epoch_batches(n, bs, gen, zorder):
                if max_steps is not None and steps >= max_steps:
                    break
                sub = csr.subgraph(seeds, hops, h["fanout"], gen)
                xs = x[sub.nodes].to(dev)
                ei = sub.edge_index.to(dev)
                mask = (torch.rand(len(sub.nodes), generator=gen) < h["mask_ratio"]).to(dev)
                # each layer computes only the rows the losses read: z at the seeds and their neighbours, x_hat at
                # the seeds (the subgraph's nodes are listed by hop)
                z, x_hat = module(xs, ei, mask, sub.rows(hops))
                seed_ids = torch.arange(sub.n_seeds, device=dev)
                masked_seeds = seed_ids[mask[:sub.n_seeds]]
                l_rec = sce_loss(xs[masked_seeds], x_hat[masked_seeds], h["sce_gamma"])
                l_con = neighbourhood_contrastive(z, seed_ids, edges_into(ei, z.shape[0], sub.n_seeds),
                                                  float(h["tau"]))
                opt.zero_grad(set_to_none=True)
                if h["pcgrad"]:
                    info = pcgrad_backward([l_rec, l_con], params)
                else:
                    (l_rec + l_con).backward()
                    info = {"conflict": 0.0}
                opt.step()
                tot["recon"] += float(l_rec.detach())
                tot["contrast"] += float(l_con.detach())
                tot["conflict"] += info["conflict"]
                steps += 1
            sched.step()
            total_steps += steps
            row = {k: v / steps for k, v in tot.items()}
            self.history.append(row)
            bar.set_postfix(recon=f"{row['recon']:.4f}", contrast=f"{row['contrast']:.3f}")
        module.eval()
        self.module = module.cpu()
        self.timing = {"setup_s": t_setup, "train_s": time.perf_counter() - t_start - t_setup, "steps": total_steps,
                       "n_cells": n, "batch_size": bs}
        return self

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def embed(self, adata: ad.AnnData, *, batch_key: str | None = None, device: str = "auto",
              batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(z_spatial (N, latent), z_intrinsic (N, latent) or None for ``cci``) of ``adata``, unmasked, eval mode.

        New data must carry the model's gene panel; several samples need ``batch_key`` (ComBat on their own
        batches). Inference runs on n_layers-hop subgraphs of ``batch_size`` cells, so memory stays bounded.
        """
        if self.module is None or self.genes is None:
            raise DataError("the head is not fitted: call fit() or load a state_dict into from_config()",
                            field="module")
        prep.check_inputs(adata)
        batch_key = batch_key if batch_key is not None else (self.batch_key if self.batch_key in adata.obs
                                                             else None)
        x, graph = self._prepare(adata, batch_key)
        n = x.shape[0]
        dev = _device(device)
        module = self.module.to(dev).eval()
        csr = CSRGraph(graph.edge_index, n)
        hops = int(self.hparams["n_layers"])
        bs = int(batch_size or max(self.hparams["batch_size"], 4096))
        zs = np.zeros((n, self.hparams["latent_dim"]), np.float32)
        zi = np.zeros((n, self.hparams["latent_dim"]), np.float32) if module.intrinsic is not None else None
        # seeds in Z-order through space: each batch's neighbourhood is mostly the batch itself (see locality_order)
        order = _zorder(adata, batch_key)
        for start in range(0, n, bs):
            seeds = order[start:start + bs]
            sub = csr.subgraph(seeds, hops)
            a, b, _ = module.encode(x[sub.nodes].to(dev), sub.edge_index.to(dev), sub.rows(hops))
            zs[seeds.numpy()] = a.cpu().numpy()
            if zi is not None:
                zi[seeds.numpy()] = b.cpu().numpy()
        self.module = module.cpu()
        return zs, zi

    def annotate(self, adata: ad.AnnData, n_domains: int, *, n_cell_types: int | None = None,
                 refine_r: int | None = None, batch_key: str | None = None, seed: int = 0,
                 device: str = "auto") -> ad.AnnData:
        """Write the embeddings, ``obs["domain"]`` and ``obs["cell_type_cluster"]`` onto ``adata``; returns it."""
        from spfm.heads.domains import cluster_embedding, leiden_labels, reduce_pca, refine_labels

        if not isinstance(n_domains, (int, np.integer)) or n_domains < 1:
            raise DataError(f"n_domains must be a positive integer, got {n_domains!r}", field="n_domains")
        if adata.n_obs < n_domains:
            raise DataError(f"fewer cells ({adata.n_obs}) than domains ({n_domains})", field="n_domains")
        zs, zi = self.embed(adata, batch_key=batch_key, device=device)
        adata.obsm["X_cellscape_spatial"] = zs
        labels = cluster_embedding(zs, int(n_domains), method="gmm", n_pcs=self.hparams["n_pcs"], seed=seed,
                                   field='obsm["X_cellscape_spatial"]')
        r = self.hparams["refine_r"] if refine_r is None else refine_r
        if r:
            bk = batch_key or (self.batch_key if self.batch_key in adata.obs else None)
            groups = adata.obs[bk].astype(str).to_numpy() if bk else None
            labels = refine_labels(labels, np.asarray(adata.obsm["spatial"], dtype=float), int(r), groups=groups)
        adata.obs["domain"] = pd.Categorical(labels.astype(str))
        if zi is not None:
            adata.obsm["X_cellscape_intrinsic"] = zi
            if n_cell_types is not None:
                if adata.n_obs < n_cell_types:
                    raise DataError(f"fewer cells ({adata.n_obs}) than cell types ({n_cell_types})",
                                    field="n_cell_types")
                ct = cluster_embedding(zi, int(n_cell_types), method="gmm", n_pcs=self.hparams["n_pcs"], seed=seed,
                                       field='obsm["X_cellscape_intrinsic"]')
            else:
                ct = leiden_labels(reduce_pca(zi.astype(np.float64), self.hparams["n_pcs"], seed), 1.0, seed=seed)
            adata.obs["cell_type_cluster"] = pd.Categorical(ct.astype(str))
        adata.uns["cellscape"] = {"config": _jsonable(self.to_config()), "n_domains": int(n_domains),
                                  "refine_r": int(r or 0), "seed": int(seed),
                                  "final_losses": self.history[-1] if self.history else {}}
        return adata

    def run(self, adata: ad.AnnData, n_domains: int, *, n_cell_types: int | None = None,
            refine_r: int | None = None, batch_key: str | None = None, layer: str | None = None, seed: int = 0,
            device: str = "auto", progress: bool = True) -> ad.AnnData:
        """:meth:`fit` then :meth:`annotate` on the same AnnData (the usual transductive use)."""
        if adata.n_obs < n_domains:  # fail before training, not after
            raise DataError(f"fewer cells ({adata.n_obs}) than domains ({n_domains})", field="n_domains")
        self.fit(adata, batch_key=batch_key, layer=layer, seed=seed, device=device, progress=progress)
        return self.annotate(adata, n_domains, n_cell_types=n_cell_types, refine_r=refine_r, batch_key=batch_key,
                             seed=seed, device=device)


def _zorder(adata: ad.AnnData, batch_key: str | None) -> torch.Tensor:
    """(N,) the cells of ``adata`` along a Z-order curve through ``obsm["spatial"]``, sample by sample."""
    groups = adata.obs[batch_key].astype(str).to_numpy() if batch_key else None
    return torch.from_numpy(locality_order(np.asarray(adata.obsm["spatial"]), groups))


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the (long) gene list, for ``uns`` (h5ad-writable)."""
    out = {k: v for k, v in config.items() if k != "genes"}
    out["hparams"] = {k: ("none" if v is None else v) for k, v in config["hparams"].items()}
    out = {k: ("none" if v is None else v) for k, v in out.items()}
    out["n_genes"] = len(config["genes"] or [])
    return out
