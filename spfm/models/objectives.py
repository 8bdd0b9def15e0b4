"""Pretraining objectives for spatial omics: each a module with one documented loss, selectable by name.

The training loop embeds a batch once, ``embeddings = backbone(images)``, and calls every objective of the recipe
with it::

    result = objective(embeddings, batch, backbone)   # {"loss": 0-d tensor, "<metric>": detached 0-d tensors}

``batch`` is the loader's batch (``"expression"`` (B, G) float32, ``"mask"`` (B, G) bool, ``"key"``, ``"meta"``)
with ``"image"`` (B, 3, H, W) replaced by the tensor the backbone embedded: resized to the trunk's input side and
normalised with ``backbone.normalize`` (see ``spfm.train.loop.TrainModule``). Objectives that re-run the trunk
(``masked_image``) feed it that tensor as is.

Objectives (``build_objective(name, embed_dim=D, n_genes=G, **options)``; options are validated by a schema):

``contrastive`` (:class:`ContrastiveObjective`)
    Image-expression alignment, the BLEEP / OmiCLIP family: symmetric InfoNCE between projected patch embeddings
    and projected expression-encoder embeddings, with a learnable CLIP temperature. Across DDP ranks the
    embeddings are gathered so every rank sees the whole global batch as negatives.
``expression`` (:class:`ExpressionObjective`)
    Expression prediction: an MLP head (D -> hidden -> G), MSE against the expression of the measured genes only.
``masked_image`` (:class:`MaskedImageObjective`)
    SimMIM-style masked image modelling for corpora without expression: random patches are replaced by a learned
    mask token after the patch embedding, a linear decoder reconstructs their (per-patch normalised) pixels from
    the trunk's output tokens, L1 on the masked patches. Chosen over DINO-style self-distillation because it needs
    no EMA teacher, no second augmented view and no collapse-prevention tricks (centering, sharpening), and works
    directly on timm ViTs through ``patch_embed`` / ``_pos_embed`` / ``blocks`` / ``norm``.

Expression transform: the loader already offers ``log1p`` and ``target_sum`` (library size over *all* the spot's
genes), which the shipped recipes use (``data.log1p: true``), so the objectives take ``batch["expression"]`` as
delivered by default. Their ``log1p`` / ``target_sum`` options are for a loader that delivers raw counts
(``target_sum`` there normalises over the measured panel genes only, the only counts an objective sees). Do not
set both, or the counts are transformed twice.

:func:`combine` (:class:`CombinedObjective`) weights several objectives into one loss, with per-objective metrics
under ``"<name>/<metric>"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from spfm.errors import DataError, SpfmError

__all__ = [
    "OBJECTIVES",
    "CombinedObjective",
    "ContrastiveObjective",
    "ExpressionObjective",
    "MaskedImageObjective",
    "Objective",
    "build_objective",
    "combine",
    "masked_l1",
    "masked_mse",
    "symmetric_info_nce",
]


class _Options(BaseModel):
    """Base of the per-objective option schemas: unknown keys and wrong types are errors, never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _ExpressionTransform(_Options):
    log1p: bool = False
    target_sum: float | None = Field(None, gt=0)


class Objective(nn.Module):
    """A pretraining loss on a batch.

    Subclasses set ``name`` and ``Options`` (a pydantic schema of their keyword options) and implement
    ``forward(embeddings (B, D), batch, backbone) -> {"loss": 0-d tensor, other 0-d detached metrics}``.
    """

    name: ClassVar[str]
    Options: ClassVar[type[_Options]] = _Options

    def __init__(self, embed_dim: int, n_genes: int, **options: Any) -> None:
        super().__init__()
        if not (isinstance(embed_dim, int) and embed_dim > 0):
            raise DataError(f"objective {self.name!r}: embed_dim must be a positive integer, got {embed_dim!r}",
                            field="embed_dim")
        if not (isinstance(n_genes, int) and n_genes >= 0):
            raise DataError(f"objective {self.name!r}: n_genes must be a non-negative integer, got {n_genes!r}",
                            field="n_genes")
        self.embed_dim = embed_dim
        self.n_genes = n_genes
        self.options = self._validate(options)

    @classmethod
    def _validate(cls, options: Mapping[str, Any]) -> _Options:
        """The options checked against :attr:`Options`; a DataError naming the first bad option otherwise."""
        try:
            return cls.Options(**options)
        except ValidationError as exc:
            err = exc.errors()[0]
            option = ".".join(str(part) for part in err["loc"]) or "options"
            known = ", ".join(cls.Options.model_fields) or "none"
            raise DataError(f"objective {cls.name!r}: option {option!r}: {err['msg']} (got {err.get('input')!r}; "
                            f"options: {known})", field=f"options.{option}") from None


