"""CellScape recipes (``recipes/cellscape_*.yaml``): one AnnData in, domains and cell-type clusters out.

```yaml
head: CellScape
input: data/cells.h5ad          # raw counts, obsm["spatial"]
annotation: region              # optional obs column shown beside the domains in the plot
params: {variant: full, graph: delaunay, epochs: 50}    # CellScape(...) keyword arguments
run: {n_domains: 11, seed: 0, refine_r: 0}              # CellScape.run(...) keyword arguments
output: runs/cells_domains.h5ad
plots: true                     # also write <output>_domains.png and <output>_umap.png
```
Relative paths are relative to the directory the recipe is run from.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from spfm.errors import DataError

KEYS = {"head", "input", "annotation", "params", "run", "output", "plots"}


def check_recipe(tree: dict[str, Any], where: str | Path | None = None) -> dict[str, Any]:
    """The recipe checked against CellScape's signatures (an unknown key or parameter names itself)."""
    from spfm.heads.cellscape.head import DEFAULTS, CellScape

    unknown = set(tree) - KEYS
    if unknown:
        raise DataError(f"unknown recipe key(s) {sorted(unknown)}; allowed: {sorted(KEYS)}", path=where,
                        field=sorted(unknown)[0])
    for key in ("input", "output"):
        if not tree.get(key):
            raise DataError(f"the recipe has no {key}", path=where, field=key)
    run_args = set(inspect.signature(CellScape.run).parameters) - {"self", "adata"}
    for section, allowed in (("params", set(DEFAULTS)), ("run", run_args)):
        bad = set(tree.get(section) or {}) - allowed
        if bad:
            raise DataError(f"unknown CellScape {section} {sorted(bad)}", path=where,
                            field=f"{section}.{sorted(bad)[0]}")
    if "n_domains" not in (tree.get("run") or {}):
        raise DataError("run.n_domains is required", path=where, field="run.n_domains")
    return tree


def run_recipe(tree: dict[str, Any], *, progress: bool = True, where: str | Path | None = None):
    """Fit CellScape on ``input``, write ``output`` (and plots); returns the annotated AnnData."""
    from spfm.atomic import atomic_write_h5ad, read_h5ad
    from spfm.heads.cellscape.head import CellScape

    check_recipe(tree, where)
    path = Path(tree["input"])
    adata = read_h5ad(path, "input AnnData", field="input")
    annotation = tree.get("annotation")
    if annotation and annotation not in adata.obs:
        raise DataError(f"no obs column {annotation!r} to show beside the domains", path=path, field="annotation")
    head = CellScape(**(tree.get("params") or {}))
    head.run(adata, progress=progress, **(tree.get("run") or {}))
    out = atomic_write_h5ad(adata, tree["output"])
    if tree.get("plots"):
        from spfm.pl import plot_cellscape_domains, plot_cellscape_umap

        stem = out.with_suffix("")
        plot_cellscape_domains(adata, f"{stem}_domains.png", annotation=annotation)
        plot_cellscape_umap(adata, f"{stem}_umap.png")
    return adata
