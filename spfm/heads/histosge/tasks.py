"""HisToSGE's tasks around the model: recovery splits, denser lattices, and patch embeddings at any position.

* recovery: :func:`recovery_mask` keeps a random fraction of a slide's spots for training;
* generation: :func:`denser_positions` lays a 4x denser lattice over a slide (Visium-like hexagonal arrays: the
  three shifted copies, +1 column and +/-0.5 column + 0.5 row; legacy ST and square arrays: the midpoints,
  +0.5 column, +0.5 row and both), and :func:`embed_positions` cuts patches at those positions from the slide and
  embeds them with a registry backbone, exactly as ``spfm embed`` does at the measured spots;
* :func:`embed_samples` runs ``spfm embed`` on samples of a HEST root and returns their AnnData.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch

from spfm.errors import DataError

#: (d_row, d_col) of the new lattices' shifted copies.
HEX_SHIFTS = ((0.0, 1.0), (0.5, 0.5), (0.5, -0.5))
SQUARE_SHIFTS = ((0.0, 0.5), (0.5, 0.0), (0.5, 0.5))


def recovery_mask(n: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(n,) bool: a random ``fraction`` of the spots (at least one) kept for training."""
    if not 0 < fraction < 1:
        raise DataError(f"fraction must be in (0, 1), got {fraction}", field="fraction")
    keep = np.zeros(n, bool)
    keep[np.random.default_rng(seed).choice(n, max(1, int(round(fraction * n))), replace=False)] = True
    return keep


def lattice_kind(adata: ad.AnnData) -> Literal["hex", "square"]:
    """``"hex"`` for Visium-like arrays (array_row + array_col always even), else ``"square"``."""
    rc = _array_rc(adata)
    tech = str((adata.uns.get("spfm") or {}).get("technology") or "").lower()
    if "visium" in tech or np.all((rc.sum(axis=1) % 2) == 0):
        return "hex"
    return "square"


def _array_rc(adata: ad.AnnData) -> np.ndarray:
    for k in ("array_row", "array_col"):
        if k not in adata.obs:
            raise DataError("a denser lattice needs the spots' array coordinates", field=f'obs["{k}"]')
    return adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)


def denser_positions(adata: ad.AnnData, lattice: Literal["auto", "hex", "square"] = "auto") -> ad.AnnData:
    """The measured spots plus the three shifted copies of their lattice, where they fall between measured spots.

    Pixel positions of the new points come from a least-squares affine map (array_row, array_col) -> pixel (x, y)
    fitted on the measured spots, so a slightly rotated or sheared array is followed. A new point is kept when it is
    the midpoint of two measured spots (its parent and the spot two shifts away), so none falls past the tissue edge.

    Returns:
        An AnnData without genes: ``obs["array_row"]``, ``obs["array_col"]`` (floats; half-integers for new points),
        ``obs["origin"]`` (``"measured"`` / ``"new"``), ``obs["parent_spot"]`` (the spot a copy was shifted from),
        ``obsm["spatial"]`` pixel (x, y), and ``uns["spfm"]`` of ``adata``. Measured spots come first, in order.
    """
    rc = _array_rc(adata)
    if "spatial" not in adata.obsm:
        raise DataError("no spot coordinates", field='obsm["spatial"]')
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    if len(rc) < 3:
        raise DataError(f"{len(rc)} spots are too few to fit the lattice", field='obs["array_row"]')
    kind = lattice_kind(adata) if lattice == "auto" else lattice
    if kind not in ("hex", "square"):
        raise DataError(f"lattice must be 'auto', 'hex' or 'square', got {lattice!r}", field="lattice")
    design = np.column_stack([rc, np.ones(len(rc))])
    affine, *_ = np.linalg.lstsq(design, xy, rcond=None)  # (3, 2)
    # the pitch: centre-to-centre distance of neighbours (hex: two columns apart; square: one)
    step = np.array([[0.0, 2.0 if kind == "hex" else 1.0, 0.0]]) @ affine
    pitch = float(np.linalg.norm(step))
    names, rows, cols, parents, pos = [], [], [], [], []
    measured = {(float(r), float(c)) for r, c in rc}
    seen = set(measured)
    for d_row, d_col in HEX_SHIFTS if kind == "hex" else SQUARE_SHIFTS:
        new_rc = rc + np.array([d_row, d_col])
        new_xy = np.column_stack([new_rc, np.ones(len(rc))]) @ affine
        # a new point is the midpoint of its parent and the measured spot two shifts away
        far = rc + 2 * np.array([d_row, d_col])
        close = np.array([(float(r), float(c)) in measured for r, c in far])
        for i in np.flatnonzero(close):
            key = (float(new_rc[i, 0]), float(new_rc[i, 1]))
            if key in seen:
                continue
            seen.add(key)
            names.append(f"new_r{key[0]:g}_c{key[1]:g}")
            rows.append(key[0])
            cols.append(key[1])
            parents.append(str(adata.obs_names[i]))
            pos.append(new_xy[i])
    obs = pd.DataFrame({
        "array_row": np.concatenate([rc[:, 0], rows]).astype(np.float64),
        "array_col": np.concatenate([rc[:, 1], cols]).astype(np.float64),
        "origin": pd.Categorical(["measured"] * len(rc) + ["new"] * len(rows), categories=["measured", "new"]),
        "parent_spot": list(adata.obs_names.astype(str)) + parents,
    }, index=pd.Index(list(adata.obs_names.astype(str)) + names))
    out = ad.AnnData(obs=obs)
    out.obsm["spatial"] = np.vstack([xy, np.asarray(pos).reshape(-1, 2)])
    if "spfm" in adata.uns:
        out.uns["spfm"] = dict(adata.uns["spfm"])
    out.uns["histosge_lattice"] = {"kind": kind, "pitch_px": pitch}
    return out