def _transform_expression(expression: Tensor, mask: Tensor, opts: _ExpressionTransform) -> Tensor:
    """(B, G) expression -> (B, G) float32 with unmeasured entries zeroed, optionally scaled and log1p'd.

    ``target_sum`` scales each spot so its *measured* panel counts sum to it (a spot with none stays zero).
    """
    x = torch.where(mask, expression.float(), torch.zeros((), device=expression.device))
    if opts.target_sum is not None:
        x = x * (opts.target_sum / x.sum(dim=1, keepdim=True).clamp(min=1e-12))
    if opts.log1p:
        x = torch.log1p(x)
    return x


def _check_expression(batch: Mapping[str, Any], n_genes: int, name: str) -> tuple[Tensor, Tensor]:
    """``batch["expression"]`` (B, G) and ``batch["mask"]`` (B, G) bool, with the panel size this objective has."""
    for key in ("expression", "mask"):
        if key not in batch:
            raise DataError(f"objective {name!r} needs batch[{key!r}] (an image-only corpus can only train "
                            f"'masked_image')", field=key)
    expression, mask = batch["expression"], batch["mask"]
    if expression.dim() != 2 or expression.shape[1] != n_genes or mask.shape != expression.shape:
        raise DataError(f"objective {name!r} was built for {n_genes} genes; the batch has expression "
                        f"{tuple(expression.shape)} and mask {tuple(mask.shape)}", field="expression")
    return expression, mask.bool()


# ----------------------------------------------------------------------------------------------------------------
# Contrastive


