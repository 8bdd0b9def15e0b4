"""The HEST-Benchmark protocol (Jaume et al. 2024, mahmoodlab/HEST ``src/hest/bench``), as the HEST library runs it.

Per split (a set of training samples and a set of test samples):

1. Targets: ``log1p`` of the raw counts of the task's genes (HEST's ``load_adata(normalize=True)`` is
   ``sc.pp.log1p`` only: no total-count normalisation). HEST reads the genes from the task's ``var_50genes.json``;
   pass them as ``genes=``. Without a list, spfm takes the ``n_genes`` genes of largest variance of the ``log1p``
   counts over the training split's spots (population variance; ties broken by gene order), among the genes every
   sample of the split measures; so the test samples never influence the choice.
2. Features: ``StandardScaler`` then ``PCA(n_components=256, random_state=seed)``, both fitted on the training
   split (HEST's ``dimreduce: "PCA"``, ``latent_dim: 256``); HEST then turns the PCA output into a float32
   ``torch.Tensor``, so the regression sees float32 features, as here. With ``pca_dim=None`` the raw features are
   used, unscaled (HEST's ``dimreduce: None``). When the training split has fewer spots or features than 256, HEST's
   ``PCA`` raises; spfm uses ``min(256, n_train_spots, n_features)`` components instead and records the number.
3. ``Ridge(solver="lsqr", alpha=100 / (n_features * n_genes), fit_intercept=False, max_iter=1000,
   random_state=seed)``, with ``n_features`` the width after PCA (HEST computes it from ``X_train.shape[1]`` after
   the reduction).
4. Metric: ``scipy.stats.pearsonr`` per gene on the test spots; a split's score is the mean over genes. A gene
   whose target or prediction is constant on the test spots has no correlation (NaN); HEST lets the NaN propagate
   into the mean, and so does ``nan_policy="propagate"`` (the default); ``"omit"`` averages the defined ones.
5. Across splits: the mean of the split scores and their standard deviation (``np.std``, ddof=0), and per gene
   the list of its correlations with their mean and std (HEST's ``merge_fold_results``).

Splits come from HEST's files (``splits/train_{i}.csv`` and ``splits/test_{i}.csv`` with a ``sample_id`` column),
or automatically: leave one patient out (samples without a patient are their own patient), or leave one sample out.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spfm.errors import DataError

#: HEST-Benchmark settings (bench_config.yaml and the benchmark's argument defaults).
HEST_N_GENES = 50
HEST_PCA_DIM = 256
HEST_SEED = 1
HEST_MAX_ITER = 1000

SplitList = Sequence[tuple[Sequence[str], Sequence[str]]]
SplitSpec = SplitList | Literal["leave_one_patient_out", "leave_one_sample_out"]
Expression = ad.AnnData | pd.DataFrame


# ----------------------------------------------------------------------------------------------------------------
# Splits


def leave_one_patient_out(patients: Mapping[str, str | None]) -> list[tuple[list[str], list[str]]]:
    """One split per patient: its samples are the test set, every other sample trains.

    Args:
        patients: sample id -> patient (None or "" when unknown: that sample is its own patient).

    Returns:
        ``[(train ids, test ids), ...]`` ordered by patient, ids sorted.
    """
    groups: dict[str, list[str]] = {}
    for sid, patient in patients.items():
        missing = patient is None or (isinstance(patient, float) and np.isnan(patient)) or str(patient).strip() == ""
        # a prefix keeps a patient named like some sample id apart from that sample's own group
        groups.setdefault(f"sample:{sid}" if missing else f"patient:{patient}", []).append(str(sid))
    if len(groups) < 2:
        raise DataError(f"leave-one-patient-out needs at least 2 patients, got {len(groups)} "
                        f"({sorted(groups)})", field="patient")
    splits = []
    for key in sorted(groups):
        test = sorted(groups[key])
        train = sorted(sid for other, ids in groups.items() if other != key for sid in ids)
        splits.append((train, test))
    return splits


def leave_one_sample_out(sample_ids: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """One split per sample: it is the test set, every other sample trains (patients may then cross the split)."""
    ids = sorted(str(s) for s in sample_ids)
    if len(ids) < 2:
        raise DataError(f"leave-one-sample-out needs at least 2 samples, got {ids}", field="sample_id")
    return [([s for s in ids if s != test], [test]) for test in ids]


def read_hest_splits(splits_dir: str | os.PathLike) -> list[tuple[list[str], list[str]]]:
    """HEST's split files: ``train_{i}.csv`` and ``test_{i}.csv`` (column ``sample_id``) for i = 0, 1, ..."""
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise DataError("splits directory not found", path=splits_dir)
    indices = sorted(int(m[1]) for p in splits_dir.iterdir() if (m := re.fullmatch(r"train_(\d+)\.csv", p.name)))
    if not indices:
        raise DataError("no train_{i}.csv split files", path=splits_dir)
    if indices != list(range(len(indices))):
        raise DataError(f"split files must be numbered 0..n-1, found train_{indices}", path=splits_dir)
    splits = []
    for i in indices:
        pair = []
        for side in ("train", "test"):
            path = splits_dir / f"{side}_{i}.csv"
            if not path.is_file():
                raise DataError(f"{side}_{i}.csv is missing for train_{i}.csv", path=path)
            table = pd.read_csv(path, dtype=str)
            if "sample_id" not in table:
                raise DataError(f"no 'sample_id' column (found {list(table.columns)})", path=path, field="sample_id")
            ids = [s for s in table["sample_id"].dropna().astype(str)]
            if not ids:
                raise DataError("no samples listed", path=path, field="sample_id")
            pair.append(ids)
        splits.append((pair[0], pair[1]))
    return splits


