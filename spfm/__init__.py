"""spfm: a foundation-model toolkit for spatial omics.

HEST-style corpora (H&E slides plus spot/cell profiles) become WebDataset shards; a pathology ViT backbone is
pretrained or fine-tuned on them; heads predict, enhance, integrate and segment spatial omics on new tissue.
"""

from typing import Any

from spfm.errors import DataError, SpfmError
from spfm.hub._hook import install as _install_hub_hook

__version__ = "0.1.0"

__all__ = ["DataError", "SpfmError", "__version__", "from_pretrained"]

# transformers' AutoConfig/AutoModel learn spfm's model types when transformers loads them (no import here).
_install_hub_hook()


def __getattr__(name: str) -> Any:
    if name == "from_pretrained":  # loaded on first use: it imports transformers
        from spfm.hub.api import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'spfm' has no attribute {name!r}")
