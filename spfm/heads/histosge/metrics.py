"""The paper's metrics: mean per-gene Pearson (genes with an undefined correlation masked), MSE, MAE."""

from __future__ import annotations

import numpy as np


def gene_pearson(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(G,) Pearson correlation per gene between (N, G) predictions and truth; NaN where either is constant."""
    pred = np.asarray(pred, np.float64)
    true = np.asarray(true, np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and truth {true.shape} differ in shape")
    p = pred - pred.mean(axis=0)
    t = true - true.mean(axis=0)
    den = np.sqrt((p**2).sum(axis=0) * (t**2).sum(axis=0))
    num = (p * t).sum(axis=0)
    out = np.full(pred.shape[1], np.nan)
    ok = den > 1e-12 * max(1.0, float(np.abs(num).max(initial=0)))
    out[ok] = num[ok] / den[ok]
    return out


def scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """``pearson`` (mean over genes, NaN genes masked, as the paper), ``pearson_nan_as_zero`` (a gene predicted as a
    constant counts as 0, so a model cannot gain by predicting the hard genes flat), ``mse``, ``mae``, ``n_genes``,
    ``n_nan_genes``."""
    r = gene_pearson(pred, true)
    diff = np.asarray(pred, np.float64) - np.asarray(true, np.float64)
    finite = np.isfinite(r)
    return {"pearson": float(r[finite].mean()) if finite.any() else float("nan"),
            "pearson_nan_as_zero": float(np.where(finite, r, 0.0).mean()) if r.size else float("nan"),
            "mse": float((diff**2).mean()), "mae": float(np.abs(diff).mean()),
            "n_genes": int(r.size), "n_nan_genes": int((~finite).sum())}
