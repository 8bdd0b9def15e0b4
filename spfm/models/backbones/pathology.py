"""Pathology foundation models, registered with the loading code of their model cards.

Each entry records three things:

* ``pretrained=True`` runs exactly what the model card runs (``timm.create_model("hf-hub:<repo>", pretrained=True,
  **card kwargs)`` or transformers ``from_pretrained``), so the Hub's ``config.json`` decides the architecture;
* the published architecture as explicit arguments, so ``pretrained=False`` (random init) and ``checkpoint=`` (local
  weights, e.g. a copy of the Hub snapshot) work offline with the same module tree and parameter names;
* the readout, input normalisation, licence and gating, which decide how spfm embeds with it and whether a
  fine-tuned copy may be shared (``no_derivatives``).

Sources: MahmoodLab/uni and MahmoodLab/UNI2-h (timm kwargs on the cards), paige-ai/Virchow2 (card kwargs and
config.json ``model_args``), bioptimus/H-optimus-0 (card and the bioptimus/releases parameters), bioptimus/H0-mini
(card kwargs and its CLS + patch-mean example), prov-gigapath (config.json ``model_args``), owkin/phikon
(``ViTModel``, CLS) and owkin/phikon-v2 (``AutoModel``, DINOv2 ViT-L/16, CLS). The explicit architectures reproduce
the published parameter counts (tests/test_backbones.py builds each on the meta device).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from spfm.errors import DataError
from spfm.models.backbones.registry import BackboneSpec, register_backbone, timm_builder
from spfm.models.backbones.weights import hub_access, load_weights, read_state_dict, resolve_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: H-optimus-0's own statistics (its model card), also used by its distilled H0-mini.
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


def _swiglu() -> dict[str, Any]:
    """``mlp_layer=SwiGLUPacked, act_layer=SiLU``: the MLP the Virchow/UNI2/H-optimus cards pass to timm."""
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


def _timm_entry(name: str, *, repo: str, arch: str, arch_kwargs: dict[str, Any], swiglu: bool,
                card_kwargs: dict[str, Any], **spec: Any) -> BackboneSpec:
    """A spec for a timm model on the Hub.

    ``swiglu``: the card passes ``mlp_layer=SwiGLUPacked, act_layer=SiLU`` (added to the card kwargs, and so to the
    explicit architecture too); the classes are imported at build time so registering does not import timm.
    """
    def build(pretrained: bool = False, checkpoint: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
        card = {**(_swiglu() if swiglu else {}), **card_kwargs}
        return timm_builder(arch, hub_repo=repo, arch_kwargs=arch_kwargs, card_kwargs=card)(
            pretrained=pretrained, checkpoint=checkpoint, **overrides)

    build.__name__ = f"build_{name.replace('-', '_')}"
    return BackboneSpec(name=name, builder=build, source=f"hf-hub:{repo}",
                        extras={"timm_name": arch, "hub_repo": repo, "arch_kwargs": arch_kwargs}, **spec)


def _transformers_builder(repo: str, model_type: str, config_kwargs: dict[str, Any],
                          model_kwargs: dict[str, Any]) -> Any:
    """A builder for a transformers vision model (Phikon: ``ViTModel``; Phikon-v2: ``Dinov2Model``).

    ``pretrained=True`` is ``AutoModel.from_pretrained(repo, **model_kwargs)`` as on the cards. A checkpoint
    directory written by ``save_pretrained`` (or a Hub snapshot) is read with ``from_pretrained`` too, so
    transformers' own key conversions apply; a bare weights file is loaded strictly into the published architecture.
    """
    def build(pretrained: bool = False, checkpoint: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
        from transformers import AutoConfig, AutoModel

        if checkpoint is not None:
            ckpt = resolve_checkpoint(checkpoint)
            if ckpt.config is not None and "model_type" in ckpt.config:
                model, info = AutoModel.from_pretrained(str(ckpt.path), local_files_only=True,
                                                        output_loading_info=True, ignore_mismatched_sizes=True,
                                                        **model_kwargs, **overrides)
                bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                       and v}
                if bad:
                    raise DataError(f"checkpoint does not fit the architecture: {bad}", path=ckpt.path,
                                    field="state_dict")
                return model
            config = AutoConfig.for_model(model_type, **{**config_kwargs, **overrides})
            model = AutoModel.from_config(config, **model_kwargs)
            load_weights(model, read_state_dict(ckpt.weights), source=ckpt.weights)
            return model
        if pretrained:
            with hub_access(repo):
                return AutoModel.from_pretrained(repo, **model_kwargs, **overrides)
        config = AutoConfig.for_model(model_type, **{**config_kwargs, **overrides})
        return AutoModel.from_config(config, **model_kwargs)

    return build


def _register() -> None:
    nc_nd = dict(gated=True, license="cc-by-nc-nd-4.0", no_derivatives=True)
    uni2_kwargs = dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                       mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8, dynamic_img_size=True)
    entries = [
        # UNI: ViT-L/16 trained with DINOv2; card: create_model("hf-hub:MahmoodLab/uni", pretrained=True,
        # init_values=1e-5, dynamic_img_size=True); embedding = the CLS token (num_classes=0, global_pool="token").
        _timm_entry("uni", repo="MahmoodLab/uni", arch="vit_large_patch16_224", swiglu=False,
                    arch_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                     dynamic_img_size=True),
                    card_kwargs=dict(init_values=1e-5, dynamic_img_size=True),
                    embed_dim=1024, mean=IMAGENET_MEAN, std=IMAGENET_STD, readout="cls", **nc_nd),
        # UNI2-h: ViT-H/14-like (1536 wide, 24 deep) with 8 registers and a SwiGLU MLP; the card passes all of it.
        _timm_entry("uni2-h", repo="MahmoodLab/UNI2-h", arch="vit_giant_patch14_224", swiglu=True,
                    arch_kwargs=uni2_kwargs, card_kwargs=uni2_kwargs,
                    embed_dim=1536, mean=IMAGENET_MEAN, std=IMAGENET_STD, readout="cls", **nc_nd),
        # Virchow2: ViT-H/14, 4 registers, SwiGLU; embedding = concat(CLS, mean of patch tokens after the
        # registers) = tokens[:, 0] and tokens[:, 5:].mean(1): 2 x 1280 = 2560.
        _timm_entry("virchow2", repo="paige-ai/Virchow2", arch="vit_huge_patch14_224", swiglu=True,
                    arch_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
                                     global_pool="", dynamic_img_size=True),
                    card_kwargs={},
                    embed_dim=2560, mean=IMAGENET_MEAN, std=IMAGENET_STD, readout="cls+mean", **nc_nd),
        # H-optimus-0: ViT-g/14, 4 registers, SwiGLU (its GluMlp(SiLU, gate_last=False) is timm's SwiGLUPacked,
        # already part of vit_giant_patch14_reg4_dinov2; the card passes no layer classes), fixed 224 px input, its
        # own mean/std; embedding = CLS (1536).
        _timm_entry("h-optimus-0", repo="bioptimus/H-optimus-0", arch="vit_giant_patch14_reg4_dinov2", swiglu=False,
                    arch_kwargs=dict(img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24,
                                     init_values=1e-5, mlp_ratio=5.33334, reg_tokens=4, no_embed_class=True,
                                     num_classes=0, dynamic_img_size=False),
                    card_kwargs=dict(init_values=1e-5, dynamic_img_size=False),
                    embed_dim=1536, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, readout="cls",
                    gated=True, license="apache-2.0", no_derivatives=False),
        # H0-mini: ViT-B/14 with 4 registers distilled from H-optimus-0; the card's embedding concatenates the CLS
        # token with the mean of the patch tokens (768 + 768 = 1536). The card passes only the SwiGLU layers; the
        # MLP width (4096 packed = 2 x 2048, DINOv2's SwiGLU for ViT-B) matches its published 86M parameters.
        _timm_entry("h0-mini", repo="bioptimus/H0-mini", arch="vit_base_patch14_reg4_dinov2", swiglu=True,
                    arch_kwargs=dict(img_size=224, init_values=1e-5, mlp_ratio=5.33334, num_classes=0,
                                     global_pool=""),
                    card_kwargs={},
                    embed_dim=1536, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, readout="cls+mean", **nc_nd),
        # Prov-GigaPath tile encoder: ViT-g with 16 px patches and a SwiGLU MLP (timm's vit_giant_patch14_dinov2
        # with the config.json model_args); card: create_model("hf_hub:prov-gigapath/prov-gigapath",
        # pretrained=True); embedding = CLS (1536).
        _timm_entry("prov-gigapath", repo="prov-gigapath/prov-gigapath", arch="vit_giant_patch14_dinov2",
                    swiglu=False,
                    arch_kwargs=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                                     init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
                    card_kwargs={},
                    embed_dim=1536, mean=IMAGENET_MEAN, std=IMAGENET_STD, readout="cls",
                    gated=True, license="apache-2.0", no_derivatives=False),
    ]
    # Phikon: iBOT ViT-B/16 in transformers; card: ViTModel.from_pretrained("owkin/phikon",
    # add_pooling_layer=False), embedding = last_hidden_state[:, 0, :] (768).
    entries.append(BackboneSpec(
        name="phikon", builder=_transformers_builder(
            "owkin/phikon", "vit",
            dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6),
            dict(add_pooling_layer=False)),
        embed_dim=768, mean=IMAGENET_MEAN, std=IMAGENET_STD, readout="cls", source="hf-hub:owkin/phikon",
        gated=False, license="other (Owkin non-commercial)", no_derivatives=False,
        extras={"hub_repo": "owkin/phikon"}))
    # Phikon-v2: DINOv2 ViT-L/16 in transformers; card: AutoModel.from_pretrained("owkin/phikon-v2"),
    # embedding = last_hidden_state[:, 0, :] (1024).
    entries.append(BackboneSpec(
        name="phikon-v2", builder=_transformers_builder(
            "owkin/phikon-v2", "dinov2",
            dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=224,
                 patch_size=16, layerscale_value=1e-5, layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False),
            {}),
        embed_dim=1024, mean=IMAGENET_MEAN, std=IMAGENET_STD, readout="cls", source="hf-hub:owkin/phikon-v2",
        gated=False, license="other (Owkin non-commercial)", no_derivatives=False,
        extras={"hub_repo": "owkin/phikon-v2"}))
    for spec in entries:
        register_backbone(spec, overwrite=True)


_register()
