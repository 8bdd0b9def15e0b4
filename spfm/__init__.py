"""spfm: a foundation-model toolkit for spatial omics.

HEST-style corpora (H&E slides plus spot/cell profiles) become WebDataset shards; a pathology ViT backbone is
pretrained or fine-tuned on them; heads predict, enhance, integrate and segment spatial omics on new tissue.
"""

from spfm.errors import DataError, SpfmError

__version__ = "0.1.0"

__all__ = ["DataError", "SpfmError", "__version__"]
