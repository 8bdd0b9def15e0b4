"""Hub models of spfm: a safe loading/pushing mixin and the image backbone.

Like :mod:`configuration_spfm`, this file is copied next to the weights by ``save_pretrained`` so that
``AutoModel.from_pretrained(folder_or_repo, trust_remote_code=True)`` works without spfm: it imports only the
standard library, torch, transformers, huggingface_hub (a transformers dependency), safetensors and timm.

Loading reads ``model.safetensors`` only -- a repository that holds nothing but pickles (``pytorch_model.bin``) is
refused, never unpickled -- and fits the weights strictly, naming every key that does not fit.
"""

from __future__ import annotations

import importlib
import inspect
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_spfm import WEIGHTS_EXTERNAL, WEIGHTS_INCLUDED, SpfmBackboneConfig, SpfmConfig, model_card

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
#: Files that would be unpickled to load: listed in errors, never read.
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
#: Keyword arguments of ``from_pretrained`` that only steer the Auto classes; they are accepted and dropped.
_AUTO_KWARGS = ("_from_auto", "trust_remote_code", "adapter_kwargs", "proxies", "_commit_hash", "code_revision",
                "low_cpu_mem_usage", "attn_implementation")
#: Module prefixes whose classes a config may name in ``model_args`` (layer classes of timm's ViTs).
_ALLOWED_CLASS_PREFIXES = ("timm.", "torch.nn.")

#: spfm installs a loader here that builds an external (no-derivatives) backbone through its registry, with its
#: Hub-access error messages; the copy saved with a model keeps None and falls back to timm/transformers directly.
external_trunk_loader: Callable[[SpfmBackboneConfig], nn.Module] | None = None


class SpfmLoadError(ValueError):
    """A saved spfm model cannot be loaded (missing or unsafe weights, weights that do not fit)."""


def _is_local(path: str) -> bool:
    return os.path.isdir(path)


def _pickles(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))


def resolve_weights(path: str, *, subfolder: str = "", revision: str | None = None, cache_dir: str | None = None,
                    force_download: bool = False, local_files_only: bool = False,
                    token: str | bool | None = None) -> str:
    """Local path of ``model.safetensors`` of a folder or Hub repo; a clear :class:`SpfmLoadError` when absent.

    The error names any pickle files it found instead, and says they are not loaded.
    """
    if _is_local(path):
        folder = os.path.join(path, subfolder) if subfolder else path
        weights = os.path.join(folder, WEIGHTS_NAME)
        if os.path.isfile(weights):
            return weights
        raise SpfmLoadError(_missing_weights_message(path, sorted(os.listdir(folder))))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(path, WEIGHTS_NAME, subfolder=subfolder or None, revision=revision,
                               cache_dir=cache_dir, force_download=force_download,
                               local_files_only=local_files_only, token=token)
    except EntryNotFoundError as exc:
        names: list[str] = []
        try:
            from huggingface_hub import list_repo_files

            names = list_repo_files(path, revision=revision, token=token)
        except Exception:  # noqa: BLE001 -- the listing only improves the message
            pass
        raise SpfmLoadError(_missing_weights_message(path, names)) from exc
    except LocalEntryNotFoundError as exc:
        raise SpfmLoadError(f"{path}: {WEIGHTS_NAME} is not in the local Hugging Face cache and the Hub cannot be "
                            f"reached (offline: HF_HUB_OFFLINE=1 or no network)") from exc


def _missing_weights_message(path: str, names: list[str]) -> str:
    pickles = _pickles(names)
    if pickles:
        return (f"{path}: no {WEIGHTS_NAME}; found only pickle weights {pickles}, which spfm never loads "
                f"(unpickling can run arbitrary code). Convert them to safetensors where they were made.")
    return f"{path}: no {WEIGHTS_NAME} (files: {names or 'none'})"


