"""Models: pathology backbones (``spfm.models.backbones``), pretraining objectives and, later, the heads."""
