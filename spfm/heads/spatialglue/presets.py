"""Datatype presets of the SpatialGlue reference (package 1.1.5 and its tutorials), every value overridable.

=================================  =============  =========  ==============  ======  ======================
datatype                           modalities     spatial k  loss weights    epochs  preprocessing
=================================  =============  =========  ==============  ======  ======================
``SPOTS`` (mouse spleen)           rna, protein   3          [1, 5, 1, 1]    600     scale; PCA to P - 1
``Stereo-CITE-seq`` (thymus)       rna, protein   6          [1, 10, 1, 10]  1500    no scale; PCA to P - 1
``10x`` (Visium lymph node)        rna, protein   3          [1, 5, 1, 10]   200     scale; PCA to P - 1
``Spatial-epigenome-transcriptome``  rna, atac    6          [1, 5, 1, 1]    1600    scale; PCA / LSI to 50
=================================  =============  =========  ==============  ======  ======================

P is the number of proteins. Loss weights are ``[recon_1, recon_2, corr_1, corr_2]``; with three modalities the
authors' 3-modality version weights all 3 reconstruction and 6 correspondence terms 1.
"""

from __future__ import annotations

from typing import Any

from spfm.errors import DataError

#: The modality kinds the preprocessing knows.
KINDS = ("rna", "protein", "atac")

PRESETS: dict[str, dict[str, Any]] = {
    "SPOTS": {"kinds": ["rna", "protein"], "spatial_k": 3, "weights": [1.0, 5.0, 1.0, 1.0], "epochs": 600,
              "scale": True},
    "Stereo-CITE-seq": {"kinds": ["rna", "protein"], "spatial_k": 6, "weights": [1.0, 10.0, 1.0, 10.0],
                        "epochs": 1500, "scale": False},
    "10x": {"kinds": ["rna", "protein"], "spatial_k": 3, "weights": [1.0, 5.0, 1.0, 10.0], "epochs": 200,
            "scale": True},
    "Spatial-epigenome-transcriptome": {"kinds": ["rna", "atac"], "spatial_k": 6, "weights": [1.0, 5.0, 1.0, 1.0],
                                        "epochs": 1600, "scale": True},
}
#: Shorter names users type on the command line.
ALIASES = {"spots": "SPOTS", "stereo-cite-seq": "Stereo-CITE-seq", "stereo": "Stereo-CITE-seq", "10x": "10x",
           "visium": "10x", "spatial-epigenome-transcriptome": "Spatial-epigenome-transcriptome",
           "epigenome": "Spatial-epigenome-transcriptome", "atac-rna": "Spatial-epigenome-transcriptome"}


def resolve_datatype(datatype: str) -> str:
    """The canonical preset name for ``datatype`` (case-insensitive, aliases allowed), or DataError."""
    name = ALIASES.get(str(datatype).lower(), datatype)
    if name not in PRESETS:
        raise DataError(f"unknown datatype {datatype!r}; use one of {', '.join(PRESETS)}", field="datatype")
    return name


def default_weights(datatype: str, n_modalities: int) -> list[float]:
    """Loss weights: the preset's four for two modalities, all ones (M + M(M-1) terms) for three."""
    if n_modalities == 2:
        return list(PRESETS[resolve_datatype(datatype)]["weights"])
    return [1.0] * (n_modalities + n_modalities * (n_modalities - 1))


def default_n_comps(kinds: list[str], n_features: list[int]) -> int:
    """The reference's shared input dimension: proteins - 1 when a protein modality is present, else 50."""
    proteins = [n for k, n in zip(kinds, n_features) if k == "protein"]
    return (min(proteins) - 1) if proteins else 50
