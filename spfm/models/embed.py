"""Patch embeddings from a registered backbone: ``spfm embed SOURCE OUT``.

Two sources:

* a HEST-layout root: each sample's spot-centred patches are cut with :func:`spfm.data.patches.iter_patches` at the
  backbone's input size and 0.5 um/px (HEST's patches) and embedded; one AnnData per sample,
  ``OUT/{sample_id}.h5ad``, holds the kept spots with the sample's counts (``X``), ``var``, ``obsm["spatial"]`` and
  the embeddings in ``obsm["X_<backbone>"]`` (N_kept, D) float32, so a head can read it directly. Spots the patcher
  dropped (background, slide edge) are listed in ``uns["spfm_embed"]["dropped"]``;
* a shard directory (``spfm shard`` output): each split's records (in manifest order with ``num_workers=0``;
  interleaved by worker otherwise) go to ``OUT/{split}.h5`` with
  ``keys`` (N,), ``sample_id`` (N,) and ``embeddings`` (N, D) float32.

Each output records the run's configuration (backbone, weights, patch options, precision). A rerun skips outputs
whose configuration matches, so a killed run resumes per sample (per split for shards); an output made with another
configuration is refused unless ``overwrite=True``. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from spfm.atomic import atomic_path, atomic_write_h5ad, atomic_write_json
from spfm.data.hest import HestSample, read_sample, sample_ids
from spfm.data.patches import HEST_PATCH_PIXEL_SIZE_UM, PatchConfig, PatchStats, iter_patches
from spfm.data.records import MANIFEST_NAME
from spfm.errors import DataError
from spfm.models.backbones.registry import Backbone, create_backbone
from spfm.models.backbones.weights import resolve_checkpoint

#: ``uns`` entry of an embedded sample: key, backbone, config (JSON text), dropped barcodes, patch statistics.
EMBED_UNS_KEY = "spfm_embed"
#: Used when neither ``backbone`` nor a checkpoint's config names one.
DEFAULT_BACKBONE = "vit_tiny_patch16_224"
Precision = Literal["auto", "no", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# Backbone, device, precision


def load_backbone(backbone: str | None = None, *, pretrained: bool = False,
                  checkpoint: str | os.PathLike | None = None,
                  backbone_kwargs: dict[str, Any] | None = None) -> tuple[Backbone, dict[str, Any]]:
    """Build the backbone to embed with, and the description of its weights that outputs record.

    A checkpoint directory's ``config.json`` names its backbone (``spfm_backbone`` from
    :func:`~spfm.models.backbones.registry.save_backbone`, ``backbone`` from ``spfm train``) when ``backbone`` is
    None, and ``spfm train``'s ``img_size`` is passed on, so its own output loads without options.
    """
    kwargs = dict(backbone_kwargs or {})
    weights: dict[str, Any] | None = None
    if checkpoint is not None:
        ckpt = resolve_checkpoint(checkpoint)
        config = ckpt.config or {}
        named = config.get("spfm_backbone") or config.get("backbone")
        if backbone is None and isinstance(named, str):
            backbone = named
        if "img_size" in config and "img_size" not in config.get("model_args", {}):
            kwargs.setdefault("img_size", config["img_size"])
        stat = ckpt.weights.stat()
        weights = {"path": str(ckpt.weights.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    name = backbone or DEFAULT_BACKBONE
    model = create_backbone(name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    description = {"backbone": name, "pretrained": bool(pretrained), "checkpoint": weights,
                   "backbone_kwargs": kwargs, "embed_dim": int(model.embed_dim)}
    return model, description


def input_size(backbone: Backbone) -> tuple[int, bool]:
    """(image side the backbone expects, whether it accepts only that side)."""
    embed = getattr(backbone.trunk, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None:
        return int(backbone.spec.input_size), False
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    strict = bool(getattr(embed, "strict_img_size", True)) and not getattr(embed, "dynamic_img_size", False)
    return side, strict


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """``"auto"``: bf16 on a GPU that has it, else fp16 on GPU; no autocast on CPU (faster there for small ViTs)."""
    if precision not in ("auto", "no", "bf16", "fp16"):
        raise DataError(f"precision must be 'auto', 'no', 'bf16' or 'fp16', got {precision!r}", field="precision")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _autocast(precision: str, device: torch.device) -> AbstractContextManager:
    return nullcontext() if precision == "no" else torch.autocast(device.type, dtype=_DTYPES[precision])


def _model_input(backbone: Backbone, images: torch.Tensor, side: int, strict: bool, *,
                 uint8_hwc: bool = True) -> torch.Tensor:
    """(B, 3, side, side) backbone input from (B, H, W, 3) uint8 patches (scaled to [0, 1], the backbone's
    normalisation) or, with ``uint8_hwc=False``, from (B, 3, H, W) float32 already normalised; resized only when the
    backbone accepts one side alone (``strict``)."""
    x = backbone.normalize(images.permute(0, 3, 1, 2).float().div(255)) if uint8_hwc else images
    if strict and tuple(x.shape[-2:]) != (side, side):
        # resizing after normalising is the same as before: both are per-channel affine
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def patch_features(backbone: Backbone, patches: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 patches -> (B, D) features, as ``spfm embed`` computes them; differentiable through the
    backbone (HisToSGE's joint LoRA trains through it)."""
    side, strict = input_size(backbone)
    return backbone(_model_input(backbone, patches, side, strict))