def _resolve_splits(splits: SplitSpec, sample_ids: Sequence[str],
                    patients: Mapping[str, str | None] | None) -> list[tuple[list[str], list[str]]]:
    if isinstance(splits, str):
        if splits == "leave_one_patient_out":
            if patients is None:
                raise DataError("leave_one_patient_out needs patients= (sample id -> patient)", field="patients")
            unknown = sorted(set(sample_ids) - set(patients))
            if unknown:
                raise DataError(f"no patient for sample(s) {unknown[:10]}", field="patients")
            return leave_one_patient_out({sid: patients[sid] for sid in sample_ids})
        if splits == "leave_one_sample_out":
            return leave_one_sample_out(sample_ids)
        raise DataError(f"unknown split rule {splits!r}; use 'leave_one_patient_out', 'leave_one_sample_out' or a "
                        "list of (train ids, test ids)", field="splits")
    out = []
    for i, (train, test) in enumerate(splits):
        train, test = [str(s) for s in train], [str(s) for s in test]
        if not train or not test:
            raise DataError(f"split {i} has an empty train or test side", field=f"splits[{i}]")
        both = sorted(set(train) & set(test))
        if both:
            raise DataError(f"split {i} puts sample(s) {both} on both sides", field=f"splits[{i}]")
        out.append((train, test))
    if not out:
        raise DataError("no splits given", field="splits")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Targets


def _counts(expression: Expression, sid: str) -> tuple[sp.csr_matrix | np.ndarray, pd.Index]:
    """(N, G) raw counts and the G gene names of one sample's expression."""
    if isinstance(expression, ad.AnnData):
        X = expression.layers["counts"] if "counts" in expression.layers else expression.X
        genes = pd.Index(expression.var_names.astype(str))
    elif isinstance(expression, pd.DataFrame):
        X, genes = expression.to_numpy(), pd.Index(expression.columns.astype(str))
    else:
        raise DataError(f"expression must be an AnnData or a spots x genes DataFrame, got "
                        f"{type(expression).__name__}", field=f"expression[{sid!r}]")
    if genes.has_duplicates:
        dup = sorted(set(genes[genes.duplicated()]))
        raise DataError(f"duplicated gene names {dup[:5]}", field=f"expression[{sid!r}].var_names")
    X = X.tocsr() if sp.issparse(X) else np.asarray(X)
    return X, genes


