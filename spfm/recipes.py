"""One door for every recipe in ``recipes/``: ``spfm run RECIPE.yaml [--set key.path=value ...]``.

A recipe says what to run and with what; its kind is read from its keys:

- ``train``: an ``objectives`` list; runs :func:`spfm.train.train` (also ``spfm train``).
- ``histosge``: ``head`` is a mapping, beside ``data``; runs :func:`spfm.heads.histosge.recipe.run_recipe` (also
  ``spfm predict-expression``).
- ``soscope``, ``spatialglue``, ``cellscape``: ``head: SoScope`` / ``SpatialGlue`` / ``CellScape``; runs that head's
  ``recipe.run_recipe``.

``--set`` overrides apply to any kind before it runs (values parsed as YAML: ``3``, ``1e-4``, ``true``,
``[a, b]``), so a recipe can be shrunk or pointed at other data without editing it.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from spfm.errors import DataError

#: The recipe kinds and the module whose ``run_recipe(tree, ...)`` runs each head kind.
HEAD_KINDS = {"soscope": "spfm.heads.soscope.recipe", "spatialglue": "spfm.heads.spatialglue.recipe",
              "cellscape": "spfm.heads.cellscape.recipe"}
KINDS = ("train", "histosge", *HEAD_KINDS)


def read_recipe(source: str | os.PathLike | Mapping[str, Any],
                overrides: Iterable[str] = ()) -> tuple[dict[str, Any], Path | None]:
    """The recipe as a mapping with ``overrides`` applied, and the file it came from (None for a mapping)."""
    from spfm.train.recipe import _yaml, apply_overrides

    if isinstance(source, Mapping):
        tree, where = copy.deepcopy(dict(source)), None
    else:
        where = Path(source)
        if not where.is_file():
            raise DataError("recipe not found", path=where)
        try:
            tree = _yaml(where.read_text())
        except Exception as exc:  # noqa: BLE001  (yaml raises several types; all mean the same here)
            raise DataError(f"invalid YAML: {exc}", path=where) from exc
        if not isinstance(tree, dict):
            raise DataError("a recipe is a mapping of keys", path=where)
    return apply_overrides(tree, overrides), where


def recipe_kind(tree: Mapping[str, Any], where: str | os.PathLike | None = None) -> str:
    """Which runner a recipe is for (one of :data:`KINDS`)."""
    head = tree.get("head")
    if isinstance(head, str):
        kind = head.strip().lower()
        if kind in HEAD_KINDS:
            return kind
        raise DataError(f"unknown head {head!r}; recipes name one of SoScope, SpatialGlue, CellScape (HisToSGE "
                        "recipes have a head: section)", path=where, field="head")
    if "objectives" in tree:
        return "train"
    if isinstance(head, Mapping) and "data" in tree:
        return "histosge"
    raise DataError("cannot tell what this recipe runs: a training recipe lists objectives, a head recipe names "
                    "its head (head: CellScape) or, for HisToSGE, has data and head sections", path=where)


def run_recipe(source: str | os.PathLike | Mapping[str, Any], overrides: Iterable[str] = (), *,
               progress: bool = True, where: str | os.PathLike | None = None) -> Any:
    """Run any recipe; returns what its runner returns (training metrics, HisToSGE metrics, the head's AnnData).

    Args:
        source: a YAML file or a mapping.
        overrides: ``key.path=value`` strings applied before the recipe is checked.
        progress: progress bars (a training recipe's own ``progress`` key wins).
        where: for a mapping, the file it was read from (named in the head runners' errors).
    """
    tree, path = read_recipe(source, overrides)
    where = path or where
    kind = recipe_kind(tree, where)
    if kind == "train":
        from spfm.train import train

        return train(tree)
    if kind == "histosge":
        from spfm.heads.histosge.recipe import run_recipe as run_histosge

        return run_histosge(tree, progress=progress)
    runner = importlib.import_module(HEAD_KINDS[kind]).run_recipe
    return runner(tree, progress=progress, where=where)
