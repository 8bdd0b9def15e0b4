"""The data layer: HEST-layout readers and importers, patches, WebDataset shards, loaders, preprocessing, graphs.

Nothing here imports ``spfm.models`` or later stages.
"""

from spfm.data.hest import HestSample, list_samples, read_sample, sample_ids, write_sample
from spfm.data.patches import PatchConfig, iter_patches, write_patches_h5
from spfm.data.slide import Slide, open_slide, write_pyramidal_tiff

__all__ = [
    "HestSample",
    "PatchConfig",
    "Slide",
    "iter_patches",
    "list_samples",
    "open_slide",
    "read_sample",
    "sample_ids",
    "write_patches_h5",
    "write_pyramidal_tiff",
    "write_sample",
]