def _log1p_columns(X: sp.csr_matrix | np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(N, len(columns)) float64 ``log1p`` of the chosen columns, dense."""
    sub = X[:, columns]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    return np.log1p(sub.astype(np.float64))


def _column_variance(blocks: Sequence[tuple[sp.csr_matrix | np.ndarray, np.ndarray]]) -> np.ndarray:
    """Population variance of ``log1p`` counts per gene over the stacked rows of several samples, without
    densifying: log1p(0) = 0 keeps sparse matrices sparse; two passes (mean, then squared deviations) for accuracy.

    Args:
        blocks: (counts (N_i, G_i), (G,) column of each target gene in that sample).
    """
    n = sum(X.shape[0] for X, _ in blocks)
    if n == 0:
        raise DataError("the training split has no spots", field="expression")
    total = 0.0
    for X, cols in blocks:
        sub = sp.csc_matrix(X[:, cols]) if sp.issparse(X) else np.asarray(X[:, cols], dtype=np.float64)
        total = total + (np.asarray(sub.log1p().sum(axis=0)).ravel() if sp.issparse(sub)
                         else np.log1p(sub).sum(axis=0))
    mean = total / n
    ss = np.zeros_like(mean)
    for X, cols in blocks:
        sub = X[:, cols]
        if sp.issparse(sub):
            sub = sp.csc_matrix(sub, dtype=np.float64).log1p()
            # nonzeros: (v - m)^2; the zeros of each column contribute m^2 each
            col_of = np.repeat(np.arange(sub.shape[1]), np.diff(sub.indptr))
            ss += np.bincount(col_of, weights=(sub.data - mean[col_of]) ** 2, minlength=sub.shape[1])
            ss += (sub.shape[0] - np.diff(sub.indptr)) * mean**2
        else:
            ss += ((np.log1p(np.asarray(sub, dtype=np.float64)) - mean) ** 2).sum(axis=0)
    return ss / n


def top_variance_genes(expression: Mapping[str, Expression], train_ids: Sequence[str], candidates: Sequence[str],
                       n_genes: int) -> list[str]:
    """The ``n_genes`` candidate genes of largest variance of ``log1p`` counts over the training samples' spots.

    Ties keep the order of ``candidates``. Fewer candidates than ``n_genes`` gives all of them.
    """
    blocks = []
    for sid in train_ids:
        X, genes = _counts(expression[sid], sid)
        blocks.append((X, genes.get_indexer(candidates)))
    var = _column_variance(blocks)
    order = np.argsort(-var, kind="stable")[:n_genes]
    return [candidates[i] for i in order]


# ----------------------------------------------------------------------------------------------------------------
# The protocol


def _num(x: float) -> float | None:
    """A JSON-safe float: NaN becomes None."""
    return None if x is None or not np.isfinite(x) else float(x)


def _stack(features: Mapping[str, np.ndarray], expression: Mapping[str, Expression], ids: Sequence[str],
           genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) and log1p targets (N, G) of the samples ``ids``, rows concatenated in that order."""
    xs, ys = [], []
    for sid in ids:
        X, names = _counts(expression[sid], sid)
        cols = names.get_indexer(genes)
        if (cols < 0).any():
            missing = [g for g, c in zip(genes, cols) if c < 0]
            raise DataError(f"sample {sid!r} lacks {len(missing)} target gene(s), e.g. {missing[:5]}",
                            field=f"expression[{sid!r}].var_names")
        xs.append(np.asarray(features[sid]))
        ys.append(_log1p_columns(X, cols))
    return np.concatenate(xs, axis=0), np.concatenate(ys, axis=0)


def _check_inputs(features: Mapping[str, np.ndarray], expression: Mapping[str, Expression],
                  used: Sequence[str]) -> int:
    """Every used sample has features and expression with the same number of spots; returns D."""
    dims = set()
    for sid in used:
        if sid not in features:
            raise DataError(f"no embedding for sample {sid!r}", field=f"features[{sid!r}]")
        if sid not in expression:
            raise DataError(f"no expression for sample {sid!r}", field=f"expression[{sid!r}]")
        f = np.asarray(features[sid])
        if f.ndim != 2:
            raise DataError(f"embeddings must be (N, D), got shape {f.shape}", field=f"features[{sid!r}]")
        if not np.all(np.isfinite(f)):
            raise DataError("NaN or infinite embedding values", field=f"features[{sid!r}]")
        n_expr = expression[sid].shape[0]
        if f.shape[0] != n_expr:
            raise DataError(f"{f.shape[0]} embedding rows but {n_expr} expression rows; align them by barcode",
                            field=f"features[{sid!r}]")
        dims.add(f.shape[1])
    if len(dims) != 1:
        raise DataError(f"embeddings of different widths {sorted(dims)}", field="features")
    return dims.pop()


def run_split(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, *,
              pca_dim: int | None = HEST_PCA_DIM, seed: int = HEST_SEED) -> dict[str, Any]:
    """One HEST split: scaler + PCA on train, Ridge, per-gene test Pearson.

    Args:
        X_train, X_test: features (N_train, D), (N_test, D).
        y_train, y_test: log1p targets (N_train, G), (N_test, G).
        pca_dim: PCA components (capped at min(N_train, D)); None: raw features, no scaling.
        seed: PCA and Ridge ``random_state``.

    Returns:
        ``pearson`` (G,) array (NaN for undefined), ``pred`` (N_test, G), ``pca_dim`` used (None without PCA),
        ``alpha``.
    """
    from scipy.stats import ConstantInputWarning, pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    used_dim = None
    if pca_dim is not None:
        used_dim = int(min(pca_dim, X_train.shape[0], X_train.shape[1]))
        pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=used_dim, random_state=seed))])
        # HEST wraps the PCA output in torch.Tensor(...): the regression sees float32 features
        X_train = pipe.fit_transform(X_train).astype(np.float32)
        X_test = pipe.transform(X_test).astype(np.float32)
    alpha = 100 / (X_train.shape[1] * y_train.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False, max_iter=HEST_MAX_ITER)
    reg.fit(X_train, y_train)
    pred = np.asarray(reg.predict(X_test)).reshape(len(X_test), -1)
    pearson = np.empty(y_test.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)  # a constant gene is reported as NaN, not warned
        for g in range(y_test.shape[1]):
            pearson[g] = pearsonr(y_test[:, g], pred[:, g])[0] if len(y_test) > 1 else np.nan
    return {"pearson": pearson, "pred": pred, "pca_dim": used_dim, "alpha": alpha}


