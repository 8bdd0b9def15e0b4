"""SpatialGlue recipes: a YAML file naming the modality files, the head's keyword arguments and the output.

```yaml
head: SpatialGlue
modalities:            # name -> h5ad, RNA first (the order of the loss weights)
  rna: data/rna.h5ad
  protein: data/protein.h5ad
params:                # SpatialGlue(...) keyword arguments; anything left out comes from the datatype preset
  datatype: 10x
  n_domains: 6
output: runs/integrated.h5ad
plots: true            # also write <output>_domains.png and <output>_weights.png
```
Relative paths are relative to the directory the recipe is run from.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from spfm.errors import DataError

KEYS = {"head", "modalities", "params", "output", "plots"}


def load_recipe(source: str | os.PathLike | dict[str, Any], where: str | os.PathLike | None = None
                ) -> dict[str, Any]:
    """Read (from a file, or a mapping read from ``where``) and check a SpatialGlue recipe (unknown keys and
    parameters are errors naming the key)."""
    from spfm.heads.spatialglue.head import SpatialGlue
    from spfm.recipes import read_recipe

    recipe, path = read_recipe(source)
    path = path or where
    unknown = set(recipe) - KEYS
    if unknown:
        raise DataError(f"unknown recipe key(s) {sorted(unknown)}; allowed: {sorted(KEYS)}", path=path,
                        field=sorted(unknown)[0])
    if str(recipe.get("head", "")).lower() != "spatialglue":
        raise DataError(f"head must be SpatialGlue, got {recipe.get('head')!r}", path=path, field="head")
    mods = recipe.get("modalities")
    if not isinstance(mods, dict) or len(mods) not in (2, 3):
        raise DataError("modalities must map 2 or 3 names to h5ad files", path=path, field="modalities")
    allowed = set(inspect.signature(SpatialGlue.__init__).parameters) - {"self"}
    params = recipe.get("params") or {}
    bad = set(params) - allowed
    if bad:
        raise DataError(f"unknown SpatialGlue parameter(s) {sorted(bad)}", path=path, field=f"params.{sorted(bad)[0]}")
    if "output" not in recipe:
        raise DataError("no output file", path=path, field="output")
    return {"modalities": {str(k): str(v) for k, v in mods.items()}, "params": params, "output": str(recipe["output"]),
            "plots": bool(recipe.get("plots", False))}


def run_recipe(source: str | os.PathLike | dict[str, Any], *, progress: bool = True,
               where: str | os.PathLike | None = None, **overrides: Any):
    """Run a recipe (a file or a mapping; ``spfm run`` passes the mapping with its ``--set`` overrides applied):
    read the modalities, fit, write the output (and figures); returns the integrated AnnData. ``overrides`` are
    SpatialGlue keyword arguments that win over the recipe's ``params``."""
    from spfm.atomic import atomic_write_h5ad, read_h5ad
    from spfm.heads.spatialglue.head import SpatialGlue

    recipe = load_recipe(source, where)
    adatas = {name: read_h5ad(file, "modality file", field=f"modalities.{name}")
              for name, file in recipe["modalities"].items()}
    res = SpatialGlue(**{**recipe["params"], **overrides}).fit_transform(adatas, progress=progress)
    out = atomic_write_h5ad(res, recipe["output"])
    if recipe["plots"] and "domain" in res.obs:
        from spfm import pl

        pl.plot_spatialglue_domains(res, out.with_name(out.stem + "_domains.png"))
        pl.plot_spatialglue_weights(res, out.with_name(out.stem + "_weights.png"))
    return res
