"""The training loop: a recipe in, a trained backbone and its metrics out, on one CPU, one GPU or many processes.

Accelerate does devices, processes and precision: the same ``train(recipe)`` runs in a plain ``python`` process or
under ``accelerate launch`` (DDP). The loop counts *optimiser steps*; each takes ``optim.grad_accum`` batches.

Data order and resuming
    The shard loader is not a ``DataLoader`` Accelerate can shard: it splits shards across ranks itself
    (``split_by_node``) or resamples them per rank, so it stays out of ``accelerator.prepare`` and each rank reads
    its own stream. Each rank's stream is a sequence of passes (epochs); a pass's order is a function of
    ``(seed, epoch, rank, worker)`` only. When a rank's pass ends, it starts the next one, so every rank takes
    exactly the same number of steps even when their shares differ in size (no DDP hang on uneven data).
    A checkpoint records, per rank, the pass and the number of batches consumed from it; ``resume=True`` loads the
    latest complete checkpoint (weights, optimiser, scheduler, RNG states via ``accelerator.load_state``), sets the
    pass and skips the consumed batches. WebDataset streams cannot seek, so skipping reads (and decodes) those
    batches again; at most one pass is re-read. The result is the run that was never interrupted: same batches,
    same augmentations, same dropout, same weights (tested bitwise on CPU).

Checkpoints
    ``OUTPUT/checkpoints/checkpoint_<i>/`` from ``accelerator.save_state`` (automatic naming, ``keep_last`` kept),
    plus ``training_state.json`` (step, per-rank data position) written last: a folder without it was interrupted
    while saving and is ignored (and removed) on resume. A killed run loses at most ``checkpoint_every`` steps.

Outputs
    ``OUTPUT/final/`` is a registry checkpoint: ``model.safetensors`` (the trunk, LoRA merged) and ``config.json``
    (as ``save_backbone`` writes it, plus backbone name, embed_dim, mean/std, image size, gene panel and the
    recipe), so ``create_backbone(name, checkpoint="OUTPUT/final")`` rebuilds the trained backbone; also
    ``objectives.safetensors`` (the heads). ``OUTPUT/metrics.json`` holds the final metrics; TensorBoard logs go
    under ``OUTPUT/logs/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spfm.atomic import atomic_path, atomic_write_json
from spfm.errors import DataError, SpfmError
from spfm.train.recipe import DataConfig, ModelConfig, Recipe, load_recipe

log = logging.getLogger(__name__)

STATE_NAME = "training_state.json"
FINAL_DIR = "final"
METRICS_NAME = "metrics.json"


class NonFiniteLossError(SpfmError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------------
# Data


def _read_panel(data: DataConfig, vocabulary: list[str], manifest_path: Path) -> list[str] | None:
    """The panel as a list of gene names (None: the whole vocabulary); missing genes are an error by default."""
    if isinstance(data.genes, list):
        genes = data.genes
    elif data.genes == "vocabulary":
        return None
    else:
        path = Path(data.genes)
        try:
            genes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exn:
            raise DataError(f"cannot read the gene panel: {exn.strerror}", path=path, field="data.genes") from exn
        if not genes:
            raise DataError("the gene panel file is empty", path=path, field="data.genes")
    known = set(vocabulary)
    missing = [g for g in genes if g not in known]
    if missing and not data.allow_missing_genes:
        raise DataError(
            f"{len(missing)} of the {len(genes)} panel genes are not in the shards' vocabulary of {len(vocabulary)} "
            f"genes (first: {missing[:10]}); fix the panel or set data.allow_missing_genes: true to train them as "
            f"unmeasured",
            path=manifest_path,
            field="genes",
        )
    return genes


def make_train_loader(data: DataConfig, *, seed: int, split: str | None = None, training: bool = True,
                      batch_size: int | None = None):
    """The shard loader of a recipe's data section (a :class:`spfm.data.loader.ShardLoader`).

    Training loaders shuffle, augment and may resample as the recipe says; evaluation loaders (``training=False``)
    read the split once in manifest order, without augmentation, keeping the last short batch.
    """
    from spfm.data.loader import _load_manifest, make_loader

    manifest_path, manifest = _load_manifest(data.shards)
    genes = _read_panel(data, [str(g) for g in manifest["genes"]], manifest_path)
    return make_loader(
        data.shards,
        split=split or data.train_split,
        genes=genes,
        batch_size=batch_size or data.batch_size,
        shuffle=data.shuffle if training else 0,
        resampled=data.resampled if training else False,
        augment=data.augment if training else False,
        num_workers=data.num_workers,
        epoch_size=data.epoch_size if training else None,
        seed=seed,
        log1p=data.log1p,
        target_sum=data.target_sum,
        drop_last=data.drop_last if training else False,
    )


class _BatchStream:
    """Endless batches from a loader, pass after pass, remembering where it is (pass, batches consumed).

    Args:
        loader: a ShardLoader.
        epoch, consumed: the position to start from (from a checkpoint); ``consumed`` batches of pass ``epoch`` are
            read and dropped first.
    """

    def __init__(self, loader: Any, *, epoch: int = 0, consumed: int = 0, rank: int = 0) -> None:
        self.loader = loader
        self.epoch = epoch
        self.consumed = consumed
        self.rank = rank
        self._iter: Iterator[dict[str, Any]] | None = None

    def _start(self) -> None:
        self.loader.set_epoch(self.epoch)
        # Making an iterator (the DataLoader's base seed) and reading batches draw from the global torch RNG. Fork
        # it around both: a new pass then leaves the model's RNG stream as it was, and so does skipping the batches
        # a checkpoint had consumed, whose draws the RNG state restored by load_state already includes.
        with torch.random.fork_rng(devices=[]):
            self._iter = iter(self.loader)
            for i in range(self.consumed):
                if next(self._iter, None) is None:
                    raise DataError(f"cannot resume: pass {self.epoch} of rank {self.rank} has {i} batches, the "
                                    f"checkpoint says {self.consumed} were consumed (did the shards change?)")

    def next(self) -> dict[str, Any]:
        """The next batch, starting the next pass when this one ends."""
        if self._iter is None:
            self._start()
        batch = next(self._iter, None)
        if batch is None:
            if self.consumed == 0:
                raise DataError(f"rank {self.rank} got no batches from the training split: fewer shards than ranks "
                                f"or fewer records than one batch; use data.resampled: true with data.epoch_size, "
                                f"or a smaller batch")
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start()
            return self.next()
        self.consumed += 1
        return batch

    def position(self) -> dict[str, int]:
        return {"rank": self.rank, "epoch": self.epoch, "consumed": self.consumed}


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to ``device`` (images made contiguous NCHW so every backbone can ``.view`` them); lists stay."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key == "image":
                value = value.contiguous()
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# Model


class TrainModule(nn.Module):
    """The backbone and the weighted objectives as one module, so DDP wraps (and syncs) everything trained together.

    ``forward(batch)`` resizes ``batch["image"]`` (B, 3, H, W) in [0, 1] to ``image_size`` when given, normalises
    it, embeds it (B, D) and returns ``{"loss": weighted sum (0-d), "<objective>/<metric>": 0-d tensors}``
    (:class:`spfm.models.objectives.CombinedObjective`). Objectives see the batch with ``"image"`` replaced by the
    tensor the backbone embedded.
    """

    def __init__(self, backbone: nn.Module, objectives: Mapping[str, nn.Module], weights: Mapping[str, float],
                 image_size: int | None = None) -> None:
        from spfm.models.objectives import combine

        super().__init__()
        self.backbone = backbone
        self.objectives = combine(objectives, weights)
        self.image_size = image_size

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        if self.image_size is not None and images.shape[-2:] != (self.image_size, self.image_size):
            images = nn.functional.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                               antialias=True, align_corners=False)
        images = self.backbone.normalize(images)
        return self.objectives(self.backbone(images), {**batch, "image": images}, self.backbone)


def build_backbone(model: ModelConfig) -> nn.Module:
    """The recipe's backbone, with the fine-tuning mode applied; a checkpoint that does not fit is a DataError."""
    from spfm.models.backbones import create_backbone

    kwargs = dict(model.kwargs)
    if model.img_size is not None:
        kwargs["img_size"] = model.img_size
    if model.checkpoint is not None and not Path(model.checkpoint).exists():
        raise DataError("the checkpoint does not exist", path=model.checkpoint, field="model.checkpoint")
    try:
        backbone = create_backbone(model.backbone, pretrained=model.pretrained, checkpoint=model.checkpoint, **kwargs)
    except RuntimeError as exn:
        if model.checkpoint is not None and ("state_dict" in str(exn) or "size mismatch" in str(exn)):
            first = str(exn).strip().splitlines()
            raise DataError(f"the checkpoint does not fit backbone {model.backbone!r} (another architecture or "
                            f"image size?): {' '.join(first[:3])[:500]}", path=model.checkpoint,
                            field="model.checkpoint") from exn
        raise
    ft = model.finetune
    if ft.mode != "full":
        from spfm.models.finetune import prepare_for_finetuning

        backbone = prepare_for_finetuning(backbone, mode=ft.mode, k=ft.k, lora_r=ft.lora_r, lora_alpha=ft.lora_alpha,
                                          lora_dropout=ft.lora_dropout)
    return backbone