def check_positions(xy: np.ndarray, size: tuple[int, int], where: str = "positions") -> None:
    """Raise :class:`DataError` when a position lies outside a (width, height) image."""
    xy = np.asarray(xy, dtype=np.float64)
    bad = ~np.isfinite(xy).all(axis=1) | (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= size[0]) | \
        (xy[:, 1] >= size[1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{int(bad.sum())} position(s) lie outside the {size[0]} x {size[1]} px image, e.g. "
                        f"{tuple(np.round(xy[i], 1))}", field=f'{where} obsm["spatial"]')


def embed_positions(root: str | os.PathLike, sample_id: str, positions: ad.AnnData, *,
                    backbone: str | None = None, checkpoint: str | os.PathLike | None = None,
                    pretrained: bool = False, backbone_kwargs: dict[str, Any] | None = None, patch: Any = None,
                    batch_size: int = 64, device: str | None = None) -> ad.AnnData:
    """Patch embeddings at arbitrary positions of a HEST sample's slide (e.g. :func:`denser_positions`).

    Patches are cut by :func:`spfm.data.patches.iter_patches` and embedded as :func:`spfm.models.embed.embed`
    does (same backbone loading, input size and normalisation). Positions whose patch is mostly background are
    dropped (listed in ``uns["spfm_embed"]["dropped"]``).

    Args:
        root, sample_id: the HEST sample whose slide to cut from.
        positions: AnnData with ``obsm["spatial"]`` full-resolution pixel (x, y).
        backbone, checkpoint, pretrained, backbone_kwargs: the backbone (see ``spfm.models.embed.load_backbone``).
        patch: a :class:`spfm.data.patches.PatchConfig`; default the backbone's input size at 0.5 um/px.

    Returns:
        ``positions`` restricted to the kept rows, with ``obsm["X_<backbone>"]`` (N_kept, D) float32 and
        ``uns["spfm"]`` from the sample.
    """
    from spfm.data.hest import HestSample, read_sample
    from spfm.data.patches import HEST_PATCH_PIXEL_SIZE_UM, PatchConfig, PatchStats, iter_patches
    from spfm.models.embed import _embed_batch, input_size, load_backbone, resolve_precision

    if "spatial" not in positions.obsm:
        raise DataError("no positions", field='obsm["spatial"]')
    sample = read_sample(root, sample_id)
    try:
        check_positions(np.asarray(positions.obsm["spatial"])[:, :2], sample.slide.dimensions)
        model, weights = load_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint,
                                       backbone_kwargs=backbone_kwargs)
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.eval().to(dev)
        side, strict = input_size(model)
        patch = patch if patch is not None else PatchConfig(size_px=side, pixel_size_um=HEST_PATCH_PIXEL_SIZE_UM)
        precision = resolve_precision("auto", dev)
        part = HestSample(sample.sample_id, sample.root, positions.copy(), sample.metadata, sample.slide_path, None)
        part.adata.uns["spfm"] = dict(sample.adata.uns["spfm"])
        part._slide = sample.slide  # share the opened slide
        stats = PatchStats()
        emb = np.zeros((positions.n_obs, model.embed_dim), np.float32)
        kept = np.zeros(positions.n_obs, bool)
        images, index = [], []

        def flush() -> None:
            emb[index] = _embed_batch(model, torch.from_numpy(np.stack(images)), dev, precision, side, strict,
                                      uint8_hwc=True)
            kept[index] = True
            images.clear()
            index.clear()

        for p in iter_patches(part, patch, stats):
            images.append(p.image)
            index.append(p.index)
            if len(images) == batch_size:
                flush()
        if images:
            flush()
        spfm_uns = dict(sample.adata.uns["spfm"])
    finally:
        sample.close()
    out = positions[kept].copy()
    key = f"X_{weights['backbone']}"
    out.obsm[key] = emb[kept]
    out.uns["spfm"] = {k: v for k, v in spfm_uns.items() if v is not None}
    out.uns["spfm_embed"] = {"key": key, "dropped": np.array(sorted(stats.dropped), dtype=str),
                             "patch": patch.to_dict(), "backbone": weights["backbone"]}
    return out


def embed_samples(root: str | os.PathLike, sample_ids: Sequence[str], out: str | os.PathLike, **embed_kwargs: Any
                  ) -> list[ad.AnnData]:
    """``spfm embed`` on ``sample_ids`` of a HEST root into ``out`` (resumable), then their AnnData, in order."""
    from spfm.models.embed import embed

    embed(root, out, samples=list(sample_ids), **{"progress": False, **embed_kwargs})
    return [ad.read_h5ad(Path(out) / f"{sid}.h5ad") for sid in sample_ids]
