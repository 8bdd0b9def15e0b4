"""Training recipes: a YAML file validated by a pydantic schema before anything runs.

A recipe has seven sections (see ``recipes/pretrain_synthetic.yaml`` for a complete one)::

    data:        shards, splits, gene panel, batch size, workers, shuffling, resampling, augmentation
    model:       backbone registry name, pretrained weights or a local checkpoint, image size, fine-tuning mode
    objectives:  a list of {name, weight, options}; the total loss is the weighted sum
    optim:       AdamW learning rate, weight decay, betas, warm-up + cosine schedule, steps, accumulation, clipping
    eval:        a held-out split evaluated every N steps
    (top level)  precision, seed, output_dir, checkpoint_every, keep_last, tracker, log_every

Every model forbids unknown keys and checks types, so a typo (``optim.lr_rate``) or a wrong type
(``optim.max_steps: ten``) fails before training starts, with the key path in the message. Relative paths in a
recipe are relative to the working directory the run starts in (as for every other spfm command).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spfm.errors import DataError


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4`` and would give a string).

    Safe: only plain data (mappings, lists, strings, numbers, booleans, null), never Python objects.
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)


class _Strict(BaseModel):
    # strict=True: no silent coercion ("10" is not an int, 1 is not a bool); floats still accept ints (1 -> 1.0),
    # which YAML writers produce for round numbers.
    model_config = ConfigDict(extra="forbid", strict=True)


class DataConfig(_Strict):
    """Where batches come from (``spfm.data.loader.make_loader`` options).

    ``genes`` is the expression panel: ``"vocabulary"`` (every gene of the shards' vocabulary), a list of gene names,
    or a path to a text file with one gene per line. Panel genes missing from the vocabulary are an error unless
    ``allow_missing_genes`` (they would be unmeasured everywhere). ``image_size`` resizes batches on the device
    (antialiased bilinear) before the backbone, e.g. to pretrain at 112 px from 224 px shards; None keeps the shards'
    patch size.
    """

    shards: str
    train_split: str = "train"
    genes: list[str] | str = "vocabulary"
    allow_missing_genes: bool = False
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(0, ge=0)
    shuffle: int = Field(1000, ge=0)
    resampled: bool = False
    epoch_size: int | None = Field(None, ge=1)
    augment: bool = False
    image_size: int | None = Field(None, ge=8)
    log1p: bool = False
    target_sum: float | None = Field(None, gt=0)
    drop_last: bool = True


class FinetuneConfig(_Strict):
    """Which backbone parameters train (``spfm.models.finetune.prepare_for_finetuning``)."""

    mode: Literal["full", "frozen", "last_k", "lora"] = "full"
    k: int = Field(1, ge=1)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)


class ModelConfig(_Strict):
    """The backbone: ``create_backbone(backbone, pretrained=..., checkpoint=..., img_size=..., **kwargs)``."""

    backbone: str
    pretrained: bool = False
    checkpoint: str | None = None
    img_size: int | None = Field(None, ge=8)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


class ObjectiveConfig(_Strict):
    """One objective: ``build_objective(name, embed_dim=..., n_genes=..., **options)``, its loss times ``weight``."""

    name: str
    weight: float = Field(1.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(_Strict):
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr`` over ``max_steps`` optimiser steps."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(ge=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_accum: int = Field(1, ge=1)
    clip_grad_norm: float | None = Field(1.0, gt=0)


class EvalConfig(_Strict):
    """Evaluate the objectives on a held-out split (by patient in spfm shards) every ``every`` steps and at the end."""

    split: str = "val"
    every: int = Field(ge=1)
    max_batches: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)


class Recipe(_Strict):
    """A whole training run. ``spfm train RECIPE.yaml`` validates the file against this model first."""

    data: DataConfig
    model: ModelConfig
    objectives: list[ObjectiveConfig] = Field(min_length=1)
    optim: OptimConfig
    eval: EvalConfig | None = None
    precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    output_dir: str
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int | None = Field(3, ge=1)
    tracker: Literal["tensorboard", "none"] = "tensorboard"
    log_every: int = Field(10, ge=1)
    progress: bool = True
    ddp_find_unused_parameters: bool = False

    @field_validator("precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `no` (as in `--set precision=no`) as false
        return "no" if value is False else value

    @model_validator(mode="after")
    def _distinct_objectives(self) -> Recipe:
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives are listed more than once: {names}")
        return self


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"``; integer parts index lists (``objectives.0.weight``)."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise DataError(f"{'.'.join(parts[:i])} has {len(node)} entries; {part!r} is not one of them",
                                field=dotted)
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise DataError(f"{'.'.join(parts[:i])} is not a section", field=dotted)
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}  # a new section; pydantic rejects it later if the name is unknown
            node = node[key]


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings (values parsed as YAML: ``3``, ``1e-4``, ``true``, ``[a, b]``) in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"an override must look like key.path=value, got {item!r}", field="--set")
        try:
            value = _yaml(text)
        except yaml.YAMLError as exn:
            raise DataError(f"cannot parse the value of {key!r}: {exn}", field=key.strip()) from exn
        _set_path(tree, key.strip(), value)
    return tree


def _format(error: ValidationError, source: str | None) -> DataError:
    """A DataError listing every invalid key path (pydantic's ``loc``) and why."""
    lines = []
    for err in error.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(recipe)"
        lines.append(f"  {where}: {err['msg']}" + (f" (got {err['input']!r})" if err["type"] != "missing" else ""))
    first = ".".join(str(p) for p in error.errors()[0]["loc"]) if error.errors() else None
    return DataError("invalid recipe:\n" + "\n".join(lines), path=source, field=first)


def load_recipe(source: str | Path | Mapping[str, Any] | Recipe, overrides: Iterable[str] = ()) -> Recipe:
    """Read and validate a recipe.

    Args:
        source: a YAML file, a mapping with the recipe's content, or a :class:`Recipe` (overrides then apply to its
            dump).
        overrides: ``key.path=value`` strings applied before validation (``optim.max_steps=10``).

    Raises:
        DataError: the file is missing or not YAML, or a key is unknown, missing or of the wrong type; the message
            names every offending key path.
    """
    path: str | None = None
    if isinstance(source, Recipe):
        tree = source.model_dump(mode="python")
    elif isinstance(source, Mapping):
        tree = dict(source)
    else:
        path = str(source)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exn:
            raise DataError(f"cannot read the recipe: {exn.strerror}", path=path) from exn
        try:
            tree = _yaml(text)  # a safe loader: a recipe cannot construct Python objects
        except yaml.YAMLError as exn:
            raise DataError(f"not valid YAML: {exn}", path=path) from exn
        if not isinstance(tree, dict):
            raise DataError("a recipe must be a mapping of sections", path=path)
    tree = _deep_copy(tree)
    try:
        apply_overrides(tree, overrides)
    except DataError as exn:
        raise DataError(str(exn), path=path, field=exn.field) from exn
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exn:
        raise _format(exn, path) from None


def _deep_copy(tree: Any) -> Any:
    """Copy nested dicts and lists so overrides never change the caller's mapping."""
    if isinstance(tree, Mapping):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_deep_copy(v) for v in tree]
    return tree
