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


# --- spatialglue


def _spot_size(n: int) -> float:
    return float(np.clip(20000.0 / max(n, 1), 0.5, 60.0))


def plot_spatialglue_domains(adata, path: str | os.PathLike, *, key: str = "domain",
                             truth_key: str | None = None) -> Path:
    """Domains on the tissue (``obsm["spatial"]``), beside the ground truth when ``truth_key`` names an obs column.

    Args:
        adata: the integrated AnnData (``obs[key]``, ``obsm["spatial"]``).
        path: PNG to write.
        key: obs column with the domains.
        truth_key: obs column with reference labels to show alongside, if any.
    """
    plt = _pyplot()
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    panels = [(key, "SpatialGlue domains")] + ([(truth_key, "ground truth")] if truth_key else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (col, title) in zip(axes[0], panels):
        codes = np.unique(adata.obs[col].astype(str), return_inverse=True)[1]
        ax.scatter(xy[:, 0], xy[:, 1], c=codes, cmap="tab20", s=_spot_size(len(xy)), linewidths=0)
        ax.set_title(f"{title} ({codes.max() + 1})", fontsize=9)
        ax.set_aspect("equal")
        ax.invert_yaxis()  # image convention: y grows downwards
        ax.axis("off")
    return _save(fig, path)


def plot_spatialglue_weights(adata, path: str | os.PathLike, *, key: str = "domain") -> Path:
    """Modality weights per domain: box plots of the between-modality weights ``obsm["spatialglue_beta"]``.

    Args:
        adata: the integrated AnnData (``obsm["spatialglue_beta"]``, ``obs[key]``, ``uns["spatialglue"]``).
        path: PNG to write.
        key: obs column with the domains.
    """
    plt = _pyplot()
    beta = np.asarray(adata.obsm["spatialglue_beta"], dtype=float)
    names = list(adata.uns.get("spatialglue", {}).get("modalities", [f"modality {i + 1}" for i in
                                                                      range(beta.shape[1])]))
    domains = adata.obs[key].astype(str).to_numpy()
    levels = sorted(np.unique(domains), key=lambda s: (len(s), s))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(levels) * beta.shape[1]), 3.2))
    width = 0.8 / beta.shape[1]
    for m, name in enumerate(names):
        data = [beta[domains == d, m] for d in levels]
        pos = np.arange(len(levels)) + (m - (beta.shape[1] - 1) / 2) * width
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
        for box in bp["boxes"]:
            box.set_facecolor(plt.get_cmap("Set2")(m))
        ax.plot([], [], color=plt.get_cmap("Set2")(m), lw=6, label=name)
    ax.set_xticks(np.arange(len(levels)), levels)
    ax.set_xlabel(key)
    ax.set_ylabel("modality weight (beta)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


# --- CellScape


def _categorical_scatter(ax, xy: np.ndarray, labels: np.ndarray, title: str, *, size: float | None = None) -> None:
    plt = _pyplot()
    levels = sorted(np.unique(labels), key=lambda s: (len(s), s))
    cmap = plt.get_cmap("tab20" if len(levels) > 10 else "tab10")
    s = size if size is not None else max(0.5, min(12.0, 20000.0 / max(len(xy), 1)))
    for i, lev in enumerate(levels):
        m = labels == lev
        ax.scatter(xy[m, 0], xy[m, 1], s=s, color=cmap(i % cmap.N), label=lev, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    if len(levels) <= 20:
        ax.legend(fontsize=6, markerscale=max(1.0, 8.0 / s), frameon=False, loc="center left",
                  bbox_to_anchor=(1.0, 0.5))


def plot_cellscape_domains(adata, path: str | os.PathLike, *, key: str = "domain",
                           annotation: str | None = None) -> Path:
    """CellScape domains on the tissue (``obsm["spatial"]``), beside the annotation when there is one.

    Args:
        adata: annotated by :meth:`spfm.heads.CellScape.annotate` (``obs[key]``).
        path: PNG to write.
        key: obs column with the predicted domains.
        annotation: obs column with reference labels; default the first of ``region``, ``layer``,
            ``domain_true``, ``annotation``, ``ground_truth`` present (none: the domains alone).
    """
    plt = _pyplot()
    if annotation is None:
        annotation = next((c for c in ("region", "layer", "domain_true", "annotation", "ground_truth")
                           if c in adata.obs), None)
    xy = np.asarray(adata.obsm["spatial"], dtype=float) * np.array([1.0, -1.0])  # image y points down
    cols = [annotation, key] if annotation else [key]
    labels = {c: adata.obs[c].astype(str).to_numpy() for c in cols}
    if annotation:
        labels[key] = _match_labels(labels[annotation], labels[key])
    fig, axes = plt.subplots(1, len(cols), figsize=(5.2 * len(cols), 4.2), squeeze=False)
    for ax, col in zip(axes[0], cols):
        title = f"annotation ({col})" if col == annotation else f"CellScape {col}"
        if col == key and annotation:
            from spfm.eval.metrics import clustering_scores

            s = clustering_scores(adata.obs[annotation].astype(str).to_numpy(), adata.obs[key].astype(str).to_numpy())
            title += f"  NMI {s['nmi']:.3f}  ARI {s['ari']:.3f}"
        _categorical_scatter(ax, xy, labels[col], title)
    fig.tight_layout()
    return _save(fig, path)


def _match_labels(reference: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Rename predicted clusters after the reference label they overlap most (Hungarian on the contingency
    table), so matching domains get matching colours; unmatched clusters keep their name with a ``*``."""
    from scipy.optimize import linear_sum_assignment

    ref_levels, ref_idx = np.unique(reference, return_inverse=True)
    pred_levels, pred_idx = np.unique(predicted, return_inverse=True)
    table = np.zeros((len(pred_levels), len(ref_levels)))
    np.add.at(table, (pred_idx, ref_idx), 1)
    rows, cols = linear_sum_assignment(-table)
    names = np.array([f"{p}*" for p in pred_levels], dtype=object)
    names[rows] = ref_levels[cols]
    return names[pred_idx].astype(str)


def plot_cellscape_umap(adata, path: str | os.PathLike, *, color: str | None = None, seed: int = 0) -> Path:
    """UMAP of each CellScape embedding (``obsm["X_cellscape_spatial"]``, ``obsm["X_cellscape_intrinsic"]``).

    Args:
        adata: annotated AnnData.
        path: PNG to write.
        color: obs column to colour by (default ``domain`` for the spatial embedding and ``cell_type_cluster`` for
            the intrinsic one).
        seed: UMAP seed.
    """
    import umap

    plt = _pyplot()
    panels = [(k, color or default) for k, default in (("X_cellscape_spatial", "domain"),
                                                       ("X_cellscape_intrinsic", "cell_type_cluster"))
              if k in adata.obsm]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (k, col) in zip(axes[0], panels):
        X = np.asarray(adata.obsm[k], dtype=np.float32)
        xy = umap.UMAP(n_neighbors=15, min_dist=0.3, random_state=seed, n_jobs=1).fit_transform(X)
        labels = adata.obs[col].astype(str).to_numpy() if col in adata.obs else np.zeros(len(X), dtype=str)
        _categorical_scatter(ax, xy, labels, f"UMAP of {k}, coloured by {col}")
    fig.tight_layout()
    return _save(fig, path)


# --- histosge


def plot_expression_maps(adata, genes: Sequence[str], path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                         sample_id: str | None = None, thumbnail_px: int = 512, spot_size: float = 12.0) -> Path:
    """Measured vs predicted maps of chosen genes on the slide thumbnail (HisToSGE's output).

    Args:
        adata: :meth:`spfm.heads.HisToSGE.predict`'s output: ``layers["predicted"]``, optionally
            ``layers["measured"]`` (a second column), ``obsm["spatial"]`` full-resolution pixel (x, y).
        genes: genes to show, one row each.
        path: PNG to write.
        root, sample_id: the HEST sample whose slide is drawn underneath; default ``uns["spfm"]["slide_path"]``,
            else no image.
    """
    from spfm.errors import DataError

    plt = _pyplot()
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise DataError(f"genes not in the prediction: {missing[:5]}", field="genes")
    if "predicted" not in adata.layers:
        raise DataError("no predictions", field='layers["predicted"]')
    slide = None
    if root is not None and sample_id is not None:
        from spfm.data.hest import read_sample

        slide = read_sample(root, sample_id, validate=False).slide
    elif (adata.uns.get("spfm") or {}).get("slide_path"):
        from spfm.data.slide import open_slide

        slide = open_slide(adata.uns["spfm"]["slide_path"])
    thumb, scale = None, 1.0
    if slide is not None:
        thumb = slide.thumbnail(thumbnail_px)
        scale = thumb.shape[1] / slide.dimensions[0]
        slide.close()
    xy = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2] * scale
    layers = ["measured", "predicted"] if "measured" in adata.layers else ["predicted"]
    fig, axes = plt.subplots(len(genes), len(layers), figsize=(3.2 * len(layers), 3.0 * len(genes)), squeeze=False)
    for row, gene in zip(axes, genes):
        j = adata.var_names.get_loc(gene)
        values = {name: np.asarray(adata.layers[name][:, j], dtype=float).ravel() for name in layers}
        lo = min(np.nanmin(v) for v in values.values())
        hi = max(np.nanmax(v) for v in values.values())
        for ax, name in zip(row, layers):
            if thumb is not None:
                ax.imshow(thumb)
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=values[name], s=spot_size, cmap="magma", vmin=lo, vmax=hi,
                            linewidths=0, alpha=0.85)
            if thumb is None:
                ax.invert_yaxis()
                ax.set_aspect("equal")
            ax.set_title(f"{gene}: {name}", fontsize=8)
            ax.axis("off")
        fig.colorbar(sc, ax=list(row), shrink=0.7, label="log1p expression")
    return _save(fig, path)


# --- soScope


def _feature_values(adata, feature: str) -> np.ndarray:
    import scipy.sparse as sp

    from spfm.errors import DataError

    if feature not in adata.var_names:
        raise DataError(f"feature {feature!r} is not in var_names", field="features")
    col = adata[:, feature].X
    return np.asarray(col.toarray() if sp.issparse(col) else col, dtype=np.float64).ravel()


def plot_soscope_enhanced(spots, enhanced, features: Sequence[str], path: str | os.PathLike, *,
                          truth=None) -> Path:
    """One row per feature: the spot-level map, the soScope-enhanced subspot map (and the truth, if given).

    Args:
        spots: the spot-level AnnData (or a list, one per modality) that was enhanced (``obsm["spatial"]``).
        enhanced: :meth:`spfm.heads.soscope.SoScope.enhance` output (subspots, ``obsm["spatial"]``).
        features: var names to show (for multi-omics, the names in ``enhanced.var_names``).
        path: PNG to write.
        truth: optional high-resolution AnnData aligned with ``enhanced`` (a merge simulation's truth).
    """
    plt = _pyplot()
    spot_list = spots if isinstance(spots, (list, tuple)) else [spots]
    cols = 3 if truth is not None else 2
    fig, axes = plt.subplots(len(features), cols, figsize=(3.2 * cols, 3.0 * len(features)), squeeze=False)
    K = max(1, enhanced.n_obs // spot_list[0].n_obs)
    for row, feat in zip(axes, features):
        src = next((a for a in spot_list if feat in a.var_names), None)
        if src is None:  # a multi-omics name prefixed "modality:feature"
            bare = feat.split(":", 1)[-1]
            src = next((a for a in spot_list if bare in a.var_names), spot_list[0])
            spot_v = _feature_values(src, bare)
        else:
            spot_v = _feature_values(src, feat)
        panels = [("spot level", src.obsm["spatial"], spot_v, _spot_size(src.n_obs) * 2),
                  (f"soScope (K={K})", enhanced.obsm["spatial"], _feature_values(enhanced, feat),
                   _spot_size(enhanced.n_obs))]
        if truth is not None:
            panels.append(("truth", truth.obsm["spatial"], _feature_values(truth, feat), _spot_size(truth.n_obs)))
        for ax, (name, xy, v, size) in zip(row, panels):
            xy = np.asarray(xy)
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=size, marker="s", cmap="viridis", linewidths=0)
            ax.invert_yaxis()
            ax.set_aspect("equal")
            ax.set_title(f"{feat}: {name}", fontsize=8)
            ax.axis("off")
            fig.colorbar(sc, ax=ax, shrink=0.7)
    return _save(fig, path)
