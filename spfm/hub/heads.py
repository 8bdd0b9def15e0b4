"""Hub models of heads: one generic wrapper for any head class that follows the head contract.

``SpfmHeadModel`` holds the AnnData-facing head (``model.head``: fit/predict/transform as usual) and registers its
``nn.Module`` as ``model.module``, so ``model.safetensors`` holds ``module.*`` -- every parameter and buffer,
including fitted statistics -- and ``config.json`` holds ``head.to_config()``. Loading rebuilds the head with
``HeadClass.from_config(head_config)`` and loads the tensors strictly: the head then runs on new AnnData without
the training data.

Heads are not saved as remote code: they need spfm (graphs, preprocessing, anndata), so ``AutoModel`` loads them
after ``import spfm`` only.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from spfm.errors import SpfmError
from spfm.hub.configs import HeadKind, SpfmHeadConfig, _camel, kind_for_head
from spfm.hub.modeling_spfm import SpfmHubMixin


def _head_config_of(head: Any) -> dict[str, Any]:
    """``head.to_config()``, checked to be a JSON-serialisable dict (it goes into config.json)."""
    if not callable(getattr(head, "to_config", None)):
        raise SpfmError(f"{type(head).__name__} has no to_config(): it does not follow the head contract")
    config = head.to_config()
    if not isinstance(config, dict):
        raise SpfmError(f"{type(head).__name__}.to_config() returned {type(config).__name__}, not a dict")
    for key, value in config.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise SpfmError(f"{type(head).__name__}.to_config()[{key!r}] is not JSON-serialisable ({exc}); large "
                            f"arrays belong in the module as registered buffers") from exc
    return config


class SpfmHeadModel(SpfmHubMixin, PreTrainedModel):
    """A head as a Hub model: ``model.head`` is the AnnData-facing head, ``model.module`` its ``nn.Module``.

    Build one from a fitted head with :meth:`from_head` (or :func:`spfm.hub.to_hub_model`); ``forward`` calls
    ``module``.
    """

    config_class = SpfmHeadConfig
    base_model_prefix = "spfm_head"
    kind: HeadKind | None = None

    def __init__(self, config: SpfmHeadConfig, head: Any = None) -> None:
        super().__init__(config)
        if head is None:
            if type(self).kind is None:
                raise SpfmError(f"{type(self).__name__} is not bound to a head kind")
            # The class comes from the kind registered for this model_type, never from config.head_class: a
            # downloaded config must not choose what spfm imports.
            head = type(self).kind.load_head_class().from_config(copy.deepcopy(config.head_config))
        module = getattr(head, "module", None)
        if not isinstance(module, nn.Module):
            raise SpfmError(f"{type(head).__name__}.module is {type(module).__name__}, not an nn.Module (head "
                            f"contract)")
        self.__dict__["head"] = head  # a plain attribute: the head itself is not a submodule
        self.module = module
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Keep the head's own initialisation (the weights are loaded over it anyway)."""

    @classmethod
    def from_head(cls, head: Any, **card: Any) -> SpfmHeadModel:
        """Wrap a fitted head; ``card``: license, datasets, metrics, genes, base_model, tags."""
        model_class = cls if cls.kind is not None else kind_for_head(head).model_class
        return model_class(model_class.config_class(head_config=_head_config_of(head), **card), head=head)

    def _sync_config(self) -> None:
        if self.module is not getattr(self.head, "module", None):
            raise SpfmError(f"{type(self.head).__name__}.module was replaced after wrapping (refit?): wrap the "
                            f"fitted head again with to_hub_model()")
        self.config.head_config = _head_config_of(self.head)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def make_head_model_class(kind: HeadKind) -> type:
    """The Hub model class of a head kind (``SpfmHisToSGEModel``...), bound to its config class."""
    return type(f"{_camel(kind.model_type)}Model", (SpfmHeadModel,), {
        "config_class": kind.config_class, "kind": kind, "__module__": __name__,
        "__doc__": f"Hub model of the {kind.model_type} head ({kind.class_path})."})