@torch.inference_mode()
def _embed_batch(backbone: Backbone, images: torch.Tensor, device: torch.device, precision: str, side: int,
                 strict: bool, *, uint8_hwc: bool) -> np.ndarray:
    """One batch -> (B, D) float32 embeddings.

    Args:
        images: (B, H, W, 3) uint8 when ``uint8_hwc``, else (B, 3, H, W) float32 already normalised.
    """
    x = _model_input(backbone, images.to(device, non_blocking=True), side, strict, uint8_hwc=uint8_hwc)
    with _autocast(precision, device):
        out = backbone(x)
    return out.float().cpu().numpy()


def _progress(progress: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, **kwargs)


def _identity(batch: Any) -> Any:
    return batch


# ----------------------------------------------------------------------------------------------------------------
# HEST roots


class _SamplePatches(IterableDataset):
    """Batches of one sample's patches; DataLoader worker w of n patches rows w, w + n, ... of the sample.

    Yields ``{"image": (B, S, S, 3) uint8, "index": (B,) int64 rows of the sample}`` and, last, ``{"stats":
    PatchStats}`` for the rows it covered.
    """

    def __init__(self, root: Path, sample_id: str, config: PatchConfig, batch_size: int) -> None:
        super().__init__()
        self.root, self.sample_id, self.config, self.batch_size = root, sample_id, config, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        # each worker reads the sample and opens the slide itself (an open slide does not cross processes);
        # the main process validated it already
        sample = read_sample(self.root, self.sample_id, validate=False)
        rows = np.arange(worker, sample.adata.n_obs, n_workers)
        part = HestSample(sample.sample_id, sample.root, sample.adata[rows], sample.metadata, sample.slide_path,
                          sample.patches_path)
        stats = PatchStats()
        images: list[np.ndarray] = []
        index: list[int] = []
        try:
            for patch in iter_patches(part, self.config, stats):
                images.append(patch.image)
                index.append(int(rows[patch.index]))
                if len(images) == self.batch_size:
                    yield {"image": torch.from_numpy(np.stack(images)), "index": torch.tensor(index)}
                    images, index = [], []
            if images:
                yield {"image": torch.from_numpy(np.stack(images)), "index": torch.tensor(index)}
        finally:
            part.close()
        yield {"stats": stats}


