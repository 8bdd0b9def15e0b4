"""Loading backbone weights safely, and turning Hub access failures into errors a user can act on.

Three sources of weights exist for a registered backbone:

* the Hugging Face Hub (``pretrained=True``), through timm's ``hf-hub:`` loader or transformers'
  ``from_pretrained``; both honour ``HF_TOKEN``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` themselves. Their failures
  (gated repository, no login, offline with an empty cache) surface as a :class:`~spfm.errors.SpfmError` that says
  how to get access or where to put the files (:func:`hub_access`);
* a local checkpoint (``checkpoint=PATH``): a ``.safetensors`` file, a ``.bin``/``.pth``/``.pt`` file read with
  ``torch.load(weights_only=True)`` only (a pickle that needs arbitrary code is refused, never unpickled), or a
  directory holding ``config.json`` plus one of those (:func:`read_checkpoint`);
* random initialisation.

Weights are loaded strictly: a checkpoint for another architecture fails naming the mismatched, missing and
unexpected keys (:func:`load_weights`).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spfm.atomic import atomic_path, atomic_write_json
from spfm.errors import DataError, SpfmError

#: Weight file names looked up, in order, inside a checkpoint directory (the Hub's snapshot layout).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "checkpoint.pth")
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


class HubAccessError(SpfmError):
    """The published weights of a backbone could not be fetched (gated, not logged in, offline, missing)."""

    def __init__(self, repo: str, reason: str, repo_type: str = "model") -> None:
        self.repo = repo
        if repo_type == "dataset":
            super().__init__(
                f"cannot download the dataset {repo!r} from the Hugging Face Hub ({reason}). To get it: "
                f"(1) accept its terms at https://huggingface.co/datasets/{repo} while logged in; "
                f"(2) run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN to a read token; "
                f"or download on a connected machine and copy the folder here."
            )
            return
        super().__init__(
            f"cannot load the weights of {repo!r} from the Hugging Face Hub ({reason}). To use them: "
            f"(1) accept the model's licence at https://huggingface.co/{repo} while logged in; "
            f"(2) run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN to a read token; "
            f"or, without network access, pass checkpoint= a local weights file or a directory with "
            f"config.json + model.safetensors, or fill the HF cache (HF_HOME) on a connected machine and "
            f"set HF_HUB_OFFLINE=1 here."
        )


def _access_reason(exc: BaseException) -> str | None:
    """Why ``exc`` (or an exception it was raised from) is a Hub access failure, or None if it is not one."""
    from huggingface_hub import errors as hub_errors

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, hub_errors.GatedRepoError):
            return "the repository is gated and this account has not been granted access"
        if isinstance(current, hub_errors.LocalEntryNotFoundError):
            return "offline (HF_HUB_OFFLINE=1 or no network) and the files are not in the HF cache"
        if isinstance(current, hub_errors.RepositoryNotFoundError):
            return "repository not found, or private/gated and not logged in"
        if isinstance(current, hub_errors.HfHubHTTPError):
            status = getattr(getattr(current, "response", None), "status_code", None)
            if status in (401, 403):
                return f"HTTP {status}: not logged in or no access"
        # transformers re-raises Hub failures as a bare OSError whose text is all that is left of the cause.
        text = str(current).lower()
        if isinstance(current, OSError) and ("gated" in text or "offline" in text or "couldn't connect" in text
                                             or "not a valid model identifier" in text):
            return str(current).splitlines()[0]
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def hub_access(repo: str, repo_type: str = "model") -> Iterator[None]:
    """Run a Hub download; gated/unauthenticated/offline failures become a :class:`HubAccessError` for ``repo``."""
    try:
        yield
    except SpfmError:
        raise
    except Exception as exc:
        reason = _access_reason(exc)
        if reason is None:
            raise
        raise HubAccessError(repo, reason, repo_type) from exc


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint resolved to one weights file.

    Attributes:
        path: what the user passed (file or directory), for error messages.
        weights: the weights file inside it.
        config: the directory's ``config.json`` (timm: ``{"architecture", "model_args"}``; transformers: a model
            config with ``model_type``), or None for a bare file.
    """

    path: Path
    weights: Path
    config: dict[str, Any] | None


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Checkpoint:
    """Find the weights file (and ``config.json``) of a local checkpoint file or directory."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise DataError("checkpoint not found", path=path)
    if path.is_file():
        return Checkpoint(path, path, None)
    config = None
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc}", path=config_file) from exc
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return Checkpoint(path, path / name, config)
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return Checkpoint(path, path / found[0], config)
    raise DataError(f"no weights file in the checkpoint directory (looked for {', '.join(WEIGHT_FILES)} or a "
                    f"single *.safetensors; found {found or 'none'})", path=path)


def read_state_dict(weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, on the CPU.

    ``.safetensors`` is read with safetensors; pickle-based files (``.bin``, ``.pth``, ``.pt``, ``.ckpt``) only with
    ``torch.load(weights_only=True)``, which refuses any pickle that would run code. A ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper (training checkpoints) is unwrapped.
    """
    path = Path(weights)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise DataError(f"not a readable safetensors file: {exc}", path=path) from exc
    if path.suffix not in _PICKLE_SUFFIXES:
        raise DataError(f"unknown weights format {path.suffix!r}: expected .safetensors, "
                        f"or {', '.join(_PICKLE_SUFFIXES)} (loaded with weights_only=True)", path=path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError("refusing to load: this pickle needs more than tensors (weights_only=True rejected it); "
                        "convert it to safetensors where it was made", path=path) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise DataError(f"not a readable torch checkpoint: {exc}", path=path) from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError("not a state dict (a mapping of names to tensors)", path=path)
    return obj


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str | os.PathLike) -> None:
    """Load ``state_dict`` into ``model`` strictly; a clear error names every key that does not fit.

    Raises:
        DataError: some keys have other shapes, are missing, or are unexpected (a checkpoint for another
            architecture), naming up to 10 of each with their shapes.
    """
    own = model.state_dict()
    mismatched = [f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)})"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if mismatched or missing or unexpected:
        parts = []
        for label, keys in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                shown = "; ".join(keys[:10]) + (f"; ... {len(keys) - 10} more" if len(keys) > 10 else "")
                parts.append(f"{label} [{len(keys)}]: {shown}")
        raise DataError("checkpoint does not fit the architecture (is it for another backbone, or were the build "
                        "options different?): " + " | ".join(parts), path=source, field="state_dict")
    model.load_state_dict(state_dict, strict=True)


def save_checkpoint(trunk: nn.Module, directory: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write ``trunk``'s weights as ``model.safetensors`` plus ``config.json`` into ``directory``, atomically.

    The layout is the one :func:`resolve_checkpoint` reads back (and the Hub's). Shared tensors are cloned so the
    safetensors file is valid.
    """
    from safetensors.torch import save_file

    with atomic_path(directory, directory=True) as tmp:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in trunk.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "config.json", config)
    return Path(directory)
