"""The gene vocabulary of a corpus: the genes every shard record indexes into.

Three modes: ``"union"`` (every gene any sample measured, sorted), ``"intersection"`` (genes every sample measured,
sorted) or a panel (a list of gene names, kept in the order given). Gene names are read from the ``.h5ad`` files'
``var`` index alone, so building the vocabulary of a large corpus never loads a count matrix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from spfm.errors import DataError

#: The named vocabulary modes; anything else passed as ``mode`` is a panel (a list of gene names).
VOCAB_MODES = ("union", "intersection")


def read_gene_names(path: str | os.PathLike) -> list[str]:
    """The ``var_names`` of an ``.h5ad`` file, read from its ``var`` index without loading ``X``."""
    import h5py
    from anndata.io import read_elem

    path = Path(path)
    if not path.is_file():
        raise DataError("AnnData file not found", path=path)
    try:
        with h5py.File(path, "r") as f:
            var = f["var"]
            # anndata >= 0.8 stores the index as its own array named by the `_index` attribute; reading only that
            # array skips every other var column
            if isinstance(var, h5py.Group) and "_index" in var.attrs:
                index = var[var.attrs["_index"]]
                if isinstance(index, h5py.Dataset) and h5py.check_string_dtype(index.dtype):
                    return index.asstr()[()].tolist()  # ~6x faster than read_elem + per-name decoding
                names = read_elem(index)
            else:
                names = read_elem(var).index
    except (OSError, KeyError) as exc:
        raise DataError(f"cannot read gene names: {exc}", path=path, field="var_names") from exc
    return [n.decode() if isinstance(n, bytes) else str(n) for n in np.asarray(names).ravel()]


def read_gene_panel(path: str | os.PathLike) -> list[str]:
    """A gene panel from a text file: one gene name per line; blank lines and ``#`` comments are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError("gene panel file not found", path=path)
    genes = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    genes = [g for g in genes if g]
    if not genes:
        raise DataError("gene panel file lists no genes", path=path)
    return genes


def build_vocabulary(
    gene_lists: Mapping[str, Sequence[str]],
    mode: str | Sequence[str] = "union",
    *,
    sources: Mapping[str, str | os.PathLike] | None = None,
) -> list[str]:
    """The corpus gene vocabulary.

    Args:
        gene_lists: sample id -> that sample's gene names (its ``var_names``).
        mode: ``"union"`` (sorted), ``"intersection"`` (sorted), or a panel: a list of gene names, kept in order.
        sources: sample id -> its ``st/{id}.h5ad`` file, named in errors.

    Returns:
        The vocabulary, in a deterministic order.

    Raises:
        DataError: no samples; an empty or duplicated panel; an empty intersection; or a sample none of whose genes
            is in the vocabulary (naming that sample's file and ``var_names``).
    """
    sources = sources or {}
    if not gene_lists:
        raise DataError("no samples to build a gene vocabulary from", field="genes")
    if isinstance(mode, str):
        if mode not in VOCAB_MODES:
            raise DataError(f"gene mode must be one of {VOCAB_MODES} or a list of gene names, got {mode!r}",
                            field="genes")
        sets = {sid: set(genes) for sid, genes in gene_lists.items()}
        if mode == "union":
            vocab = sorted(set().union(*sets.values()))
        else:
            vocab = sorted(set.intersection(*sets.values()))
            if not vocab:
                smallest = min(sets, key=lambda s: len(sets[s]))
                raise DataError(
                    f"the {len(sets)} samples share no gene (the intersection is empty; sample {smallest!r} has "
                    f"{len(sets[smallest])} genes); use the union or a panel",
                    path=sources.get(smallest),
                    field="var_names",
                )
    else:
        vocab = [str(g) for g in mode]
        if not vocab:
            raise DataError("the gene panel is empty", field="genes")
        seen: set[str] = set()
        dup = [g for g in vocab if g in seen or seen.add(g)]
        if dup:
            raise DataError(f"the gene panel repeats {len(dup)} gene(s), e.g. {dup[:3]}", field="genes")
    in_vocab = set(vocab)
    for sid, genes in gene_lists.items():
        if not in_vocab.intersection(genes):
            raise DataError(
                f"sample {sid!r} measured none of the {len(vocab)} vocabulary genes (its {len(genes)} genes, "
                f"e.g. {list(genes[:3])}, vs vocabulary {vocab[:3]})",
                path=sources.get(sid),
                field="var_names",
            )
    return vocab
