"""The data layer: HEST-layout readers and importers, patches, WebDataset shards, loaders, preprocessing, graphs.

Nothing here imports ``spfm.models`` or later stages. Names are loaded on first use (PEP 562), so
``import spfm.data`` stays cheap and the CLI starts fast; ``from spfm.data import make_loader`` works as usual.
"""

from __future__ import annotations

from spfm._lazy import lazy_exports

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
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