def hest_benchmark(
    features: Mapping[str, np.ndarray],
    expression: Mapping[str, Expression],
    splits: SplitSpec = "leave_one_patient_out",
    *,
    patients: Mapping[str, str | None] | None = None,
    genes: Sequence[str] | None = None,
    n_genes: int = HEST_N_GENES,
    pca_dim: int | None = HEST_PCA_DIM,
    seed: int = HEST_SEED,
    nan_policy: Literal["propagate", "omit"] = "propagate",
) -> dict[str, Any]:
    """Run the HEST-Benchmark protocol (see the module docstring) on embeddings and expression.

    Args:
        features: sample id -> (N_s, D) embeddings, rows aligned with that sample's expression rows.
        expression: sample id -> AnnData (raw counts in ``layers["counts"]`` or ``X``; genes in ``var_names``) or a
            spots x genes DataFrame of raw counts.
        splits: ``[(train ids, test ids), ...]``, ``"leave_one_patient_out"`` (needs ``patients``) or
            ``"leave_one_sample_out"``; the automatic rules use every sample in ``features``.
        patients: sample id -> patient, for leave-one-patient-out.
        genes: the target genes for every split (HEST's ``var_50genes.json``); default: the top ``n_genes`` by
            variance of log1p counts on each training split.
        n_genes: how many genes the automatic choice takes.
        pca_dim: PCA components (HEST: 256); None for raw features (HEST's ``dimreduce: None``).
        seed: PCA and Ridge random state (HEST's default seed is 1).
        nan_policy: ``"propagate"`` (HEST: an undefined gene correlation makes the split mean NaN) or ``"omit"``.

    Returns:
        A JSON-able dict: ``pearson_mean`` and ``pearson_std`` over splits, ``mean_per_split``, ``pearson_corrs``
        (per gene: name, its correlation in each split that scored it, mean, std; sorted by mean, as HEST),
        ``splits`` (per split: train and test ids, spot counts, genes, per-gene Pearson, PCA dim and alpha used)
        and ``protocol`` (the settings). Undefined values are None.
    """
    if nan_policy not in ("propagate", "omit"):
        raise DataError(f"nan_policy must be 'propagate' or 'omit', got {nan_policy!r}", field="nan_policy")
    if genes is None and n_genes < 1:
        raise DataError(f"n_genes must be at least 1, got {n_genes}", field="n_genes")
    if pca_dim is not None and pca_dim < 1:
        raise DataError(f"pca_dim must be at least 1 or None, got {pca_dim}", field="pca_dim")
    split_list = _resolve_splits(splits, sorted(features), patients)
    used = sorted({sid for train, test in split_list for sid in (*train, *test)})
    n_features = _check_inputs(features, expression, used)
    fixed_genes = None if genes is None else [str(g) for g in genes]
    if fixed_genes is not None and (not fixed_genes or len(set(fixed_genes)) != len(fixed_genes)):
        raise DataError("genes must be a non-empty list of distinct gene names", field="genes")

    mean = np.nanmean if nan_policy == "omit" else np.mean
    per_split, split_means = [], []
    for i, (train, test) in enumerate(split_list):
        if fixed_genes is not None:
            target_genes = fixed_genes
        else:
            common = _counts(expression[train[0]], train[0])[1]
            for sid in (*train[1:], *test):
                common = common.intersection(_counts(expression[sid], sid)[1], sort=False)
            if len(common) == 0:
                raise DataError(f"the samples of split {i} share no gene name", field="var_names")
            target_genes = top_variance_genes(expression, train, list(common), n_genes)
        X_train, y_train = _stack(features, expression, train, target_genes)
        X_test, y_test = _stack(features, expression, test, target_genes)
        result = run_split(X_train, y_train, X_test, y_test, pca_dim=pca_dim, seed=seed)
        pearson = result["pearson"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN: NaN, reported as None
            split_mean = float(mean(pearson))
        per_split.append({
            "index": i, "train": list(train), "test": list(test), "n_train": int(len(X_train)),
            "n_test": int(len(X_test)), "n_features": int(n_features), "pca_dim": result["pca_dim"],
            "alpha": float(result["alpha"]), "genes": list(target_genes),
            "pearson": [_num(r) for r in pearson], "n_undefined": int(np.isnan(pearson).sum()),
            "pearson_mean": _num(split_mean),
        })
        split_means.append(split_mean)

    by_gene: dict[str, list[float]] = {}
    for split in per_split:
        for g, r in zip(split["genes"], split["pearson"]):
            by_gene.setdefault(g, []).append(np.nan if r is None else r)
    std = np.nanstd if nan_policy == "omit" else np.std
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN reductions: NaN, reported as None
        corrs = [{"name": g, "pearson_corrs": [_num(r) for r in rs], "mean": _num(mean(rs)), "std": _num(std(rs))}
                 for g, rs in by_gene.items()]
        overall, spread = float(mean(split_means)), float(std(split_means))
    corrs.sort(key=lambda c: -np.inf if c["mean"] is None else c["mean"], reverse=True)
    return {
        "pearson_mean": _num(overall),
        "pearson_std": _num(spread),
        "mean_per_split": [_num(m) for m in split_means],
        "pearson_corrs": corrs,
        "splits": per_split,
        "protocol": {
            "name": "hest-benchmark",
            "targets": "log1p(counts), no total-count normalisation",
            "genes": "given" if fixed_genes is not None else f"top {n_genes} by log1p variance on each training split",
            "scaler": pca_dim is not None, "pca_dim": pca_dim,
            "ridge": {"solver": "lsqr", "fit_intercept": False, "alpha": "100 / (n_features_after_pca * n_genes)",
                      "max_iter": HEST_MAX_ITER},
            "seed": seed, "nan_policy": nan_policy, "n_splits": len(per_split),
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# On a HEST root with embeddings written by ``spfm embed``


def read_embeddings(embeddings_dir: str | os.PathLike, sample_id: str) -> tuple[np.ndarray, pd.Index, str]:
    """One sample's embeddings from ``spfm embed`` output: ((N, D) float32, the N barcodes, the obsm key)."""
    from spfm.models.embed import EMBED_UNS_KEY

    path = Path(embeddings_dir) / f"{sample_id}.h5ad"
    if not path.is_file():
        raise DataError(f"no embedding for sample {sample_id!r}; run spfm embed on the root first", path=path)
    adata = ad.read_h5ad(path)
    info = adata.uns.get(EMBED_UNS_KEY)
    if not isinstance(info, Mapping) or info.get("key") not in adata.obsm:
        raise DataError(f"not an spfm embed output: uns[{EMBED_UNS_KEY!r}]['key'] must name an obsm entry",
                        path=path, field=f"uns[{EMBED_UNS_KEY!r}]")
    key = str(info["key"])
    return np.asarray(adata.obsm[key], dtype=np.float32), pd.Index(adata.obs_names.astype(str)), key


def load_genes(genes: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    """A gene list, or HEST's ``var_50genes.json`` (``{"genes": [...]}``) or a JSON list from a path."""
    if genes is None:
        return None
    if isinstance(genes, (str, os.PathLike)):
        path = Path(genes)
        if not path.is_file():
            raise DataError("gene list file not found", path=path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc}", path=path) from exc
        data = data.get("genes") if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(g, str) for g in data):
            raise DataError('expected {"genes": [names]} or a list of names', path=path, field="genes")
        return data
    return [str(g) for g in genes]


def bench_hest(
    root: str | os.PathLike,
    embeddings_dir: str | os.PathLike,
    *,
    splits_dir: str | os.PathLike | None = None,
    splits: Literal["auto", "leave_one_patient_out", "leave_one_sample_out"] | SplitList = "auto",
    samples: Sequence[str] | None = None,
    genes: Sequence[str] | str | os.PathLike | None = "auto",
    n_genes: int = HEST_N_GENES,
    pca_dim: int | None = HEST_PCA_DIM,
    seed: int = HEST_SEED,
    nan_policy: Literal["propagate", "omit"] = "propagate",
) -> dict[str, Any]:
    """The HEST-Benchmark protocol on a HEST-layout root and its ``spfm embed`` output.

    Expression comes from the root (``st/{id}.h5ad``), aligned by barcode to the embedded spots (spots the patcher
    dropped are left out, as HEST's patches are).

    Args:
        root: the HEST root.
        embeddings_dir: where ``spfm embed`` wrote ``{sample_id}.h5ad`` for the root's samples.
        splits_dir: HEST split files (``train_{i}.csv`` / ``test_{i}.csv``, column ``sample_id``).
        splits: without ``splits_dir``: ``"auto"`` reads ``root/splits`` when it exists and otherwise leaves one
            patient out; ``"leave_one_patient_out"`` or ``"leave_one_sample_out"`` apply that rule; a list of
            ``(train ids, test ids)`` gives the splits explicitly (e.g. one fold of a rule).
        samples: restrict the automatic rules to these samples (default: every sample of the root).
        genes: target genes, or a path to HEST's ``var_50genes.json``; ``"auto"``: ``root/var_50genes.json`` when it
            exists, else the top ``n_genes`` by variance on each training split, which None always uses.
        n_genes, pca_dim, seed, nan_policy: as :func:`hest_benchmark`.

    Returns:
        :func:`hest_benchmark`'s result plus ``root``, ``embeddings_dir``, ``embedding_key`` and ``split_source``.
    """
    from spfm.data.hest import list_samples

    root = Path(root)
    table = list_samples(root)
    known = set(table["sample_id"])
    if splits_dir is None and splits == "auto":
        splits_dir = root / "splits" if (root / "splits").is_dir() else None
        splits = "leave_one_patient_out"
    if isinstance(genes, str) and genes == "auto":
        genes = root / "var_50genes.json" if (root / "var_50genes.json").is_file() else None
    gene_list = load_genes(genes)

    if splits_dir is not None or not isinstance(splits, str):
        split_list: SplitSpec = read_hest_splits(splits_dir) if splits_dir is not None else [
            ([str(s) for s in train], [str(s) for s in test]) for train, test in splits]
        ids = sorted({sid for train, test in split_list for sid in (*train, *test)})
        source = str(splits_dir) if splits_dir is not None else "given"
    else:
        ids = sorted(known) if samples is None else [str(s) for s in samples]
        split_list, source = splits, splits
    unknown = sorted(set(ids) - known)
    if unknown:
        raise DataError(f"split sample(s) {unknown[:10]} are not in the root", path=root / "st", field="sample_id")

    features, expression, keys = {}, {}, set()
    for sid in ids:
        emb, barcodes, key = read_embeddings(embeddings_dir, sid)
        keys.add(key)
        st_path = root / "st" / f"{sid}.h5ad"
        adata = ad.read_h5ad(st_path)
        rows = adata.obs_names.get_indexer(barcodes)
        if (rows < 0).any():
            missing = list(barcodes[rows < 0][:3])
            raise DataError(f"embedded barcodes {missing} are not spots of the sample; were the embeddings made from "
                            "another root?", path=st_path, field="obs_names")
        features[sid], expression[sid] = emb, adata[rows].copy()  # a copy: later slicing stays cheap
    if len(keys) > 1:
        raise DataError(f"embeddings of different backbones {sorted(keys)} in one directory", path=embeddings_dir)
    patients = dict(zip(table["sample_id"], table["patient"]))
    result = hest_benchmark(features, expression, split_list, patients=patients, genes=gene_list, n_genes=n_genes,
                            pca_dim=pca_dim, seed=seed, nan_policy=nan_policy)
    result.update(root=str(root), embeddings_dir=str(embeddings_dir), embedding_key=keys.pop(), split_source=source)
    return result
