"""Train/validation/test splits by patient (falling back to the sample id), never by spot.

Neighbouring spots of one slide, and slides of one patient, look alike; a split that puts them on both sides would
measure memorisation. So whole patients are assigned, deterministically from a seed.

The rule (:func:`assign_splits`):

1. Group samples by patient; a sample without a patient is its own group. Each group weighs its number of spots
   (the ``n_spots`` column when every sample has one, else its number of samples).
2. Shuffle the sorted group keys with ``numpy.random.default_rng(seed)``.
3. Fill test, then validation: walking the shuffled order, a split takes each group that brings its share of the
   total weight closer to its fraction. A split with a positive fraction that took nothing (every group would
   overshoot) takes the group whose weight is nearest its fraction, when enough groups remain. The rest is train,
   which always keeps at least one group.
4. Tiny corpora: 1 group -> train only; 2 groups -> train and test (train and validation when the test fraction is
   0); 3 or more -> every split with a positive fraction gets at least one group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from spfm.atomic import read_json_object
from spfm.errors import DataError

SPLITS = ("train", "val", "test")


def _groups(samples: pd.DataFrame) -> pd.Series:
    """Sample id -> group key (the patient, or the sample id when the patient is missing)."""
    sid = samples["sample_id"].astype(str)
    if "patient" not in samples:
        return pd.Series(sid.to_numpy(), index=sid.to_numpy())
    patient = samples["patient"]
    missing = patient.isna() | (patient.astype(str).str.strip() == "")
    # a prefix keeps a patient called like some sample id from merging with that sample's own group
    keys = np.where(missing, "sample:" + sid, "patient:" + patient.astype(str))
    return pd.Series(keys, index=sid.to_numpy())


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise DataError(f"split fractions must be (train, val, test), got {tuple(fractions)}", field="fractions")
    f = tuple(float(x) for x in fractions)
    if any(not np.isfinite(x) or x < 0 for x in f) or f[0] <= 0 or abs(sum(f) - 1) > 1e-6:
        raise DataError(f"split fractions must be non-negative, train positive, and sum to 1; got {f}",
                        field="fractions")
    return f  # type: ignore[return-value]


def assign_splits(
    samples: pd.DataFrame,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    explicit: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign each sample to ``"train"``, ``"val"`` or ``"test"`` by patient (see the module docstring for the rule).

    Args:
        samples: one row per sample with ``sample_id``, optionally ``patient`` and ``n_spots``.
        fractions: target (train, val, test) shares of the spots (or samples), summing to 1.
        seed: shuffles which patients land where.
        explicit: a user's own sample id -> split mapping, used instead of the rule after checking that it covers
            every sample, names known splits, and keeps each patient on one side.

    Returns:
        sample id -> split, for every sample, in the order of ``samples``.
    """
    if "sample_id" not in samples:
        raise DataError("the sample table has no sample_id column", field="sample_id")
    groups = _groups(samples)
    if groups.index.duplicated().any():
        raise DataError(f"duplicated sample ids: {sorted(set(groups.index[groups.index.duplicated()]))}",
                        field="sample_id")
    if explicit is not None:
        return _check_explicit(groups, explicit)
    f_train, f_val, f_test = _check_fractions(fractions)

    if "n_spots" in samples and pd.to_numeric(samples["n_spots"], errors="coerce").notna().all():
        weight = pd.Series(pd.to_numeric(samples["n_spots"]).to_numpy(dtype=float), index=groups.index)
    else:
        weight = pd.Series(1.0, index=groups.index)
    group_weight = weight.groupby(groups.to_numpy()).sum()
    keys = sorted(group_weight.index)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    total = float(group_weight.sum()) or 1.0

    assigned: dict[str, str] = {}
    remaining = list(order)
    wanted = [s for s, f in (("test", f_test), ("val", f_val)) if f > 0]
    for pos, split in enumerate(wanted):
        frac = f_test if split == "test" else f_val
        # leave one group for train and, with 3+ groups, one for each split still to be filled
        reserve = len(wanted) - pos if len(order) >= 3 else 1
        share, chosen = 0.0, []
        for key in remaining:
            if len(remaining) - len(chosen) <= reserve:
                break
            w = float(group_weight[key]) / total
            if abs(share + w - frac) < abs(share - frac):
                chosen.append(key)
                share += w
        if not chosen and len(remaining) > reserve:
            # every group overshoots: the one nearest the fraction (the first in order among equals)
            chosen = [min(remaining, key=lambda k: abs(float(group_weight[k]) / total - frac))]
        for key in chosen:
            remaining.remove(key)
            assigned[key] = split
    for key in remaining:
        assigned[key] = "train"
    return {sid: assigned[key] for sid, key in groups.items()}


def _check_explicit(groups: pd.Series, explicit: Mapping[str, str]) -> dict[str, str]:
    unknown_split = {sid: s for sid, s in explicit.items() if s not in SPLITS}
    if unknown_split:
        raise DataError(f"splits must be one of {SPLITS}; got {unknown_split}", field="splits")
    missing = [sid for sid in groups.index if sid not in explicit]
    if missing:
        raise DataError(f"the split mapping has no entry for {len(missing)} sample(s), e.g. {missing[:5]}",
                        field="splits")
    out = {sid: str(explicit[sid]) for sid in groups.index}
    by_group: dict[str, set[str]] = {}
    for sid, key in groups.items():
        by_group.setdefault(key, set()).add(out[sid])
    crossing = {k.split(":", 1)[1]: sorted(v) for k, v in by_group.items() if len(v) > 1}
    if crossing:
        raise DataError(f"a patient's samples must stay in one split; these cross: {crossing}", field="splits")
    return out


def read_split_mapping(path: str | os.PathLike) -> dict[str, str]:
    """A user's sample id -> split mapping from a JSON object or a CSV/TSV with ``sample_id`` and ``split`` columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError("split mapping file not found", path=path)
    if path.suffix.lower() == ".json":
        mapping = read_json_object(path, "split mapping (a JSON object of sample id -> split)")
        return {str(k): str(v) for k, v in mapping.items()}
    table = pd.read_csv(path, sep=None, engine="python", dtype=str)
    for column in ("sample_id", "split"):
        if column not in table:
            raise DataError(f"no {column!r} column (found {list(table.columns)})", path=path, field=column)
    return dict(zip(table["sample_id"], table["split"]))
