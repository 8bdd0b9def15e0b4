"""Fine-tuning modes: which parameters train, LoRA on the attention projections only, LoRA training leaves the base
weights alone, and merging folds the adapters into a plain backbone that computes the same function."""

from __future__ import annotations

import re

import pytest
import torch

from spfm.errors import SpfmError
from spfm.models.backbones import create_backbone
from spfm.models.backbones.registry import save_backbone
from spfm.models.finetune import attention_targets, merge_lora, prepare_for_finetuning


def _tiny(depth: int = 4):
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", img_size=32, depth=depth)


def _trainable(backbone) -> set[str]:
    return {name for name, p in backbone.trunk.named_parameters() if p.requires_grad}


def test_frozen_and_full() -> None:
    backbone = prepare_for_finetuning(_tiny(), "frozen")
    assert _trainable(backbone) == set() and backbone.finetune["trainable"] == 0
    backbone = prepare_for_finetuning(backbone, "full")
    assert _trainable(backbone) == {n for n, _ in backbone.trunk.named_parameters()}
    assert backbone.finetune["trainable"] == backbone.finetune["total"] > 0


def test_last_k_trains_the_last_blocks_and_final_norm() -> None:
    backbone = prepare_for_finetuning(_tiny(depth=4), "last_k", k=2)
    trainable = _trainable(backbone)
    assert {n.split(".")[1] for n in trainable if n.startswith("blocks.")} == {"2", "3"}
    assert {"norm.weight", "norm.bias"} <= trainable
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "patch_embed", "pos_embed", "cls_token"))
                   for n in trainable)
    with pytest.raises(SpfmError, match="k=5 but the backbone has 4 blocks"):
        prepare_for_finetuning(_tiny(depth=4), "last_k", k=5)
    with pytest.raises(SpfmError, match="unknown fine-tuning mode"):
        prepare_for_finetuning(_tiny(), "partial")


def test_lora_adapts_attention_projections_only() -> None:
    backbone = _tiny(depth=2)
    assert attention_targets(backbone.trunk) == ["attn.qkv", "attn.proj"]
    total_before = sum(p.numel() for p in backbone.trunk.parameters())
    prepare_for_finetuning(backbone, "lora", lora_r=4)
    trainable = _trainable(backbone)
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable}
    assert adapted == {f"blocks.{i}.attn.{m}" for i in range(2) for m in ("qkv", "proj")}
    # rank 4 on qkv (192 -> 576) and proj (192 -> 192), two blocks: 4 * ((192 + 576) + (192 + 192)) * 2
    assert backbone.finetune["trainable"] == 4 * (768 + 384) * 2
    assert backbone.finetune["total"] == total_before + backbone.finetune["trainable"]


def test_lora_step_changes_output_but_not_base_weights_and_merge_preserves_it(tmp_path) -> None:
    backbone = _tiny(depth=2)
    x = torch.rand(4, 3, 32, 32)
    base = {k: v.clone() for k, v in backbone.trunk.state_dict().items()}
    backbone.eval()
    with torch.no_grad():
        before = backbone(x)
    prepare_for_finetuning(backbone, "lora", lora_r=4)
    optimiser = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimiser.zero_grad()
        backbone(x).pow(2).mean().backward()
        optimiser.step()
    with torch.no_grad():
        adapted = backbone(x)
    assert (adapted - before).abs().max() > 1e-3
    wrapped = backbone.trunk.get_base_model().state_dict()
    for key, value in base.items():  # peft keeps the frozen weight under "<module>.base_layer.weight"
        peft_key = key if key in wrapped else key.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert torch.equal(wrapped[peft_key], value), key

    merge_lora(backbone)
    assert set(backbone.trunk.state_dict()) == set(base)
    assert not any("lora" in n for n, _ in backbone.trunk.named_modules())
    with torch.no_grad():
        merged = backbone(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    # The merged backbone is a plain checkpoint that the registry reloads.
    reloaded = create_backbone("vit_tiny_patch16_224", checkpoint=save_backbone(backbone, tmp_path / "m")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), merged)
    with pytest.raises(SpfmError, match="no LoRA adapters"):
        merge_lora(backbone)


def test_transformers_backbone_modes() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("phikon", hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                               intermediate_size=64, image_size=32)
    targets = attention_targets(backbone.trunk)
    assert set(targets) <= {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                            "attention.query", "attention.key", "attention.value", "attention.output.dense"}
    assert len(targets) == 4
    prepare_for_finetuning(backbone, "last_k", k=1)
    layer_ids = {m.group(1) for n in _trainable(backbone) if (m := re.match(r"(?:encoder\.)?layers?\.(\d+)\.", n))}
    assert layer_ids == {"2"}
    assert any(n.startswith("layernorm.") for n in _trainable(backbone))
    prepare_for_finetuning(backbone, "lora", lora_r=2)
    assert all("lora_" in n for n in _trainable(backbone))
    x = torch.rand(2, 3, 32, 32)
    assert backbone(x).shape == (2, 32)
