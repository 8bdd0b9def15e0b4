"""Importers of a user's own data into the HEST layout (``st/``, ``wsis/``, ``metadata/``).

- :func:`import_legacy_st`: legacy Spatial Transcriptomics (counts TSV with ``XxY`` spot ids, spot selection TSV,
  full-resolution H&E), e.g. the HER2ST sections.
- :func:`import_visium`: a Space Ranger ``outs/`` folder (10x HDF5 matrix, tissue positions, scale factors and the
  full-resolution image, or the hires image when that is all there is).

Both estimate the pixel size from the spot pitch when it is not given, record that it is an estimate, and finish
with :func:`spfm.data.hest.write_sample`, so the sample reads back with :func:`spfm.data.hest.read_sample`.
"""

from spfm.data.importers.legacy_st import import_legacy_st
from spfm.data.importers.visium import import_visium

__all__ = ["import_legacy_st", "import_visium"]
