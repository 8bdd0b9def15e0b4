"""spfm's Hub entry points: ``from_pretrained``, ``save_pretrained``, ``push_to_hub``, ``pull``.

All of them use huggingface_hub's client, so ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE=1`` (read the cache
only) behave as everywhere else. Tokens come only from the environment (``HF_TOKEN``) or ``hf auth login``; spfm
never takes one as an argument or writes one anywhere. No code from a repository is ever run: the class is chosen
by the config's ``model_type`` among spfm's own kinds, and weights are read from ``model.safetensors`` only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from spfm.atomic import read_json_object
from spfm.errors import DataError
from spfm.hub.modeling_spfm import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, SpfmLoadError

_PICKLE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]


def _download(repo_id: str, filename: str, *, revision: str | None, cache_dir: str | os.PathLike | None,
              local_files_only: bool) -> Path:
    """One file of a Hub repo (cached); missing file -> DataError, no access/offline -> HubAccessError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from spfm.models.backbones.weights import hub_access

    try:
        with hub_access(repo_id):
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                        local_files_only=local_files_only))
    except EntryNotFoundError as exc:
        raise DataError(f"no {filename} in the repository", path=repo_id, field=filename) from exc


def read_config(path_or_repo: str | os.PathLike, *, revision: str | None = None,
                cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> tuple[dict, Path]:
    """``config.json`` of a saved model folder or Hub repo, checked to be an spfm model's.

    Returns:
        (the config dict, the local config file).

    Raises:
        DataError: no config.json, or its ``model_type`` is not one of spfm's kinds (names the file and value).
    """
    from spfm.hub.auto import kinds

    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        file = path / CONFIG_NAME
        if not file.is_file():
            raise DataError(f"no {CONFIG_NAME}: not a saved model folder", path=path)
    elif path.exists():
        raise DataError("expected a saved model folder or a Hub repo id, got a file", path=path)
    elif path.is_absolute() or str(path_or_repo).startswith((".", "~")) or str(path_or_repo).count("/") > 1:
        raise DataError("folder not found (and not a Hub repo id of the form owner/name)", path=path)
    else:
        file = _download(str(path_or_repo), CONFIG_NAME, revision=revision, cache_dir=cache_dir,
                         local_files_only=local_files_only)
    config = read_json_object(file, "model config")
    model_type = config.get("model_type")
    known = kinds()
    if model_type not in known:
        hint = ""
        if model_type is None and ("spfm_backbone" in config or "backbone" in config):
            hint = (" (this is a registry checkpoint from save_backbone/spfm train: load it with "
                    "create_backbone(name, checkpoint=...) or turn it into a Hub model with spfm.hub.to_hub_model)")
        raise DataError(f"not an spfm model: model_type {model_type!r}; spfm reads {sorted(known)}{hint}",
                        path=file, field="model_type")
    return config, file


def from_pretrained(path_or_repo: str | os.PathLike, *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Any:
    """Load any spfm model from a local folder or a Hub repo, dispatching on ``config.json``'s ``model_type``.

    Args:
        path_or_repo: a folder written by ``save_pretrained`` / ``spfm pull``, or ``owner/name`` on the Hub.
        revision: branch, tag or commit of a Hub repo.
        cache_dir: Hugging Face cache (default ``HF_HOME``/hub).
        local_files_only: read the cache only (also what ``HF_HUB_OFFLINE=1`` does).

    Returns:
        ``SpfmBackboneModel`` (``model.embed(images)``; :func:`spfm.hub.hub_to_backbone` for a registry
        ``Backbone``), a head's Hub model (``model.head`` is the AnnData-facing head), or ``SpfmCompositeModel``.

    Raises:
        DataError: not an spfm config, no ``model.safetensors`` (pickles are listed and never loaded), weights that
            do not fit the config (names every key).
        HubAccessError: offline without the files in the cache, gated or missing repository.
    """
    from spfm.hub.auto import kinds
    from spfm.models.backbones.weights import hub_access

    config_dict, config_file = read_config(path_or_repo, revision=revision, cache_dir=cache_dir,
                                           local_files_only=local_files_only)
    config_class, model_class = kinds()[config_dict["model_type"]]
    config = config_class.from_dict(config_dict)
    try:
        with hub_access(str(path_or_repo)):
            return model_class.from_pretrained(str(path_or_repo), config=config, revision=revision,
                                               cache_dir=None if cache_dir is None else str(cache_dir),
                                               local_files_only=local_files_only)
    except SpfmLoadError as exc:
        raise DataError(str(exc)) from exc  # the message names the file and every key at fault


def save_pretrained(obj: Any, directory: str | os.PathLike, *, include_restricted_weights: bool = True,
                    **card: Any) -> Path:
    """Write any spfm model (see :func:`spfm.hub.to_hub_model`) as ``config.json`` + ``model.safetensors`` + card.

    ``card``: license, datasets, metrics, genes, base_model, tags.
    """
    from spfm.hub.convert import to_hub_model

    to_hub_model(obj, **card).save_pretrained(str(directory), include_restricted_weights=include_restricted_weights)
    return Path(directory)


def push_to_hub(obj: Any, repo_id: str, *, private: bool | None = None, commit_message: str | None = None,
                revision: str | None = None, create_pr: bool = False, include_restricted_weights: bool = False,
                **card: Any) -> Any:
    """Upload any spfm model with a generated model card; returns huggingface_hub's ``CommitInfo``.

    The weights of a no-derivatives backbone (UNI, Virchow2...) are not uploaded unless
    ``include_restricted_weights=True``: the card records the backbone id and loading fetches them from there.
    """
    from spfm.hub.convert import to_hub_model

    model = to_hub_model(obj, **card)
    return model.push_to_hub(repo_id, private=private, commit_message=commit_message, revision=revision,
                             create_pr=create_pr, include_restricted_weights=include_restricted_weights)


def pull(repo_id: str, local_dir: str | os.PathLike, *, revision: str | None = None,
         cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """Download an spfm model repository into ``local_dir`` (pickle files are skipped, never downloaded).

    The config is checked first, so a repository that is not an spfm model fails before anything else is fetched.
    """
    from huggingface_hub import snapshot_download

    from spfm.models.backbones.weights import hub_access

    config, _ = read_config(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    with hub_access(repo_id):
        folder = Path(snapshot_download(repo_id, revision=revision, local_dir=str(local_dir), cache_dir=cache_dir,
                                        local_files_only=local_files_only, ignore_patterns=_PICKLE_PATTERNS))
    external = (config.get("backbone_weights") == "external" and config.get("model_type") == "spfm-backbone")
    if not external and not (folder / WEIGHTS_NAME).is_file():
        raise DataError(f"the repository has no {WEIGHTS_NAME} (spfm loads safetensors only; pickle weights are "
                        f"not downloaded)", path=repo_id, field=WEIGHTS_NAME)
    return folder