def _merge_stats(total: PatchStats, part: PatchStats) -> None:
    for name in ("n_spots", "n_kept", "n_dropped_tissue", "n_dropped_edge", "n_padded"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.dropped.extend(part.dropped)
    if part.n_spots:
        total.level, total.source_px = part.level, part.source_px


def _existing_config(path: Path) -> str | None:
    """The configuration JSON recorded in an existing output, or None when it has none (not ours, or damaged)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if path.suffix == ".h5ad":
                node = f.get(f"uns/{EMBED_UNS_KEY}/config")
                value = None if node is None else node[()]
            else:
                value = f.attrs.get("config")
    except OSError:
        return None
    return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))


def _should_skip(path: Path, config_json: str, overwrite: bool) -> bool:
    """Whether an existing output can be kept; refuse one made with another configuration."""
    if not path.exists() or overwrite:
        return False
    found = _existing_config(path)
    if found == config_json:
        return True
    raise DataError("exists and was made with another configuration (backbone, weights, patches or precision); "
                    "embed into another directory or pass overwrite=True", path=path, field=EMBED_UNS_KEY)


def _embed_sample(backbone: Backbone, root: Path, sid: str, out_path: Path, *, key: str, config_json: str,
                  patch: PatchConfig, batch_size: int, num_workers: int, device: torch.device, precision: str,
                  side: int, strict: bool, progress: bool) -> dict[str, Any]:
    sample = read_sample(root, sid)  # validates counts and coordinates before any work
    adata = sample.adata
    sample.close()
    n = adata.n_obs
    emb = np.zeros((n, backbone.embed_dim), dtype=np.float32)
    kept = np.zeros(n, dtype=bool)
    stats = PatchStats()
    loader = DataLoader(_SamplePatches(root, sid, patch, batch_size), batch_size=None, num_workers=num_workers,
                        collate_fn=_identity, pin_memory=device.type == "cuda")
    with _progress(progress, total=n, desc=sid, unit="spot", leave=False) as bar:
        for item in loader:
            if "stats" in item:
                _merge_stats(stats, item["stats"])
                continue
            idx = item["index"].numpy()
            emb[idx] = _embed_batch(backbone, item["image"], device, precision, side, strict, uint8_hwc=True)
            kept[idx] = True
            bar.update(len(idx))
    if stats.n_kept != int(kept.sum()):
        raise RuntimeError(f"{sid}: {stats.n_kept} patches kept but {int(kept.sum())} embedded")

    result = adata[kept].copy()
    result.obsm[key] = emb[kept]
    # h5ad cannot store None; the metadata's unknown fields are simply absent
    result.uns["spfm"] = {k: v for k, v in adata.uns.get("spfm", {}).items() if v is not None}
    result.uns[EMBED_UNS_KEY] = {
        "key": key,
        "config": config_json,
        "n_spots": int(n),
        "n_kept": int(kept.sum()),
        "dropped": np.array(sorted(stats.dropped), dtype=str),
        "patch_stats": json.dumps(stats.to_dict()),
    }
    atomic_write_h5ad(result, out_path)
    return {"n_spots": int(n), "n_kept": int(kept.sum()), "n_dropped": len(stats.dropped)}


# ----------------------------------------------------------------------------------------------------------------
# Shards


def _embed_split(backbone: Backbone, source: Path, split: str | None, out_path: Path, *, key: str, config_json: str,
                 batch_size: int, num_workers: int, device: torch.device, precision: str, side: int, strict: bool,
                 progress: bool) -> dict[str, Any]:
    import h5py

    from spfm.data.loader import make_loader

    loader = make_loader(source, split=split, batch_size=batch_size, shuffle=0, augment=False,
                         num_workers=num_workers, normalize=(backbone.mean, backbone.std),
                         pin_memory=device.type == "cuda")
    keys: list[str] = []
    sids: list[str] = []
    chunks: list[np.ndarray] = []
    with _progress(progress, total=loader.dataset.num_records, desc=split or "all", unit="record",
                   leave=False) as bar:
        for batch in loader:
            chunks.append(_embed_batch(backbone, batch["image"], device, precision, side, strict, uint8_hwc=False))
            keys.extend(batch["key"])
            sids.extend(str(m["sample_id"]) for m in batch["meta"])
            bar.update(len(batch["key"]))
    emb = np.concatenate(chunks) if chunks else np.zeros((0, backbone.embed_dim), np.float32)
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("embeddings", data=emb)
            f.create_dataset("keys", data=np.array(keys, dtype="S"))
            f.create_dataset("sample_id", data=np.array(sids, dtype="S"))
            f.attrs.update(config=config_json, key=key, split=split or "all")
    return {"n_records": len(keys)}


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def embed(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone: str | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    batch_size: int = 64,
    precision: Precision = "auto",
    device: str | torch.device | None = None,
    patch: PatchConfig | None = None,
    samples: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Embed every spot's patch of a HEST root, or every record of a shard directory.

    Args:
        source: a HEST-layout root (``st/``) or a shard directory (``manifest.json``).
        out: the output directory (``{sample_id}.h5ad`` per sample, or ``{split}.h5`` per split, plus
            ``embed.json`` summarising the run).
        backbone: a registry name; default: the one a checkpoint's config names, else ``vit_tiny_patch16_224``.
        pretrained, checkpoint: the weights (see :func:`~spfm.models.backbones.registry.create_backbone`).
        backbone_kwargs: architecture overrides (``img_size=64`` for a small ViT).
        batch_size: patches per forward pass.
        precision: ``"auto"`` (bf16/fp16 autocast on GPU, none on CPU), ``"no"``, ``"bf16"`` or ``"fp16"``;
            embeddings are stored as float32 whatever the compute precision.
        device: default CUDA when available, else CPU.
        patch: how HEST-root patches are cut; default the backbone's input size at 0.5 um/px. Shard images are
            resized to the input size when the backbone accepts only that size.
        samples: HEST root only: the sample ids to embed (default all).
        splits: shards only: the splits to embed (default each split in the manifest).
        num_workers: DataLoader workers cutting patches (HEST root) or decoding records (shards).
        overwrite: recompute outputs that exist (otherwise: skip those with the same configuration, refuse others).
        progress: show progress bars.

    Returns:
        ``out``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    source, out = Path(source), Path(out)
    is_shards = (source / MANIFEST_NAME).is_file()
    if not is_shards and not (source / "st").is_dir():
        raise DataError(f"neither a HEST root (no st/) nor a shard directory (no {MANIFEST_NAME})", path=source)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute = resolve_precision(precision, dev)
    model, weights = load_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint,
                                   backbone_kwargs=backbone_kwargs)
    model.eval().to(dev)
    side, strict = input_size(model)
    key = f"X_{weights['backbone']}"
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"source": str(source), "backbone": weights["backbone"], "key": key,
                               "device": str(dev), "precision": compute, "outputs": {}}
    start = time.perf_counter()

    if is_shards:
        from spfm.data.shards import read_manifest

        manifest = read_manifest(source / MANIFEST_NAME)
        names = list(splits) if splits is not None else sorted({str(e.get("split")) for e in manifest["shards"]})
        config_json = json.dumps({**weights, "precision": compute, "input_size": side}, sort_keys=True)
        for split in _progress(progress, iterable=names, desc="splits", unit="split"):
            path = out / f"{split}.h5"
            if _should_skip(path, config_json, overwrite):
                summary["outputs"][split] = {"skipped": True}
                continue
            summary["outputs"][split] = _embed_split(
                model, source, split, path, key=key, config_json=config_json, batch_size=batch_size,
                num_workers=num_workers, device=dev, precision=compute, side=side, strict=strict, progress=progress)
    else:
        patch = patch if patch is not None else PatchConfig(size_px=side, pixel_size_um=HEST_PATCH_PIXEL_SIZE_UM)
        if strict and patch.size_px != side:
            raise DataError(f"patches of {patch.size_px} px do not fit backbone {weights['backbone']!r}, which takes "
                            f"{side} px images", field="patch.size_px")
        ids = sample_ids(source) if samples is None else [str(s) for s in samples]
        if not ids:
            raise DataError("no samples to embed", path=source / "st")
        config_json = json.dumps({**weights, "precision": compute, "patch": patch.to_dict()}, sort_keys=True)
        for sid in _progress(progress, iterable=ids, desc="samples", unit="sample"):
            path = out / f"{sid}.h5ad"
            if _should_skip(path, config_json, overwrite):
                summary["outputs"][sid] = {"skipped": True}
                continue
            summary["outputs"][sid] = _embed_sample(
                model, source, sid, path, key=key, config_json=config_json, patch=patch, batch_size=batch_size,
                num_workers=num_workers, device=dev, precision=compute, side=side, strict=strict, progress=progress)
    summary["config"] = json.loads(config_json)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    atomic_write_json(out / "embed.json", summary)
    return out
