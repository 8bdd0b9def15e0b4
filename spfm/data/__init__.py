"""The data layer: HEST-layout readers and importers, patches, WebDataset shards, loaders, preprocessing, graphs.

Nothing here imports ``spfm.models`` or later stages. Names are loaded on first use (PEP 562), so
``import spfm.data`` stays cheap and the CLI starts fast; ``from spfm.data import make_loader`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "spfm.data.hest": ["HestSample", "list_samples", "read_sample", "sample_ids", "write_sample"],
    "spfm.data.slide": ["Slide", "open_slide", "write_pyramidal_tiff"],
    "spfm.data.patches": ["PatchConfig", "iter_patches", "write_patches_h5"],
    "spfm.data.synthetic": ["make_synthetic_corpus"],
    "spfm.data.importers": ["import_legacy_st", "import_visium"],
    "spfm.data.vocab": ["build_vocabulary"],
    "spfm.data.splits": ["assign_splits"],
    "spfm.data.shards": ["read_manifest", "verify_shards", "write_shards"],
    "spfm.data.datacard": ["write_data_card"],
    "spfm.data.augment": ["Augment"],
    "spfm.data.loader": ["ShardDataset", "ShardLoader", "hf_data_files", "make_dataset", "make_loader"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'spfm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
