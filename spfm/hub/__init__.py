"""The Hugging Face Hub integration: every spfm model saved, shared and loaded as a transformers model.

==========================  ===================================================================================
``from_pretrained(p)``      load any spfm model from a folder or Hub repo (dispatch on ``model_type``)
``save_pretrained(m, dir)`` ``config.json`` + ``model.safetensors`` + ``README.md`` (+ modelling code: backbone)
``push_to_hub(m, repo)``    upload with a generated model card (no-derivatives backbone weights left out)
``pull(repo, dir)``         download a repository (pickles skipped)
``to_hub_model(obj)``       a Backbone, a head, (backbone, head), or an ``spfm train`` folder -> Hub model
``register_head_kind``      bind ``"spfm-<head>"`` to a head class that follows the head contract
==========================  ===================================================================================

Kinds (``model_type``): ``spfm-backbone`` (remote code: loads with ``AutoModel(..., trust_remote_code=True)``
without spfm), ``spfm-histosge``, ``spfm-soscope``, ``spfm-spatialglue``, ``spfm-cellscape`` and
``spfm-composite`` (``AutoModel`` after ``import spfm``). Names load on first use (PEP 562) so ``import spfm``
does not import transformers; :mod:`spfm.hub._hook` registers the Auto classes when transformers loads them.
"""

from __future__ import annotations

from spfm._lazy import lazy_exports

_EXPORTS = {
    "spfm.hub.api": ["from_pretrained", "save_pretrained", "push_to_hub", "pull", "read_config"],
    "spfm.hub.convert": ["to_hub_model", "backbone_to_hub", "hub_to_backbone", "training_output_to_hub"],
    "spfm.hub.configs": ["register_head_kind", "head_kinds", "SpfmHeadConfig", "SpfmCompositeConfig"],
    "spfm.hub.configuration_spfm": ["SpfmConfig", "SpfmBackboneConfig", "model_card"],
    "spfm.hub.modeling_spfm": ["SpfmBackboneModel", "SpfmLoadError"],
    "spfm.hub.heads": ["SpfmHeadModel"],
    "spfm.hub.composite": ["SpfmCompositeModel"],
    "spfm.hub.auto": ["register_auto_classes", "kinds"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
