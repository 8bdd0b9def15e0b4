"""Fine-tuning modes for a backbone: frozen, last-k blocks, full, or LoRA (peft) on the attention projections.

``prepare_for_finetuning(backbone, mode=...)`` sets which parameters train and returns the backbone; ``merge_lora``
folds LoRA adapters back into the base weights so the result is a plain backbone again (for export or embedding).
Works on timm ViTs (``blocks.N.attn.qkv`` / ``attn.proj``) and transformers ViT/DINOv2 models (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, or the older ``query``/``key``/``value``/``attention.output.dense``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from torch import nn

from spfm.errors import SpfmError
from spfm.models.backbones.registry import Backbone

log = logging.getLogger(__name__)

Mode = Literal["frozen", "last_k", "full", "lora"]

#: Name suffixes of attention projections, per library (and transformers version). The MLP's ``fc1``/``fc2`` and
#: the patch embedding's ``proj`` convolution are deliberately not matched.
ATTENTION_PROJECTIONS = (
    "attn.qkv", "attn.proj",                                           # timm VisionTransformer
    "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",  # transformers >= 5
    "attention.query", "attention.key", "attention.value", "attention.output.dense",  # transformers 4
)
_BLOCK_LISTS = ("blocks", "layers", "encoder.layer", "encoder.layers")
_FINAL_NORMS = ("norm", "fc_norm", "layernorm")


def count_parameters(module: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": n}`` parameter counts (shared parameters counted once)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in module.parameters())}


def attention_targets(trunk: nn.Module) -> list[str]:
    """The attention-projection suffixes of :data:`ATTENTION_PROJECTIONS` present as ``nn.Linear`` in ``trunk``."""
    names = [name for name, mod in trunk.named_modules() if isinstance(mod, nn.Linear)]
    found = [suffix for suffix in ATTENTION_PROJECTIONS if any(n == suffix or n.endswith("." + suffix) for n in names)]
    if not found:
        raise SpfmError(f"no attention projections found in {type(trunk).__name__} (looked for "
                        f"{', '.join(ATTENTION_PROJECTIONS)}); pass target_modules= explicitly")
    return found


def _blocks(trunk: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The trunk's transformer blocks in order (timm: ``blocks``, a Sequential; transformers: a ModuleList)."""
    for path in _BLOCK_LISTS:
        try:
            blocks = trunk.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            return blocks
    raise SpfmError(f"cannot find the transformer blocks of {type(trunk).__name__} (looked for "
                    f"{', '.join(_BLOCK_LISTS)})")


def prepare_for_finetuning(backbone: Backbone, mode: Mode = "frozen", *, k: int = 2, lora_r: int = 8,
                           lora_alpha: int = 16, lora_dropout: float = 0.0,
                           target_modules: Sequence[str] | None = None) -> Backbone:
    """Choose which backbone parameters train.

    Args:
        backbone: a :class:`Backbone`; modified in place and returned.
        mode: ``"frozen"`` (nothing trains: a fixed feature extractor), ``"last_k"`` (the last ``k`` transformer
            blocks and the final norm), ``"full"`` (everything), or ``"lora"`` (low-rank adapters of rank
            ``lora_r`` on the attention projections; the base weights stay frozen).
        k: blocks trained in ``"last_k"`` mode (1 <= k <= depth).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scaling numerator (scale = alpha / r) and dropout.
        target_modules: module-name suffixes to adapt in ``"lora"`` mode; default: the attention projections
            found in the trunk (:func:`attention_targets`).

    Returns:
        The same backbone. In ``"lora"`` mode its ``trunk`` is a ``peft.PeftModel`` wrapping the original trunk.
        ``backbone.finetune`` records the mode and the trainable/total parameter counts.
    """
    trunk = backbone.trunk
    if mode == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(trunk, PeftModel):
            raise SpfmError("backbone already has LoRA adapters; merge_lora() it first")
        targets = list(target_modules) if target_modules is not None else attention_targets(trunk)
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                            bias="none")
        backbone.trunk = get_peft_model(trunk, config)
    elif mode in ("frozen", "full"):
        trunk.requires_grad_(mode == "full")
    elif mode == "last_k":
        blocks = _blocks(trunk)
        if not 1 <= k <= len(blocks):
            raise SpfmError(f"last_k: k={k} but the backbone has {len(blocks)} blocks")
        trunk.requires_grad_(False)
        for block in blocks[len(blocks) - k:]:
            block.requires_grad_(True)
        # The final norm sits after the last block, so it belongs to what is being adapted.
        for name in _FINAL_NORMS:
            norm = getattr(trunk, name, None)
            if isinstance(norm, nn.Module):
                norm.requires_grad_(True)
    else:
        raise SpfmError(f"unknown fine-tuning mode {mode!r}; choose frozen, last_k, full or lora")
    counts = count_parameters(backbone.trunk)
    backbone.finetune = {"mode": mode, **counts}
    log.info("fine-tuning %s (%s): %d of %d parameters trainable (%.2f%%)", backbone.spec.name, mode,
             counts["trainable"], counts["total"], 100.0 * counts["trainable"] / max(counts["total"], 1))
    return backbone


def merge_lora(backbone: Backbone) -> Backbone:
    """Fold LoRA adapters into the base weights (W + B A * alpha / r) and unwrap the trunk, in place.

    The merged backbone computes the same function as the adapted one, has the original module tree and
    parameter names (so :func:`~spfm.models.backbones.registry.save_backbone` writes a checkpoint that
    ``create_backbone(name, checkpoint=...)`` reads), and has no peft dependency at inference.
    """
    from peft import PeftModel

    if not isinstance(backbone.trunk, PeftModel):
        raise SpfmError("backbone has no LoRA adapters to merge (prepare_for_finetuning(mode='lora') adds them)")
    backbone.trunk = backbone.trunk.merge_and_unload()
    backbone.finetune = {"mode": "merged", **count_parameters(backbone.trunk)}
    return backbone