def build_objectives(recipe: Recipe, *, embed_dim: int, n_genes: int) -> dict[str, nn.Module]:
    """``{name: Objective}`` from the recipe (``spfm.models.objectives.build_objective``)."""
    from spfm.models import objectives as registry

    return {cfg.name: registry.build_objective(cfg.name, embed_dim=embed_dim, n_genes=n_genes, **cfg.options)
            for cfg in recipe.objectives}


def _lr_lambda(optim_cfg) -> Any:
    """Multiplier of the base learning rate at each step: linear warm-up, then cosine to ``min_lr_ratio``."""
    warmup, total, floor = optim_cfg.warmup_steps, optim_cfg.max_steps, optim_cfg.min_lr_ratio
    cosine = optim_cfg.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (1-D or named so)."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith((".bias", "cls_token", "reg_token", "pos_embed", "temperature")):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_index(path: Path) -> int:
    match = re.fullmatch(r"checkpoint_(\d+)", path.name)
    return int(match[1]) if match else -1


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (one with ``training_state.json``) under ``OUTPUT/checkpoints``."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if _checkpoint_index(p) >= 0 and (p / STATE_NAME).is_file()]
    return max(done, key=_checkpoint_index) if done else None


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe -> flat {"optim.lr": 1e-4} with TensorBoard-friendly values (lists and None as text)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop


def train(recipe: str | Path | Mapping[str, Any] | Recipe, *, resume: bool = False,
          overrides: Iterable[str] = (), stop_after: int | None = None) -> dict[str, Any]:
    """Train as a recipe says; ``spfm train RECIPE.yaml [--resume] [--set key=value ...]``.

    Args:
        recipe: a YAML file, a mapping or a :class:`Recipe`.
        resume: continue from the latest complete checkpoint in ``output_dir`` (start fresh if there is none).
        overrides: ``key.path=value`` strings applied to the recipe before validation.
        stop_after: end this invocation after this optimiser step, with a checkpoint there, as a job with a wall-time
            limit does; the schedule still spans ``optim.max_steps`` and ``resume=True`` carries on. No ``final/``
            weights are written until ``max_steps`` is reached.

    Returns:
        The final metrics (also written to ``OUTPUT/metrics.json``): ``step``, ``loss`` (mean of the last logging
        window over all ranks), ``eval/...`` when the recipe evaluates, ``seconds``, ``images_per_s``.

    Raises:
        DataError: an invalid recipe, gene panel, shard set or checkpoint, before training starts.
        NonFiniteLossError: the loss became NaN or infinite (the message names the step and the batch keys).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, gather_object, set_seed
    from tqdm.auto import tqdm

    cfg = load_recipe(recipe, overrides)
    out_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with="tensorboard" if cfg.tracker == "tensorboard" else None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs"),
                                            automatic_checkpoint_naming=True, total_limit=cfg.keep_last),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters)],
    )
    rank = accelerator.process_index
    set_seed(cfg.seed)

    # Everything that can be wrong with the inputs fails here, before the first step.
    loader = make_train_loader(cfg.data, seed=cfg.seed)
    genes = list(loader.dataset.genes)
    eval_loader = None
    if cfg.eval is not None:
        eval_loader = make_train_loader(cfg.data, seed=cfg.seed, split=cfg.eval.split, training=False,
                                        batch_size=cfg.eval.batch_size)
    backbone = build_backbone(cfg.model)
    objectives = build_objectives(cfg, embed_dim=backbone.embed_dim, n_genes=len(genes))
    module = TrainModule(backbone, objectives, {o.name: o.weight for o in cfg.objectives}, cfg.data.image_size)
    groups = _param_groups(module, cfg.optim.weight_decay)
    if not any(group["params"] for group in groups):
        raise DataError("nothing to train: every parameter is frozen", field="model.finetune")
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    # Stepped by hand once per optimiser step (Accelerate's prepared scheduler would step once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.optim))
    model, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    step, positions = 0, None
    if resume:
        step, positions = _resume(accelerator, out_dir)
    elif (out_dir / "checkpoints").is_dir() and any((out_dir / "checkpoints").iterdir()):
        raise DataError("the output folder holds checkpoints of an earlier run: resume it (resume=True, --resume) or "
                        "choose another output_dir", path=out_dir / "checkpoints", field="output_dir")
    position = positions[rank] if positions else {"epoch": 0, "consumed": 0}
    stream = _BatchStream(loader, epoch=position["epoch"], consumed=position["consumed"], rank=rank)

    if cfg.tracker != "none":
        accelerator.init_trackers("spfm", config=_flat(cfg.model_dump(mode="json")))
    bar = tqdm(total=cfg.optim.max_steps, initial=step, desc="train", dynamic_ncols=True,
               disable=not (accelerator.is_main_process and cfg.progress))
    window: dict[str, list[float]] = {}
    last_checkpoint = latest_checkpoint(out_dir) if resume else None
    start_step, images, start = step, 0, time.perf_counter()
    metrics: dict[str, Any] = {}
    model.train()
    end = cfg.optim.max_steps if stop_after is None else min(stop_after, cfg.optim.max_steps)
    while step < end:
        micro_losses, micro_keys, micro_out = [], [], []
        for _ in range(cfg.optim.grad_accum):
            batch = _to_device(stream.next(), accelerator.device)
            images += batch["image"].shape[0]
            with accelerator.accumulate(model):
                out = model(batch)
                accelerator.backward(out["loss"])
                micro_losses.append(out["loss"].detach())
                micro_keys.append(batch.get("key", []))
                micro_out.append(out)
                if accelerator.sync_gradients:
                    # One gather per step: every rank learns whether any rank's loss is bad, so all stop together.
                    losses = accelerator.gather(torch.stack(micro_losses)).float().cpu()
                    if not torch.isfinite(losses).all():
                        _raise_non_finite(step + 1, rank, micro_losses, micro_keys, micro_out, last_checkpoint)
                    if cfg.optim.clip_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:  # fp16: an overflowing step changes nothing
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        window.setdefault("loss", []).append(float(losses.mean()))
        names = [key for key in micro_out[0] if key != "loss"]
        if names:  # one device-to-host copy for all of this step's metrics
            values = torch.stack([torch.stack([out[k] for k in names]) for out in micro_out]).mean(0).tolist()
            for key, value in zip(names, values):
                window.setdefault(key, []).append(value)
        if step % cfg.log_every == 0 or step == cfg.optim.max_steps:
            metrics = {key: sum(v) / len(v) for key, v in window.items()}
            metrics["lr"] = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{metrics['loss']:.4g}")
            accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
            window = {}
        if eval_loader is not None and (step % cfg.eval.every == 0 or step == cfg.optim.max_steps):
            evaluated = evaluate(accelerator, model, eval_loader, cfg.eval.max_batches)
            accelerator.log(evaluated, step=step)
            metrics.update(evaluated)
            model.train()
        if step % cfg.checkpoint_every == 0 or step == end:
            last_checkpoint = save_checkpoint(accelerator, step, stream, gather_object)
    bar.close()
    seconds = time.perf_counter() - start
    if eval_loader is not None and step == start_step:
        metrics.update(evaluate(accelerator, model, eval_loader, cfg.eval.max_batches))
    metrics = {k: v for k, v in metrics.items() if k not in ("lr",)}
    metrics.update(step=step, seconds=seconds,
                   images_per_s=images * accelerator.num_processes / seconds if seconds > 0 and images else None)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and step == cfg.optim.max_steps:
        save_final(accelerator.unwrap_model(model), cfg, genes, out_dir / FINAL_DIR, step)
        atomic_write_json(out_dir / METRICS_NAME, metrics)
    accelerator.wait_for_everyone()
    # Not accelerator.end_training(): it also destroys the process group, which a second train() in the same
    # processes (a notebook, a sweep) still needs. python -m spfm.train destroys it before exiting.
    for tracker in accelerator.trackers:
        tracker.finish()
    return metrics


def _raise_non_finite(step: int, rank: int, losses: list[torch.Tensor], keys: list[list[str]],
                      outs: list[dict[str, torch.Tensor]], last_checkpoint: Path | None) -> None:
    """Raise NonFiniteLossError naming the step, the micro-batch and its keys, and the checkpoint that is kept."""
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    for i, loss in enumerate(losses):
        if not torch.isfinite(loss):
            parts = {k: float(v) for k, v in outs[i].items() if k != "loss"}
            shown = ", ".join(keys[i][:8]) + (f", ... ({len(keys[i])} keys)" if len(keys[i]) > 8 else "")
            raise NonFiniteLossError(f"non-finite loss {float(loss)} at step {step} (micro-batch {i + 1}) on rank "
                                     f"{rank}; objectives: {parts}; batch keys: [{shown}]; stopped, {kept}")
    raise NonFiniteLossError(f"non-finite loss at step {step} on another rank than {rank}; stopped, {kept}")


@contextlib.contextmanager
def _rank_local(module: nn.Module) -> Iterator[None]:
    """Turn off the ``gather`` option of objectives that have one (contrastive) for the duration.

    In training every rank takes the same number of steps, so an objective may gather across ranks in its
    forward. Evaluation ranks read their own shards, as many or as few as they hold (none, with fewer shards than
    ranks), so each scores its batches on their own and only the sums are pooled.
    """
    swapped = []
    for objective in module.modules():
        options = getattr(objective, "options", None)
        if getattr(options, "gather", False):
            swapped.append((objective, options))
            objective.options = options.model_copy(update={"gather": False})
    try:
        yield
    finally:
        for objective, options in swapped:
            objective.options = options


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, loader: Any, max_batches: int | None = None) -> dict[str, float]:
    """Mean of every scalar the objectives return over a held-out split, all ranks pooled (``eval/<name>``).

    Each rank evaluates its share of the split's shards (up to ``max_batches`` batches) with the unwrapped module
    and objectives kept rank-local (see :func:`_rank_local`); the per-rank sums are gathered once at the end.
    """
    from accelerate.utils import gather_object

    module = accelerator.unwrap_model(model)  # no DDP forward: ranks run different numbers of eval batches
    module.eval()
    sums: dict[str, float] = {}
    count = 0
    with _rank_local(module):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = _to_device(batch, accelerator.device)
            n = batch["image"].shape[0]
            with accelerator.autocast():
                out = module(batch)
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
            count += n
    pooled = gather_object([(sums, count)])
    total = sum(c for _, c in pooled)
    if total == 0:
        raise DataError("the evaluation split gave no batches", field="eval.split")
    keys = sorted({k for s, _ in pooled for k in s})
    return {f"eval/{k}": sum(s.get(k, 0.0) for s, _ in pooled) / total for k in keys}


def save_checkpoint(accelerator: Any, step: int, stream: _BatchStream, gather_object: Any) -> Path:
    """``accelerator.save_state`` then ``training_state.json`` (step and every rank's data position), last."""
    location = Path(accelerator.save_state())
    positions = sorted(gather_object([stream.position()]), key=lambda p: p["rank"])
    if accelerator.is_main_process:
        atomic_write_json(location / STATE_NAME, {"step": step, "world_size": accelerator.num_processes,
                                                  "positions": positions})
    accelerator.wait_for_everyone()
    return location


def _resume(accelerator: Any, out_dir: Path) -> tuple[int, list[dict[str, int]] | None]:
    """Load the latest complete checkpoint; returns its step and per-rank data positions ((0, None) if none)."""
    latest = latest_checkpoint(out_dir)
    if accelerator.is_main_process:
        # Folders newer than the latest complete one were cut off while saving: remove them so numbering goes on.
        folder = out_dir / "checkpoints"
        for path in folder.iterdir() if folder.is_dir() else ():
            if _checkpoint_index(path) > (_checkpoint_index(latest) if latest else -1):
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    if latest is None:
        log.warning("resume: no complete checkpoint in %s; starting from step 0", out_dir / "checkpoints")
        return 0, None
    state = json.loads((latest / STATE_NAME).read_text())
    if state["world_size"] != accelerator.num_processes:
        raise DataError(f"the checkpoint was written by {state['world_size']} processes, this run has "
                        f"{accelerator.num_processes}; the data positions do not carry over", path=latest,
                        field="world_size")
    try:
        accelerator.load_state(str(latest))
    except (RuntimeError, KeyError) as exn:
        raise DataError(f"cannot load the checkpoint into this recipe's model (another architecture or objective "
                        f"set?): {str(exn)[:500]}", path=latest) from exn
    accelerator.project_configuration.iteration = _checkpoint_index(latest) + 1
    log.info("resumed from %s at step %d", latest, state["step"])
    return int(state["step"]), state["positions"]


def save_final(module: TrainModule, cfg: Recipe, genes: list[str], folder: Path, step: int) -> None:
    """The trained backbone as a registry checkpoint, plus the objectives' heads, atomically.

    ``folder/model.safetensors`` + ``config.json`` come from :func:`spfm.models.backbones.registry.save_backbone`
    (LoRA adapters merged first), so ``create_backbone(name, checkpoint=folder)`` rebuilds the trained backbone with
    its image size; ``config.json`` also records embed_dim, mean/std, the gene panel, the step and the recipe.
    ``folder/objectives.safetensors`` holds the heads (``<objective>.<parameter>``). Merging changes the module in
    place: this runs once, after the last step.
    """
    from safetensors.torch import save_file

    from spfm.models.backbones.registry import save_backbone

    backbone = module.backbone
    if hasattr(backbone.trunk, "peft_config"):
        from spfm.models.finetune import merge_lora

        merge_lora(backbone)
    heads = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in module.objectives.objectives.state_dict().items()}
    spec = backbone.spec
    with atomic_path(folder, directory=True) as tmp:
        save_backbone(backbone, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.update(
            backbone=spec.name,
            embed_dim=int(backbone.embed_dim),
            mean=list(spec.mean),
            std=list(spec.std),
            img_size=cfg.model.img_size or spec.input_size,
            objectives=[o.model_dump(mode="json") for o in cfg.objectives],
            genes=genes,
            step=step,
            recipe=cfg.model_dump(mode="json"),
        )
        atomic_write_json(tmp / "config.json", config)
        if heads:
            save_file(heads, str(tmp / "objectives.safetensors"), metadata={"format": "pt"})