def check_state_dict(own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: str,
                     skip_prefixes: tuple[str, ...] = ()) -> None:
    """Raise :class:`SpfmLoadError` naming every key with another shape, missing, or unexpected.

    Keys under ``skip_prefixes`` (external backbone weights) are neither expected nor allowed in ``loaded``.
    """
    expected = {k: v for k, v in own.items() if not k.startswith(skip_prefixes)} if skip_prefixes else own
    mismatched = [f"{k} (file {tuple(v.shape)} vs model {tuple(expected[k].shape)})"
                  for k, v in loaded.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    if mismatched or missing or unexpected:
        parts = []
        for label, keys in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                shown = "; ".join(keys[:10]) + (f"; ... {len(keys) - 10} more" if len(keys) > 10 else "")
                parts.append(f"{label} [{len(keys)}]: {shown}")
        raise SpfmLoadError(f"{source}: the weights do not fit the model its config.json describes: "
                            + " | ".join(parts))


class SpfmHubMixin:
    """Safe ``from_pretrained``, and ``save_pretrained``/``push_to_hub`` that honour no-derivatives licences.

    Subclasses (``PreTrainedModel`` models) say which weights are under a no-derivatives licence
    (:meth:`_restricted_prefixes`), how to mark them external in the config (:meth:`_set_backbone_weights`) and how
    to fetch them when they are (:meth:`_load_external`).
    """

    config: SpfmConfig

    # -- hooks --------------------------------------------------------------------------------------------------
    def _restricted_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes whose licence forbids redistribution (empty: everything may be uploaded)."""
        return ()

    def _external_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes not stored in ``model.safetensors`` because the config marks them external."""
        return ()

    def _set_backbone_weights(self, mode: str) -> None:
        """Mark the restricted weights ``"included"`` or ``"external"`` in the config."""

    def _load_external(self) -> None:
        """Fetch the weights under :meth:`_external_prefixes` from their own repository."""

    def _sync_config(self) -> None:
        """Bring the config up to date with the model before saving (a head's fitted state)."""

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: SpfmConfig | None = None, cache_dir: str | None = None, force_download: bool = False,
                        local_files_only: bool = False, token: str | bool | None = None, revision: str | None = None,
                        subfolder: str = "", dtype: Any = None, torch_dtype: Any = None, **kwargs: Any) -> Any:
        """Build the model from ``config.json`` and load ``model.safetensors`` (never a pickle) strictly.

        Accepts the Hub arguments of transformers' ``from_pretrained`` (``revision``, ``cache_dir``,
        ``local_files_only``, ``token``, ``subfolder``, ``dtype``); ``HF_HUB_OFFLINE=1`` reads the cache only.
        """
        for key in _AUTO_KWARGS:
            kwargs.pop(key, None)
        unused = {k: v for k, v in kwargs.items() if v is not None}
        if model_args or unused:
            raise TypeError(f"{cls.__name__}.from_pretrained does not support {list(model_args) + sorted(unused)}")
        path = str(pretrained_model_name_or_path)
        hub = dict(cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only,
                   token=token, revision=revision)
        if config is None:
            config = cls.config_class.from_pretrained(path, subfolder=subfolder, **hub)
        elif getattr(config, "model_type", None) != cls.config_class.model_type:
            raise SpfmLoadError(f"{path}: config model_type {getattr(config, 'model_type', None)!r} is not "
                                f"{cls.config_class.model_type!r}")
        elif not isinstance(config, cls.config_class):
            # The same class loaded twice as remote code (AutoConfig's copy and this module's import of it).
            config = cls.config_class.from_dict(config.to_dict())
        model = cls(config)
        skip = model._external_prefixes()
        if not skip or any(not k.startswith(skip) for k in model.state_dict()):
            model.load_safetensors(resolve_weights(path, subfolder=subfolder, **hub))
        # else: every weight is external (a no-derivatives backbone alone): there is no weights file to read.
        model._load_external()
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None and dtype != "auto":
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        model.name_or_path = path
        model.eval()
        return model

    def load_safetensors(self, weights: str) -> None:
        """Load a ``model.safetensors`` file into this model strictly (see :func:`check_state_dict`)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded = load_file(weights, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise SpfmLoadError(f"{weights}: not a readable safetensors file ({exc})") from exc
        skip = self._external_prefixes()
        own = self.state_dict()
        check_state_dict(own, loaded, weights, skip)
        self.load_state_dict(loaded, strict=not skip)

    # -- saving and pushing -------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, include_restricted_weights: bool = True,
                        repo_id: str | None = None, **kwargs: Any) -> None:
        """Write ``config.json``, ``model.safetensors``, the modelling code (if registered) and ``README.md``.

        Args:
            include_restricted_weights: write the weights of a no-derivatives backbone too (default here: it is
                your own disk). With False the config marks them external and only their id is recorded.
            repo_id: the repository name the model card shows.
        """
        if kwargs.pop("push_to_hub", False):
            raise TypeError("save_pretrained(push_to_hub=True) is not supported for spfm models: call "
                            "model.push_to_hub(repo_id), which writes the model card and leaves restricted weights out")
        self._sync_config()
        restricted = self._restricted_prefixes()
        drop = restricted if (restricted and not include_restricted_weights) else ()
        previous = self._weights_mode()
        if drop:
            self._set_backbone_weights(WEIGHTS_EXTERNAL)
        skip = drop or self._external_prefixes()
        nothing_to_store = False
        try:
            if skip:
                state = {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}
                nothing_to_store = not state  # (transformers empties the dict it is given while writing)
                kwargs["state_dict"] = state
            if "save_original_format" in inspect.signature(PreTrainedModel.save_pretrained).parameters:
                # transformers 5 renames the keys of its own submodules (a ViT trunk) to a legacy layout on save;
                # spfm loads with load_state_dict, so the file keeps the in-memory names.
                kwargs.setdefault("save_original_format", False)
            super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
            stale = os.path.join(save_directory, WEIGHTS_NAME)
            if nothing_to_store and os.path.isfile(stale):
                os.remove(stale)  # nothing to store (all external): no weights from an earlier save may remain
            with open(os.path.join(save_directory, CARD_NAME), "w", encoding="utf-8") as fh:
                fh.write(model_card(self.config, repo_id, remote_code=self._remote_code()))
        finally:
            if drop:
                self._set_backbone_weights(previous)

    def _weights_mode(self) -> str:
        return WEIGHTS_INCLUDED

    def _remote_code(self) -> bool:
        return getattr(type(self), "_auto_class", None) is not None

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, commit_message: str | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    include_restricted_weights: bool = False, **kwargs: Any) -> Any:
        """Upload config, weights, code and a generated model card to ``repo_id`` with huggingface_hub's client.

        A no-derivatives backbone's weights (UNI, Virchow2) are left out unless ``include_restricted_weights=True``;
        the card then records the backbone id and loading fetches the published weights. The token comes from
        ``token``, ``HF_TOKEN`` or ``hf auth login``. Returns the commit info.
        """
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model").repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, include_restricted_weights=include_restricted_weights, repo_id=repo_id,
                                 **kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model", token=token,
                                     revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or f"Upload {self.config.model_type} model")


# --- the backbone -----------------------------------------------------------------------------------------------

def _resolve_classes(value: Any) -> Any:
    """``{"__class__": "timm.layers.SwiGLUPacked"}`` -> the class (timm.* and torch.nn.* only), recursively."""
    if isinstance(value, dict):
        if set(value) == {"__class__"}:
            dotted = str(value["__class__"])
            if not dotted.startswith(_ALLOWED_CLASS_PREFIXES):
                raise SpfmLoadError(f"model_args names the class {dotted!r}; only timm.* and torch.nn.* classes "
                                    f"are allowed")
            module, _, name = dotted.rpartition(".")
            return getattr(importlib.import_module(module), name)
        return {k: _resolve_classes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_classes(v) for v in value]
    return value


def build_trunk(config: SpfmBackboneConfig, *, pretrained: bool = False) -> nn.Module:
    """The trunk a backbone config describes: random init, or the published weights from ``config.hub_repo``."""
    if config.library == "timm":
        import timm

        args = _resolve_classes(config.model_args)
        if pretrained:
            if not config.hub_repo:
                raise SpfmLoadError(f"backbone {config.backbone!r} is marked external but records no hub_repo")
            return timm.create_model(f"hf-hub:{config.hub_repo}", pretrained=True, **args)
        return timm.create_model(config.architecture, pretrained=False, **args)
    if config.library == "transformers":
        from transformers import AutoConfig, AutoModel

        if pretrained:
            return AutoModel.from_pretrained(config.hub_repo, **config.trunk_kwargs)
        trunk_config = dict(config.trunk_config)
        model_type = trunk_config.pop("model_type")
        return AutoModel.from_config(AutoConfig.for_model(model_type, **trunk_config), **config.trunk_kwargs)
    raise SpfmLoadError(f"unknown backbone library {config.library!r} (expected timm or transformers)")


class SpfmBackboneModel(SpfmHubMixin, PreTrainedModel):
    """An image backbone: normalised images (B, 3, H, W) -> embeddings (B, embed_dim).

    ``forward`` returns ``last_hidden_state`` (B, T, D_tok: prefix tokens first) and ``pooler_output`` (B, D:
    the embedding spfm uses, read out as ``config.readout`` says). State-dict keys are ``trunk.*``, the same as an
    spfm :class:`~spfm.models.backbones.Backbone`.
    """

    config_class = SpfmBackboneConfig
    base_model_prefix = "spfm_backbone"
    main_input_name = "pixel_values"

    def __init__(self, config: SpfmBackboneConfig, trunk: nn.Module | None = None) -> None:
        super().__init__(config)
        self.trunk = trunk if trunk is not None else build_trunk(config)
        # Non-persistent: they come from the config, not from the weights file.
        self.register_buffer("_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Keep the trunk's own (timm/transformers) initialisation."""

    def _restricted_prefixes(self) -> tuple[str, ...]:
        return ("trunk.",) if self.config.no_derivatives else ()

    def _external_prefixes(self) -> tuple[str, ...]:
        return ("trunk.",) if self.config.backbone_weights == WEIGHTS_EXTERNAL else ()

    def _weights_mode(self) -> str:
        return self.config.backbone_weights

    def _set_backbone_weights(self, mode: str) -> None:
        self.config.backbone_weights = mode

    def _load_external(self) -> None:
        if self.config.backbone_weights != WEIGHTS_EXTERNAL:
            return
        loader = external_trunk_loader
        self.trunk = loader(self.config) if loader is not None else build_trunk(self.config, pretrained=True)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised as the trunk expects."""
        return (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> tokens (B, T, D_tok)."""
        if hasattr(self.trunk, "forward_features"):
            return self.trunk.forward_features(pixel_values)
        return self.trunk(pixel_values=pixel_values).last_hidden_state

    def readout(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, D_tok) -> embedding (B, embed_dim)."""
        prefix = self.config.num_prefix_tokens
        if self.config.readout == "cls":
            return tokens[:, 0]
        if self.config.readout == "mean":
            return tokens[:, prefix:].mean(dim=1)
        if self.config.readout == "cls+mean":
            return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)
        raise SpfmLoadError(f"unknown readout {self.config.readout!r}")

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> embeddings (B, embed_dim), as spfm's ``Backbone.forward``."""
        return self.readout(self.tokens(pixel_values))

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **_: Any) -> Any:
        tokens = self.tokens(pixel_values)
        pooled = self.readout(tokens)
        if return_dict is False:
            return (tokens, pooled)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=pooled)


# What register_for_auto_class("AutoConfig"/"AutoModel") sets, without its import of transformers.models.auto:
# save_pretrained then copies this file and configuration_spfm.py and writes config.json's auto_map.
SpfmBackboneConfig._auto_class = "AutoConfig"
SpfmBackboneModel._auto_class = "AutoModel"
