"""Download a subset of HEST-1k (``MahmoodLab/hest`` on the Hugging Face Hub) as a HEST root spfm reads directly.

HEST-1k is 1,108 samples and ~743 GB; nobody needs all of it to start. The dataset is gated: accept its terms at
https://huggingface.co/datasets/MahmoodLab/hest, then log in (``huggingface-cli login``) or set ``HF_TOKEN``.
Samples are chosen by id, or by the columns of the dataset's metadata table (``HEST_v*.csv`` at the repository
root: organ, species, technology), and only the folders spfm reads are fetched: ``st/`` (counts), ``wsis/`` (the
pyramidal TIFF), ``metadata/`` and optionally ``patches/`` (HEST's 224 px patches). The files land under ``out``
in the repository's own layout, which is the HEST layout, so ``spfm list OUT`` and ``spfm shard OUT ...`` work on
it as is. huggingface_hub resumes interrupted downloads and skips files already complete.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from spfm.errors import DataError

#: The Hub dataset of HEST-1k.
HEST_REPO = "MahmoodLab/hest"
#: The folders of a HEST root spfm reads; ``patches`` is added on request.
HEST_FOLDERS = ("st", "wsis", "metadata")
#: Metadata table columns the filters match, case-insensitively.
_FILTERS = {"organ": "organ", "species": "species", "technology": "st_technology"}


def hest_patterns(ids: Sequence[str], *, patches: bool = False) -> list[str]:
    """``allow_patterns`` for ``snapshot_download``: each sample's files in the folders spfm reads.

    >>> hest_patterns(["TENX96"])
    ['st/TENX96.*', 'wsis/TENX96.*', 'metadata/TENX96.*']
    """
    folders = HEST_FOLDERS + (("patches",) if patches else ())
    return [f"{folder}/{sid}.*" for sid in ids for folder in folders]


def _metadata_table(files: list[str]) -> str | None:
    """The newest ``HEST_v*.csv`` of the repository's root, by version number."""
    tables = [f for f in files if re.fullmatch(r"HEST_v[\d_.]+\.csv", f)]
    return max(tables, key=lambda f: [int(x) for x in re.findall(r"\d+", f)], default=None)


def select_samples(table: pd.DataFrame, *, ids: Sequence[str] | None = None, organ: str | None = None,
                   species: str | None = None, technology: str | None = None, source: str = "metadata") -> list[str]:
    """The sample ids of a HEST metadata table that match every given filter (case-insensitive), in table order."""
    if "id" not in table:
        raise DataError("the HEST metadata table has no 'id' column", path=source, field="id")
    keep = pd.Series(True, index=table.index)
    if ids:
        keep &= table["id"].astype(str).isin(list(ids))
    for name, value in dict(organ=organ, species=species, technology=technology).items():
        if value is None:
            continue
        column = _FILTERS[name]
        if column not in table:
            raise DataError(f"the HEST metadata table has no {column!r} column to filter {name} on", path=source,
                            field=column)
        keep &= table[column].astype(str).str.lower() == value.lower()
    chosen = table.loc[keep, "id"].astype(str).tolist()
    if not chosen:
        asked = {k: v for k, v in dict(ids=ids, organ=organ, species=species, technology=technology).items() if v}
        raise DataError(f"no HEST-1k sample matches {asked}", path=source)
    return chosen


def download_hest(out: str | os.PathLike, ids: Sequence[str] | None = None, *, organ: str | None = None,
                  species: str | None = None, technology: str | None = None, patches: bool = False,
                  repo_id: str = HEST_REPO, revision: str | None = None) -> Path:
    """Download the chosen HEST-1k samples into ``out`` (a HEST root); return it.

    Args:
        out: the HEST root to fill (created if missing; files already there and complete are not fetched again).
        ids: sample ids, e.g. ``["TENX96", "TENX99"]``; with filters, the ids that also match them.
        organ, species, technology: filters on the metadata table (e.g. ``"Bowel"``, ``"Homo sapiens"``,
            ``"Visium"``); at least one of ``ids`` and the filters is required.
        patches: also fetch ``patches/{id}.h5`` (HEST's 224 px patches at 0.5 um/px).
        repo_id, revision: the Hub dataset and its branch, tag or commit.

    Raises:
        DataError: nothing chosen, or an id that the dataset does not have (all such ids named).
        HubAccessError: the dataset is gated and this account has no access, not logged in, or offline.
    """
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download

    from spfm.models.backbones.weights import hub_access

    if not ids and not any((organ, species, technology)):
        raise DataError("choose samples: give ids and/or an organ, species or technology filter", field="ids")
    out = Path(out)
    with hub_access(repo_id, "dataset"):
        files = list_repo_files(repo_id, repo_type="dataset", revision=revision)
        if organ or species or technology:
            name = _metadata_table(files)
            if name is None:
                raise DataError(f"{repo_id} has no HEST_v*.csv metadata table to filter on", field="organ")
            table_path = hf_hub_download(repo_id, name, repo_type="dataset", revision=revision, local_dir=out)
            ids = select_samples(pd.read_csv(table_path), ids=ids, organ=organ, species=species,
                                 technology=technology, source=f"{repo_id}/{name}")
        have = {Path(f).stem for f in files if f.startswith("st/") and f.endswith(".h5ad")}
        missing = [sid for sid in ids if sid not in have]
        if missing:
            raise DataError(f"{len(missing)} sample id(s) not in {repo_id}: {missing[:10]}", field="ids")
        snapshot_download(repo_id, repo_type="dataset", revision=revision, local_dir=out,
                          allow_patterns=hest_patterns(ids, patches=patches))
    return out
