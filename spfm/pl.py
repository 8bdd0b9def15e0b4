"""Plots. Every function writes a PNG (atomically) and returns its path; matplotlib runs headless (Agg)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from spfm.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    _pyplot().close(fig)
    return path


def plot_patches(root: str | os.PathLike, examples: Mapping[str, Sequence], path: str | os.PathLike,
                 thumbnail_px: int = 512) -> Path:
    """One row per sample: the slide thumbnail with its spots (examples ringed) and the example patches.

    Args:
        root: HEST root the samples come from.
        examples: sample id -> patches (:class:`spfm.data.patches.Patch`) to show.
        path: PNG to write.
    """
    from spfm.data.hest import read_sample

    plt = _pyplot()
    n_cols = 1 + max((len(v) for v in examples.values()), default=0)
    fig, axes = plt.subplots(len(examples), n_cols, figsize=(2.2 * n_cols, 2.3 * len(examples)), squeeze=False)
    for row, (sid, patches) in zip(axes, examples.items()):
        sample = read_sample(root, sid)
        thumb = sample.slide.thumbnail(thumbnail_px)
        scale = thumb.shape[1] / sample.slide.dimensions[0]
        xy = np.asarray(sample.adata.obsm["spatial"], dtype=float) * scale
        info = sample.adata.uns["spfm"]
        row[0].imshow(thumb)
        row[0].scatter(xy[:, 0], xy[:, 1], s=2, c="k", alpha=0.4, linewidths=0)
        shown = [p.index for p in patches]
        row[0].scatter(xy[shown, 0], xy[shown, 1], s=30, facecolors="none", edgecolors="cyan", linewidths=1)
        row[0].set_title(f"{sid} ({info['organ']}, {info['technology']})", fontsize=8)
        for ax, patch in zip(row[1:], patches):
            ax.imshow(patch.image)
            ax.set_title(f"{patch.barcode}\ntissue {patch.tissue_fraction:.0%}", fontsize=7)
        for ax in row:
            ax.axis("off")
        sample.close()
    fig.suptitle("Slides with spots (ringed: shown patches) and spot-centred patches", fontsize=10)
    return _save(fig, path)