class _ProjectionHead(nn.Module):
    """BLEEP's projection head: (N, in_dim) -> (N, out_dim); linear, GELU, linear, dropout, residual, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        projected = self.project(x)
        return self.norm(projected + self.dropout(self.fc(F.gelu(projected))))


def symmetric_info_nce(a: Tensor, b: Tensor, logit_scale: Tensor, *, a_all: Tensor | None = None,
                       b_all: Tensor | None = None, offset: int = 0) -> tuple[Tensor, Tensor]:
    """CLIP's symmetric InfoNCE between L2-normalised embeddings; returns (loss, top-1 accuracy a -> b).

    Args:
        a, b: (N, d) local embeddings, row i of ``a`` paired with row i of ``b``, already L2-normalised.
        logit_scale: 0-d, the inverse temperature (``exp`` of the learnt parameter, clamped).
        a_all, b_all: (M, d) the embeddings of the global batch (all ranks) the local rows are scored against;
            default the local ones. Local row i's positive is global row ``offset + i``.

    The loss is the mean of the cross-entropy of ``a`` against ``b_all`` and of ``b`` against ``a_all``; it is
    symmetric in (a, b), and equals ``log(M)`` when all similarities are equal. Logits are computed in float32
    even under autocast: with a logit scale up to 100, bf16 similarities would be too coarse.
    """
    a_all = a if a_all is None else a_all
    b_all = b if b_all is None else b_all
    labels = torch.arange(a.shape[0], device=a.device) + offset
    with torch.autocast(device_type=a.device.type, enabled=False):
        scale = logit_scale.float()
        logits_ab = scale * a.float() @ b_all.float().T
        logits_ba = scale * b.float() @ a_all.float().T
    loss = (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2
    accuracy = (logits_ab.argmax(dim=1) == labels).float().mean()
    return loss, accuracy


def _gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """(N_local, d) -> ((N_total, d) rows of all ranks in rank order, offset of this rank's rows).

    ``torch.distributed.nn.functional.all_gather`` is differentiable: the gradient of every rank's loss w.r.t. this
    rank's rows flows back here (summed), so with DDP's gradient averaging the parameters get the gradient of the
    mean of the per-rank losses. Ranks may hold different batch sizes (the last batch of an epoch): rows are padded
    to the largest and the padding is cut off again.
    """
    from torch.distributed.nn.functional import all_gather  # only where torch.distributed is available

    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = F.pad(x, (0, 0, 0, max(counts) - x.shape[0]))
    parts = all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]), sum(counts[:rank])


class ContrastiveOptions(_ExpressionTransform):
    #: size of the shared embedding space both sides are projected to.
    proj_dim: int = Field(256, gt=0)
    #: width of the expression encoder MLP.
    hidden_dim: int = Field(512, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    #: initial temperature (CLIP: 0.07, i.e. logit scale 1 / 0.07).
    init_temperature: float = Field(0.07, gt=0)
    #: the logit scale is clamped at this value (CLIP: 100).
    max_logit_scale: float = Field(100.0, gt=1)
    learn_temperature: bool = True
    #: under torch.distributed, score each rank's rows against the whole global batch.
    gather: bool = True


class ContrastiveObjective(Objective):
    """Symmetric InfoNCE between a patch and the expression measured under it (BLEEP, OmiCLIP).

    * Expression encoder: the (optionally transformed) expression with unmeasured genes zeroed, concatenated with
      the mask itself (so "not measured" differs from "zero counts"), (B, 2G) -> Linear -> GELU -> dropout ->
      Linear -> (B, hidden_dim).
    * Projection heads (BLEEP's) map the patch embedding (B, D) and the encoder output to (B, proj_dim); both
      are L2-normalised.
    * Loss: :func:`symmetric_info_nce` with logit scale ``exp(t)``, ``t`` learnt from ``log(1 / init_temperature)``
      and clamped at ``log(max_logit_scale)``. At chance (e.g. at init) the loss is about ``log(N)`` for N pairs.
    * Under ``torch.distributed`` (initialised, world size > 1) with ``gather``, the local rows are scored against
      the embeddings of all ranks (the global batch of negatives), gathered with gradient.

    Metrics: ``temperature`` (1 / logit scale), ``accuracy`` (top-1 patch -> expression retrieval in the batch the
    rows were scored against), ``negatives`` (that batch's size minus one).
    """

    name = "contrastive"
    Options = ContrastiveOptions
    options: ContrastiveOptions

    def __init__(self, embed_dim: int, n_genes: int, **options: Any) -> None:
        super().__init__(embed_dim, n_genes, **options)
        if n_genes < 1:
            raise DataError("objective 'contrastive' needs a gene panel (n_genes >= 1)", field="n_genes")
        o = self.options
        self.expression_encoder = nn.Sequential(nn.Linear(2 * n_genes, o.hidden_dim), nn.GELU(), nn.Dropout(o.dropout),
                                                nn.Linear(o.hidden_dim, o.hidden_dim))
        self.image_projection = _ProjectionHead(embed_dim, o.proj_dim, o.dropout)
        self.expression_projection = _ProjectionHead(o.hidden_dim, o.proj_dim, o.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / o.init_temperature)),
                                        requires_grad=o.learn_temperature)

    def embed_expression(self, expression: Tensor, mask: Tensor) -> Tensor:
        """(B, G) expression and (B, G) bool mask -> (B, proj_dim) L2-normalised expression embeddings."""
        x = _transform_expression(expression, mask, self.options)
        h = self.expression_encoder(torch.cat([x, mask.float()], dim=1))
        return F.normalize(self.expression_projection(h).float(), dim=-1)

    def embed_image(self, embeddings: Tensor) -> Tensor:
        """(B, D) backbone embeddings -> (B, proj_dim) L2-normalised."""
        return F.normalize(self.image_projection(embeddings).float(), dim=-1)

    def forward(self, embeddings: Tensor, batch: Mapping[str, Any], backbone: nn.Module) -> dict[str, Tensor]:
        expression, mask = _check_expression(batch, self.n_genes, self.name)
        z_image = self.embed_image(embeddings)
        z_expr = self.embed_expression(expression, mask)
        scale = self.logit_scale.clamp(max=math.log(self.options.max_logit_scale)).exp()
        if self.options.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            image_all, offset = _gather_with_grad(z_image)
            expr_all, _ = _gather_with_grad(z_expr)
        else:
            image_all, expr_all, offset = z_image, z_expr, 0
        loss, accuracy = symmetric_info_nce(z_image, z_expr, scale, a_all=image_all, b_all=expr_all, offset=offset)
        return {"loss": loss, "temperature": (1.0 / scale).detach(), "accuracy": accuracy.detach(),
                "negatives": torch.tensor(float(image_all.shape[0] - 1), device=loss.device)}


# ----------------------------------------------------------------------------------------------------------------
# Expression prediction


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the measured entries only: (B, G), (B, G), (B, G) bool -> 0-d.

    Unmeasured entries contribute neither to the sum nor to the count (nor to the gradient); a batch with nothing
    measured gives 0 (with a zero gradient), not NaN.
    """
    err = torch.where(mask, (prediction.float() - target.float()) ** 2, torch.zeros((), device=prediction.device))
    return err.sum() / mask.sum().clamp(min=1)


class ExpressionOptions(_ExpressionTransform):
    hidden_dim: int = Field(512, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class ExpressionObjective(Objective):
    """Predict the panel's expression from the patch embedding.

    Head: (B, D) -> Linear -> GELU -> dropout -> Linear -> (B, G). Loss: :func:`masked_mse` against the expression
    (log1p counts with the shipped recipes' ``data.log1p: true``, or with this objective's ``log1p`` option),
    averaged over the measured (spot, gene) entries only. Metric: ``measured``, the fraction of measured entries.
    """

    name = "expression"
    Options = ExpressionOptions
    options: ExpressionOptions

    def __init__(self, embed_dim: int, n_genes: int, **options: Any) -> None:
        super().__init__(embed_dim, n_genes, **options)
        if n_genes < 1:
            raise DataError("objective 'expression' needs a gene panel (n_genes >= 1)", field="n_genes")
        o = self.options
        self.head = nn.Sequential(nn.Linear(embed_dim, o.hidden_dim), nn.GELU(), nn.Dropout(o.dropout),
                                  nn.Linear(o.hidden_dim, n_genes))

    def forward(self, embeddings: Tensor, batch: Mapping[str, Any], backbone: nn.Module) -> dict[str, Tensor]:
        expression, mask = _check_expression(batch, self.n_genes, self.name)
        target = _transform_expression(expression, mask, self.options)
        loss = masked_mse(self.head(embeddings), target, mask)
        return {"loss": loss, "measured": mask.float().mean().detach()}


# ----------------------------------------------------------------------------------------------------------------
# Masked image modelling


def masked_l1(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over the pixels of masked patches: (B, N, P), (B, N, P), (B, N) bool -> 0-d."""
    err = torch.where(mask.unsqueeze(-1), (prediction.float() - target.float()).abs(),
                      torch.zeros((), device=prediction.device))
    return err.sum() / (mask.sum().clamp(min=1) * prediction.shape[-1])


class MaskedImageOptions(_Options):
    #: fraction of patches masked per image (SimMIM: 0.6); at least one patch is masked and one kept.
    mask_ratio: float = Field(0.6, gt=0, lt=1)
    #: the trunk's patch side in pixels (checked against the trunk).
    patch_size: int = Field(16, gt=0)
    #: the trunk's token width; default the embed_dim (differs when the readout concatenates, e.g. "cls+mean").
    token_dim: int | None = Field(None, gt=0)
    #: reconstruct each patch's pixels standardised per channel within the patch (SimMIM's norm_target).
    norm_target: bool = True


class MaskedImageObjective(Objective):
    """SimMIM-style masked image modelling on a timm ViT trunk; never reads the batch's expression.

    For images (B, 3, H, W) with N = (H / p) * (W / p) patches:

    1. a random subset of ``round(mask_ratio * N)`` patches per image is masked (:meth:`sample_mask`);
    2. the trunk runs with those patches' embeddings (after ``patch_embed``, before the position embedding)
       replaced by a learned mask token (:meth:`predict`); the rest of the trunk is unchanged
       (``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``), so it is the backbone being trained;
    3. a linear decoder maps each output patch token to the patch's p * p * 3 pixels;
    4. the targets are the patches' pixels, standardised per channel within each patch (:meth:`targets`), and the
       loss is :func:`masked_l1` over the masked patches only.

    This runs its own (masked) forward pass through the trunk; the loop's ``embeddings`` are not used. Needs a timm
    VisionTransformer-like trunk (transformers trunks such as Phikon are not supported).
    """

    name = "masked_image"
    Options = MaskedImageOptions
    options: MaskedImageOptions

    def __init__(self, embed_dim: int, n_genes: int = 0, **options: Any) -> None:
        super().__init__(embed_dim, n_genes, **options)
        o = self.options
        self.token_dim = o.token_dim or embed_dim
        self.patch_size = o.patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.token_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(self.token_dim, o.patch_size * o.patch_size * 3)

    def _trunk(self, backbone: nn.Module) -> nn.Module:
        """The backbone's timm trunk, checked to fit this objective's patch size and token width."""
        trunk = getattr(backbone, "trunk", backbone)
        missing = [a for a in ("patch_embed", "_pos_embed", "blocks", "norm") if not hasattr(trunk, a)]
        if missing:
            raise SpfmError(f"objective 'masked_image' needs a timm VisionTransformer trunk; "
                            f"{type(trunk).__name__} has no {', '.join(missing)}")
        patch = trunk.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        if patch != self.patch_size:
            raise DataError(f"objective 'masked_image' was built for {self.patch_size}-px patches but the trunk's "
                            f"are {patch} px: set the option patch_size: {patch}", field="options.patch_size")
        width = getattr(trunk, "embed_dim", self.token_dim)
        if width != self.token_dim:
            raise DataError(f"objective 'masked_image' was built for {self.token_dim}-wide tokens but the trunk's "
                            f"are {width}: set the option token_dim: {width}", field="options.token_dim")
        return trunk

    def _grid(self, images: Tensor) -> tuple[int, int]:
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise DataError(f"objective 'masked_image': image side {h} x {w} is not a multiple of the patch size "
                            f"{self.patch_size}", field="image")
        return h // self.patch_size, w // self.patch_size

    def sample_mask(self, batch_size: int, n_patches: int, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> Tensor:
        """(B, N) bool, exactly ``round(mask_ratio * N)`` (clamped to [1, N - 1]) True per row, at random."""
        n_masked = min(max(round(self.options.mask_ratio * n_patches), 1), n_patches - 1)
        scores = torch.rand(batch_size, n_patches, generator=generator, device=device)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        return ranks < n_masked

    def targets(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, p * p * 3) patch pixels, row-major patch order (that of the trunk's tokens).

        With ``norm_target`` each patch is standardised per channel (mean 0, unit variance over its p * p pixels),
        which also makes the target independent of the input normalisation.
        """
        gh, gw = self._grid(images)
        p, b, c = self.patch_size, images.shape[0], images.shape[1]
        x = images.float().reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p, c)
        if self.options.norm_target:
            x = (x - x.mean(dim=2, keepdim=True)) / (x.var(dim=2, keepdim=True) + 1e-6).sqrt()
        return x.reshape(b, gh * gw, p * p * c)

    def predict(self, images: Tensor, mask: Tensor, backbone: nn.Module) -> Tensor:
        """Normalised images (B, 3, H, W) and a (B, N) bool mask -> reconstructed patches (B, N, p * p * 3).

        The patch embeddings where ``mask`` is True are replaced by the mask token, so the pixels of masked patches
        cannot reach the output.
        """
        trunk = self._trunk(backbone)
        gh, gw = self._grid(images)
        x = trunk.patch_embed(images)               # (B, N, C), or (B, gh, gw, C) with dynamic_img_size
        shape = x.shape
        x = x.reshape(shape[0], gh * gw, shape[-1])
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x).reshape(shape)
        x = trunk._pos_embed(x)
        x = trunk.patch_drop(x)
        x = trunk.norm_pre(x)
        x = trunk.blocks(x)
        x = trunk.norm(x)
        tokens = x[:, int(getattr(trunk, "num_prefix_tokens", 1)):]
        return self.decoder(tokens)

    def forward(self, embeddings: Tensor, batch: Mapping[str, Any], backbone: nn.Module) -> dict[str, Tensor]:
        images = batch["image"]
        gh, gw = self._grid(images)
        mask = self.sample_mask(images.shape[0], gh * gw, device=images.device)
        loss = masked_l1(self.predict(images, mask, backbone), self.targets(images), mask)
        return {"loss": loss, "mask_ratio": mask.float().mean().detach()}


# ----------------------------------------------------------------------------------------------------------------
# Registry and combination


OBJECTIVES: dict[str, type[Objective]] = {
    ContrastiveObjective.name: ContrastiveObjective,
    ExpressionObjective.name: ExpressionObjective,
    MaskedImageObjective.name: MaskedImageObjective,
}


def build_objective(name: str, *, embed_dim: int, n_genes: int, **options: Any) -> Objective:
    """An objective by registry name (:data:`OBJECTIVES`), its ``options`` validated by the objective's schema.

    Raises:
        DataError: an unknown name (the message lists the known ones) or a bad option (the message names it).
    """
    if name not in OBJECTIVES:
        raise DataError(f"unknown objective {name!r}; known objectives: {', '.join(sorted(OBJECTIVES))}",
                        field="name")
    return OBJECTIVES[name](embed_dim, n_genes, **options)


class CombinedObjective(nn.Module):
    """A weighted sum of objectives.

    ``forward(embeddings, batch, backbone)`` returns ``{"loss": sum_i w_i * loss_i}`` plus, for each objective,
    every 0-d tensor it returned, detached, under ``"<name>/<key>"`` (``"contrastive/loss"``,
    ``"contrastive/temperature"``, ...).
    """

    def __init__(self, objectives: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not objectives:
            raise DataError("no objectives to combine", field="objectives")
        weights = {} if weights is None else dict(weights)
        unknown = sorted(set(weights) - set(objectives))
        if unknown:
            raise DataError(f"weights for objectives that are not combined: {unknown}", field="weights")
        bad = {k: v for k, v in weights.items() if not (isinstance(v, (int, float)) and v > 0)}
        if bad:
            raise DataError(f"objective weights must be positive numbers: {bad}", field="weights")
        self.objectives = nn.ModuleDict(dict(objectives))
        self.weights = {name: float(weights.get(name, 1.0)) for name in objectives}

    def forward(self, embeddings: Tensor, batch: Mapping[str, Any], backbone: nn.Module) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, objective in self.objectives.items():
            result = objective(embeddings, batch, backbone)
            term = result["loss"].float() * self.weights[name]
            total = term if total is None else total + term
            for key, value in result.items():
                if isinstance(value, Tensor) and value.dim() == 0:
                    out[f"{name}/{key}"] = value.detach().float()
        assert total is not None  # at least one objective, checked in __init__
        out["loss"] = total
        return out


def combine(objectives: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None) -> CombinedObjective:
    """``CombinedObjective(objectives, weights)``; missing weights are 1."""
    return CombinedObjective(objectives, weights)
