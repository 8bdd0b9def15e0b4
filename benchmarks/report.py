"""What every benchmark script reports the same way: versions, peak memory, and the JSON it prints and writes.

Import from a benchmark script (``benchmarks/`` is on ``sys.path`` when one runs ``python benchmarks/x.py``)::

    from report import emit, peak_memory_mb, versions
"""

from __future__ import annotations

import json
import platform
import resource
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def versions(*packages: str, **extra: str) -> dict[str, str]:
    """Python, spfm and the platform, plus the installed version of each named package (by import name: ``"PIL"``,
    ``"sklearn"``), read from its distribution's metadata (``"?"`` when none is installed)."""
    from importlib import metadata

    import spfm

    distributions = metadata.packages_distributions()
    out = dict(python=platform.python_version(), spfm=spfm.__version__)
    for name in packages:
        if name == "torch":  # the build (+cu130, +cpu) is only in torch.__version__, and it matters for speed figures
            import torch

            out[name] = torch.__version__
            continue
        try:
            out[name] = metadata.version(distributions.get(name, [name])[0])
        except metadata.PackageNotFoundError:
            out[name] = "?"
    return {**out, "platform": platform.platform(), **extra}


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports ``ru_maxrss`` in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit(result: dict[str, Any], out: Path | bool | None, default_name: str) -> dict[str, Any]:
    """Print ``result`` as JSON; with ``--out`` write it too, atomically: to ``out``, or under ``results/`` as
    ``default_name`` when ``--out`` was given without a path (``out is True``)."""
    from spfm.atomic import atomic_write_text

    text = json.dumps(result, indent=2)
    print(text)
    if out is not None and out is not False:
        path = RESULTS / default_name if out is True else Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")
    return result
