"""The AnnData-facing HisToSGE head: ``fit`` on slides with patch embeddings and counts, ``predict`` anywhere.

    head = HisToSGE(attention="chunk")             # the published model; attention="knn" is spfm's variant
    head.fit([slide_a, slide_b])                   # AnnData with obsm["X_<backbone>"] and raw counts
    out = head.predict(slide_c)                    # AnnData over the gene panel, layers["predicted"]

    # spfm option: LoRA adapters on the backbone trained jointly with the head, from patches instead of embeddings
    head = HisToSGE(attention="knn", finetune="lora", backbone="vit_tiny_patch16_224",
                    backbone_kwargs={"img_size": 112}, backbone_checkpoint="runs/pretrain/final")
    head.fit([slide_a, slide_b], patches=[patches_a, patches_b])   # (N, H, W, 3) uint8 per slide, row order
    out = head.predict(slide_c, patches=patches_c)

Targets are the top ``n_top_genes`` highly variable genes (seurat_v3 on the training counts) after
normalise-total (1e4) and log1p; the loss is MSE, optimiser Adam (lr 1e-3), as published.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from spfm.errors import DataError
from spfm.heads.histosge import inputs
from spfm.heads.histosge.model import HisToSGEModel

PREDICTED_LAYER = "predicted"
MEASURED_LAYER = "measured"
OBSM_KEY = "histosge_predicted"

#: Constructor arguments (all JSON-able) and their defaults: the published settings except where noted.
DEFAULTS: dict[str, Any] = dict(
    attention="chunk",        # "chunk" (published) | "knn" (spfm)
    embedding_key=None,       # obsm key of the patch embeddings; None: the single X_<backbone> entry
    n_top_genes=1000,         # seurat_v3 HVGs of the training counts
    genes=None,               # or an explicit gene panel
    target_sum=1e4,
    chunk_size=50,            # chunk attention: spots per chunk, in AnnData row order
    n_neighbors=8,            # knn attention: neighbours per spot (self added)
    pixel_size_um=None,       # knn: override uns["spfm"]["pixel_size_um"]
    heads=4,
    dim_head=64,
    mlp_dim=1024,
    hidden=None,              # gene head width; None: 2 * feature dim (published 2048 for UNI's 1024)
    n_positions=512,
    positions="array",        # chunk: "array" (published x/y embeddings) | "none" (spfm option: no absolute position)
    output="relu",            # gene head's last activation: "relu" (published) | "linear" (spfm option: no dead genes)
    n_freq=16,
    max_wavelength_um=2000.0,
    min_wavelength_um=20.0,
    dropout=0.0,
    epochs=1000,
    lr=1e-3,
    weight_decay=0.0,
    batch_size=512,           # chunks per step (chunk) or query spots per step (knn)
    seed=1234,
    device="auto",
    # spfm options, off by default (the published model reads frozen embeddings):
    finetune=None,            # None: frozen embeddings from obsm | "lora": LoRA adapters on the backbone trained
                              # jointly with the head from patches (fit/predict take patches=)
    backbone=None,            # finetune: registry name of the backbone (create_backbone)
    backbone_kwargs=None,     # finetune: architecture overrides, e.g. {"img_size": 112}
    backbone_checkpoint=None,  # finetune: starting weights (a checkpoint folder/file); None: random init
    lora_r=8,
    lora_alpha=16,
    backbone_lr=None,         # finetune: learning rate of the adapters; None: lr
)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class _Slide:
    """One slide's tensors: features (N, D) or patches (N, H, W, 3) uint8, positions, targets (N, G) or None,
    training rows."""

    features: np.ndarray | None
    array_xy: np.ndarray | None
    coords_um: np.ndarray | None
    targets: np.ndarray | None
    train_rows: np.ndarray
    patches: np.ndarray | None = None


class HisToSGE:
    """Histology -> spatial gene expression (Shi et al., HisToSGE), with spfm's neighbourhood variant as a switch.

    Args: see :data:`DEFAULTS` (keyword only). The fitted state (``to_config``): ``genes``, ``dim`` and the
    resolved ``embedding_key``.

    Attributes:
        module: the trained :class:`~spfm.heads.histosge.model.HisToSGEModel` (None before ``fit``).
        history: training loss per epoch.
    """

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(DEFAULTS) - {"dim"}
        if unknown:
            raise TypeError(f"unknown HisToSGE argument(s): {', '.join(sorted(unknown))}")
        params = {**DEFAULTS, **kwargs}
        if params["attention"] not in ("chunk", "knn"):
            raise DataError(f"attention must be 'chunk' (published) or 'knn' (spfm), got {params['attention']!r}",
                            field="attention")
        for name in ("chunk_size", "n_neighbors", "epochs", "batch_size", "n_top_genes", "lora_r"):
            if int(params[name]) < 1:
                raise DataError(f"{name} must be >= 1, got {params[name]}", field=name)
        if params["positions"] not in ("array", "none"):
            raise DataError(f"positions must be 'array' (published) or 'none', got {params['positions']!r}",
                            field="positions")
        if params["output"] not in ("relu", "linear"):
            raise DataError(f"output must be 'relu' (published) or 'linear', got {params['output']!r}", field="output")
        if params["finetune"] not in (None, "lora"):
            raise DataError(f"finetune must be None (frozen embeddings, published) or 'lora', got "
                            f"{params['finetune']!r}", field="finetune")
        if params["finetune"] and not params["backbone"]:
            raise DataError("finetune='lora' needs backbone= (a registry name, e.g. 'vit_tiny_patch16_224')",
                            field="backbone")
        self.params = params
        self.genes: list[str] | None = list(params["genes"]) if params["genes"] is not None else None
        self.dim: int | None = kwargs.get("dim")
        self.module: HisToSGEModel | None = None
        self.history: list[float] = []

    # ------------------------------------------------------------------------------------------ config round trip

    def to_config(self) -> dict[str, Any]:
        """Hyperparameters plus the fitted state (gene panel, feature dim, embedding key), all JSON-able."""
        return {**self.params, "genes": self.genes, "dim": self.dim}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HisToSGE:
        """A head whose ``module`` has the fitted shapes, ready for ``module.load_state_dict``."""
        head = cls(**config)
        if head.genes is not None and head.dim is not None:
            head.module = head._build(head.dim, len(head.genes))
        return head

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (:meth:`to_config`) and ``model.safetensors`` (the module's state_dict), atomically."""
        from safetensors.torch import save_file

        from spfm.atomic import atomic_path, atomic_write_json

        module = self._require_fitted()
        with atomic_path(directory, directory=True) as tmp:
            atomic_write_json(tmp / "config.json", {"spfm_head": "HisToSGE", **self.to_config()})
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                      str(tmp / "model.safetensors"))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HisToSGE:
        """A head written by :meth:`save` (weights read from safetensors only)."""
        from safetensors.torch import load_file

        from spfm.atomic import read_json_object

        directory = Path(directory)
        config = read_json_object(directory / "config.json", "HisToSGE config")
        if config.pop("spfm_head", None) != "HisToSGE":
            raise DataError("not a HisToSGE head (spfm_head is not 'HisToSGE')", path=directory / "config.json",
                            field="spfm_head")
        head = cls.from_config(config)
        if head.module is None:
            raise DataError("the config holds no fitted state (genes, dim)", path=directory / "config.json")
        head.module.load_state_dict(load_file(str(directory / "model.safetensors")))
        head.module.eval()
        return head

    def _build(self, dim: int, n_genes: int, *, load_checkpoint: bool = False) -> HisToSGEModel:
        """The module; with ``finetune="lora"`` it carries the backbone (with adapters) as ``module.backbone``.

        ``load_checkpoint``: start the backbone from ``backbone_checkpoint`` (fit); otherwise a random init whose
        weights a ``load_state_dict`` replaces (from_config).
        """
        p = self.params
        module = HisToSGEModel(dim, n_genes, attention=p["attention"], heads=p["heads"], dim_head=p["dim_head"],
                               mlp_dim=p["mlp_dim"], hidden=p["hidden"], n_positions=p["n_positions"],
                               n_freq=p["n_freq"], max_wavelength_um=p["max_wavelength_um"],
                               min_wavelength_um=p["min_wavelength_um"], dropout=p["dropout"],
                               positions=p["positions"], output=p["output"])
        if p["finetune"] == "lora":
            from spfm.heads.histosge.finetune import lora_backbone

            ckpt = p["backbone_checkpoint"] if load_checkpoint else None
            backbone = lora_backbone(p["backbone"], p["backbone_kwargs"] or {}, ckpt, r=p["lora_r"],
                                     alpha=p["lora_alpha"])
            if backbone.embed_dim != dim:
                raise DataError(f"backbone {p['backbone']!r} gives {backbone.embed_dim}-d features, the head expects "
                                f"{dim}", field="backbone")
            module.add_module("backbone", backbone)
        return module

    # ------------------------------------------------------------------------------------------ inputs

    def _slide(self, adata: ad.AnnData, *, targets: bool, train_rows: np.ndarray | None = None,
               patches: np.ndarray | None = None) -> _Slide:
        p = self.params
        X = None if patches is not None else inputs.features(adata, p["embedding_key"], self.dim)
        chunk = p["attention"] == "chunk"
        rows = np.arange(adata.n_obs) if train_rows is None else train_rows
        return _Slide(
            features=X,
            # without position embeddings the chunk model needs no array coordinates (row order makes the chunks)
            array_xy=(inputs.array_xy(adata, p["n_positions"]) if p["positions"] == "array"
                      else np.zeros((adata.n_obs, 2), np.float32)) if chunk else None,
            coords_um=None if chunk else inputs.coords_um(adata, p["pixel_size_um"]),
            targets=inputs.log1p_normalised(adata, self.genes, p["target_sum"]) if targets else None,
            train_rows=rows,
            patches=patches,
        )

    def _select_genes(self, adatas: Sequence[ad.AnnData], masks: Sequence[np.ndarray]) -> list[str]:
        """The panel: ``genes`` if given (checked), else seurat_v3 HVGs of the training spots' counts."""
        common = adatas[0].var_names
        for a in adatas[1:]:
            common = common.intersection(a.var_names, sort=False)
        if self.genes is not None:
            missing = [g for g in self.genes if g not in common]
            if missing:
                raise DataError(f"{len(missing)} panel gene(s) are not measured in every training slide "
                                f"(e.g. {missing[:5]})", field="genes")
            return list(self.genes)
        if len(common) == 0:
            raise DataError("the training slides share no gene", field="var_names")
        from spfm.data.preprocess import highly_variable_genes

        parts = []
        for i, (a, m) in enumerate(zip(adatas, masks)):
            sub = ad.AnnData(inputs.counts(a)[m][:, a.var_names.get_indexer(common)],
                             obs=pd.DataFrame({"slide": str(i)}, index=a.obs_names[m]),
                             var=pd.DataFrame(index=common))
            parts.append(sub)
        joint = ad.concat(parts, index_unique="-") if len(parts) > 1 else parts[0]
        highly_variable_genes(joint, self.params["n_top_genes"], batch_key="slide" if len(parts) > 1 else None)
        var = joint.var[joint.var["highly_variable"].to_numpy()]
        keys = ["highly_variable_nbatches", "highly_variable_rank"] if "highly_variable_nbatches" in var else \
            ["highly_variable_rank"]
        ranked = var.sort_values(keys, ascending=[False, True][-len(keys):], kind="stable").index
        return [str(g) for g in ranked]

    # ------------------------------------------------------------------------------------------ training

    def fit(self, adatas: ad.AnnData | Sequence[ad.AnnData], *, train_mask: np.ndarray | Sequence[np.ndarray] | None
            = None, patches: np.ndarray | Sequence[np.ndarray] | None = None, progress: bool = True) -> HisToSGE:
        """Train on one or more slides.

        Args:
            adatas: slides with patch embeddings in ``obsm[embedding_key]`` (N, D), raw counts in ``X`` (or
                ``layers["counts"]``), and ``obs["array_row"/"array_col"]`` (chunk) or ``obsm["spatial"]`` plus the
                pixel size (knn).
            train_mask: per slide, a bool (N,) mask of the spots whose expression trains the head (recovery: the
                kept half). Chunk attention trains on those spots alone, as published; knn attention still uses
                the other spots' images as context.
            patches: ``finetune="lora"`` only (and then required): per slide, its spots' (N, H, W, 3) uint8 patches
                in row order; the backbone computes the features from them at every step (no embeddings needed).
            progress: show a progress bar over epochs.

        Returns:
            self, with ``module``, ``genes``, ``dim`` and ``history`` set.
        """
        from tqdm.auto import tqdm

        adatas = [adatas] if isinstance(adatas, ad.AnnData) else list(adatas)
        if not adatas:
            raise DataError("no training slides", field="adatas")
        if train_mask is None:
            masks = [np.ones(a.n_obs, bool) for a in adatas]
        else:
            if isinstance(train_mask, np.ndarray) and train_mask.ndim == 1:
                train_mask = [train_mask]
            masks = [np.asarray(m, bool) for m in train_mask]
            if len(masks) != len(adatas) or any(m.shape != (a.n_obs,) for m, a in zip(masks, adatas)):
                raise DataError("train_mask needs one (n_obs,) bool mask per slide", field="train_mask")
            if any(not m.any() for m in masks):
                raise DataError("a train_mask keeps no spot", field="train_mask")
        p = self.params
        torch.manual_seed(p["seed"])
        rng = np.random.default_rng(p["seed"])
        lora = p["finetune"] == "lora"
        self.dim = None
        if lora:
            from spfm.heads.histosge.finetune import check_patches
            from spfm.models.backbones.registry import get_spec

            if isinstance(patches, np.ndarray) and patches.ndim == 4:
                patches = [patches]
            if patches is not None and len(patches) != len(adatas):
                raise DataError(f"{len(patches)} patch arrays for {len(adatas)} slides", field="patches")
            tiles = [check_patches(None if patches is None else patches[i], a.n_obs, f"training slide {i}")
                     for i, a in enumerate(adatas)]
            dims = {get_spec(p["backbone"]).embed_dim}
        else:
            tiles = [None] * len(adatas)
            p["embedding_key"] = inputs.embedding_key(adatas[0], p["embedding_key"])
            dims = {inputs.features(a, p["embedding_key"]).shape[1] for a in adatas}
        if len(dims) != 1:
            raise DataError(f"training slides have embeddings of different sizes {sorted(dims)}",
                            field=f'obsm["{p["embedding_key"]}"]')
        self.genes = self._select_genes(adatas, masks)
        self.dim = dims.pop()
        if p["attention"] == "chunk":
            # the published model trains on the kept spots as a slide of their own
            slides = [self._slide(a[m], targets=True, patches=None if t is None else t[m])
                      for a, m, t in zip(adatas, masks, tiles)]
            for i, s in enumerate(slides):
                inputs.chunks(len(s.targets), p["chunk_size"], f" (training slide {i})")
        else:
            slides = [self._slide(a, targets=True, train_rows=np.flatnonzero(m), patches=t)
                      for a, m, t in zip(adatas, masks, tiles)]
        device = _device(p["device"])
        self.module = self._build(self.dim, len(self.genes), load_checkpoint=True).to(device)
        backbone = getattr(self.module, "backbone", None)
        head_params = [q for n, q in self.module.named_parameters() if not n.startswith("backbone.")]
        groups = [{"params": head_params}]
        if backbone is not None:  # only the LoRA adapters require grad
            groups.append({"params": [q for q in backbone.parameters() if q.requires_grad],
                           "lr": p["lr"] if p["backbone_lr"] is None else p["backbone_lr"]})
        opt = torch.optim.Adam(groups, lr=p["lr"], weight_decay=p["weight_decay"])
        batches = _ChunkBatches(slides, p, device) if p["attention"] == "chunk" else _KnnBatches(slides, p, device)
        self.history = []
        self.module.train()
        bar = tqdm(range(p["epochs"]), desc="HisToSGE", unit="epoch", disable=not progress)
        for _ in bar:
            total, n = 0.0, 0
            for pred, target in batches.epoch(self.module, rng):
                loss = torch.nn.functional.mse_loss(pred, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(target)
                n += len(target)
            self.history.append(total / max(n, 1))
            bar.set_postfix(mse=f"{self.history[-1]:.4f}")
        self.module.eval()
        return self

    # ------------------------------------------------------------------------------------------ prediction

    def _require_fitted(self) -> HisToSGEModel:
        if self.module is None or self.genes is None:
            raise DataError("the head is not fitted: call fit() or from_config() + load_state_dict()", field="module")
        return self.module

    @torch.no_grad()
    def predict_array(self, adata: ad.AnnData, *, patches: np.ndarray | None = None) -> np.ndarray:
        """(N, G) float32 predicted log1p-normalised expression of the panel at every spot of ``adata``.

        ``patches``: ``finetune="lora"`` only (and then required): the spots' (N, H, W, 3) uint8 patches.
        """
        module = self._require_fitted()
        p = self.params
        device = next(module.parameters()).device
        module.eval()
        if p["finetune"] == "lora":
            from spfm.heads.histosge.finetune import check_patches
            from spfm.models.embed import patch_features

            tiles = check_patches(patches, adata.n_obs, "prediction")
            slide = self._slide(adata, targets=False, patches=tiles)
            slide.features = np.concatenate([
                patch_features(module.backbone, torch.from_numpy(tiles[i:i + 256]).to(device)).float().cpu().numpy()
                for i in range(0, len(tiles), 256)]) if len(tiles) else np.zeros((0, self.dim), np.float32)
        else:
            inputs.embedding_key(adata, p["embedding_key"])
            slide = self._slide(adata, targets=False)
        out = np.zeros((adata.n_obs, len(self.genes)), np.float32)
        if p["attention"] == "chunk":
            parts = inputs.chunks(adata.n_obs, p["chunk_size"], " to predict")
            index, pad = inputs.pad_chunks(parts)
            feats = torch.from_numpy(slide.features[index]).to(device)
            xy = torch.from_numpy(slide.array_xy[index]).to(device)
            pred = module.forward_chunks(feats, xy, torch.from_numpy(pad).to(device)).cpu().numpy()
            out[index[~pad]] = pred[~pad]
        else:
            nb = torch.from_numpy(inputs.neighbours(slide.coords_um, p["n_neighbors"])).to(device)
            feats = torch.from_numpy(slide.features).to(device)
            xy = torch.from_numpy(slide.coords_um).to(device)
            for start in range(0, adata.n_obs, 4096):
                q = torch.arange(start, min(start + 4096, adata.n_obs), device=device)
                out[start:start + len(q)] = module.forward_knn(feats, xy, nb[q], q).cpu().numpy()
        return out

    def predict(self, adata: ad.AnnData, *, measured: bool | str = "auto", inplace: bool = True,
                patches: np.ndarray | None = None) -> ad.AnnData:
        """Predict the panel at every spot (or new position) of ``adata``.

        Args:
            adata: spots or positions with embeddings (and array coordinates or ``obsm["spatial"]``, as in fit).
            measured: also return the measured log1p-normalised panel in ``layers["measured"]``: ``"auto"`` when
                ``adata`` has counts for the panel (an AnnData without genes, e.g. new positions, is fine), True to
                require them. A slide measuring some but not all panel genes is a gene panel mismatch (DataError).
            inplace: also write the predictions into ``adata.obsm["histosge_predicted"]`` (a DataFrame over the
                panel genes).
            patches: ``finetune="lora"`` only: the spots' (N, H, W, 3) uint8 patches (the backbone embeds them).

        Returns:
            An AnnData over the panel genes: ``obs`` and ``obsm["spatial"]`` of ``adata``, ``X`` =
            ``layers["predicted"]`` (N, G) float32, ``layers["measured"]`` when available,
            ``uns["histosge"]`` (config summary).
        """
        pred = self.predict_array(adata, patches=patches)
        genes = list(self.genes)
        present = np.isin(genes, adata.var_names)
        want = measured is True or (measured == "auto" and adata.n_vars > 0)
        if want and not present.all():
            missing = [g for g, ok in zip(genes, present) if not ok]
            raise DataError(f"gene panel mismatch: {len(missing)} of the head's {len(genes)} genes are not in "
                            f"this AnnData (e.g. {missing[:5]}); pass measured=False to predict without them",
                            field="var_names")
        out = ad.AnnData(pred.copy(), obs=adata.obs.copy(), var=pd.DataFrame(index=pd.Index(genes)))
        out.layers[PREDICTED_LAYER] = pred
        if want:
            out.layers[MEASURED_LAYER] = inputs.log1p_normalised(adata, genes, self.params["target_sum"])
        if "spatial" in adata.obsm:
            out.obsm["spatial"] = np.asarray(adata.obsm["spatial"])
        if "spfm" in adata.uns:
            out.uns["spfm"] = dict(adata.uns["spfm"])
        out.uns["histosge"] = {"attention": self.params["attention"], "embedding_key": self.params["embedding_key"],
                               "target": f"log1p(normalise_total {self.params['target_sum']:g})"}
        if inplace:
            adata.obsm[OBSM_KEY] = pd.DataFrame(pred, index=adata.obs_names, columns=genes)
        return out


class _SpotFeatures:
    """Features of training spots by global index (slides concatenated): the frozen embeddings, or, with
    ``finetune="lora"``, the module's backbone run on the spots' patches at every step (gradients reach the
    adapters). Each distinct spot is embedded once per step."""

    def __init__(self, slides: list[_Slide], device: torch.device) -> None:
        if slides[0].patches is None:
            self.fixed = torch.from_numpy(np.concatenate([s.features for s in slides])).to(device)
            self.patches = None
        else:
            self.fixed = None
            self.patches = torch.from_numpy(np.concatenate([s.patches for s in slides])).to(device)

    def __call__(self, module: HisToSGEModel, idx: torch.Tensor) -> torch.Tensor:
        """(...) spot indices -> (..., D) features."""
        if self.fixed is not None:
            return self.fixed[idx]
        from spfm.models.embed import patch_features

        used, inverse = torch.unique(idx, return_inverse=True)
        return patch_features(module.backbone, self.patches[used])[inverse]


class _ChunkBatches:
    """The published batches: every slide's spots in row order, cut into chunks, shuffled, ``batch_size`` a step."""

    def __init__(self, slides: list[_Slide], p: dict[str, Any], device: torch.device) -> None:
        idx, xy, y, pads = [], [], [], []
        offset = 0
        for s in slides:
            n = len(s.targets)
            index, pad = inputs.pad_chunks(inputs.chunks(n, p["chunk_size"]))
            idx.append(index + offset)  # global spot index (padding points at the chunk's first spot)
            pads.append(pad)
            xy.append(s.array_xy[index])
            y.append(s.targets[index])
            offset += n
        width = max(i.shape[1] for i in idx)

        def stack(arrays: list[np.ndarray], fill: Any) -> torch.Tensor:
            padded = [np.concatenate([a, np.full((a.shape[0], width - a.shape[1], *a.shape[2:]), fill, a.dtype)],
                                     axis=1) for a in arrays]
            return torch.from_numpy(np.concatenate(padded)).to(device)

        self.index, self.xy, self.targets = stack(idx, 0), stack(xy, 0), stack(y, 0)
        self.pad = stack(pads, True)
        self.features = _SpotFeatures(slides, device)
        self.batch_size = int(p["batch_size"])

    def epoch(self, module: HisToSGEModel, rng: np.random.Generator):
        order = torch.from_numpy(rng.permutation(len(self.index))).to(self.index.device)
        for start in range(0, len(order), self.batch_size):
            b = order[start:start + self.batch_size]
            pred = module.forward_chunks(self.features(module, self.index[b]), self.xy[b], self.pad[b])
            keep = ~self.pad[b]
            yield pred[keep], self.targets[b][keep]


class _KnnBatches:
    """spfm's batches: training spots of all slides shuffled, ``batch_size`` queries a step, each with its
    k nearest spots of its own slide (any spot with an image, measured or not) as context."""

    def __init__(self, slides: list[_Slide], p: dict[str, Any], device: torch.device) -> None:
        offset = 0
        xy, nbs, queries, ys = [], [], [], []
        k = int(p["n_neighbors"])
        for s in slides:
            nb = inputs.neighbours(s.coords_um, k)
            if nb.shape[1] < k:  # a tiny slide: pad with self (the offset is then 0, a harmless repeat)
                nb = np.concatenate([nb, np.repeat(np.arange(len(nb))[:, None], k - nb.shape[1], axis=1)], axis=1)
            xy.append(s.coords_um)
            nbs.append(nb + offset)
            queries.append(s.train_rows + offset)
            ys.append(s.targets[s.train_rows])
            offset += len(s.coords_um)
        self.features = _SpotFeatures(slides, device)
        self.xy = torch.from_numpy(np.concatenate(xy)).to(device)
        self.nb = torch.from_numpy(np.concatenate(nbs)).to(device)
        self.query = torch.from_numpy(np.concatenate(queries)).to(device)
        self.targets = torch.from_numpy(np.concatenate(ys)).to(device)
        self.batch_size = int(p["batch_size"])

    def epoch(self, module: HisToSGEModel, rng: np.random.Generator):
        order = torch.from_numpy(rng.permutation(len(self.query))).to(self.query.device)
        for start in range(0, len(order), self.batch_size):
            b = order[start:start + self.batch_size]
            q = self.query[b]
            # only the queries and their neighbours enter the step: features of those spots alone
            used, local = torch.unique(torch.cat([q[:, None], self.nb[q]], dim=1), return_inverse=True)
            yield module.forward_knn(self.features(module, used), self.xy[used], local[:, 1:], local[:, 0]), \
                self.targets[b]
