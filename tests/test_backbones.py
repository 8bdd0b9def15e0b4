"""Backbone registry: pathology model specs, exact architectures (built on the meta device), readouts, Hub access
errors without network, and local checkpoints (safetensors, weights-only pickles, directories, mismatches)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from spfm.errors import DataError, SpfmError
from spfm.models.backbones import create_backbone, get_spec
from spfm.models.backbones.registry import describe_backbones, save_backbone
from spfm.models.backbones.weights import HubAccessError, hub_access

TINY = dict(img_size=32, depth=2)  # vit_tiny_patch16_224 at 32 px, 2 blocks: fast on a CPU


def _tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return create_backbone("vit_tiny_patch16_224", **{**TINY, **kw}).eval()


# name: (embed_dim, published parameter count in millions, prefix tokens (CLS + registers) or None for transformers)
PUBLISHED = {
    "uni": (1024, 303.4, 1),
    "uni2-h": (1536, 681.4, 9),
    "virchow2": (2560, 631.2, 5),
    "h-optimus-0": (1536, 1134.8, 5),
    "h0-mini": (1536, 85.7, 5),
    "prov-gigapath": (1536, 1134.8, 1),
    "phikon": (768, 85.8, None),
    "phikon-v2": (1024, 303.4, None),
}


def test_describe_lists_pathology_models_with_licences() -> None:
    rows = {row["name"]: row for row in describe_backbones()}
    assert set(PUBLISHED) <= set(rows)
    for name in ("uni", "uni2-h", "virchow2", "h0-mini"):
        assert rows[name]["gated"] and rows[name]["no_derivatives"]
        assert rows[name]["license"] == "cc-by-nc-nd-4.0"
    assert rows["h-optimus-0"]["license"] == "apache-2.0" and not rows["h-optimus-0"]["no_derivatives"]
    assert not rows["phikon"]["gated"] and rows["phikon-v2"]["embed_dim"] == 1024
    assert rows["virchow2"]["readout"] == "cls+mean" and rows["virchow2"]["source"] == "hf-hub:paige-ai/Virchow2"
    assert get_spec("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_random_init_builds_the_published_architecture(name: str) -> None:
    """Built on the meta device (no memory, no weights): size, token layout and embedding width as published."""
    dim, millions, prefix = PUBLISHED[name]
    with torch.device("meta"):
        backbone = create_backbone(name)
        emb = backbone(torch.empty(2, 3, 224, 224))
    n_params = sum(p.numel() for p in backbone.trunk.parameters())
    assert emb.shape == (2, dim) == (2, backbone.embed_dim)
    assert abs(n_params / 1e6 - millions) < 0.005 * millions
    if prefix is not None:
        assert backbone.trunk.num_prefix_tokens == prefix


def test_virchow2_embedding_is_cls_and_mean_of_patch_tokens_after_registers() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("virchow2", img_size=28, embed_dim=32, depth=1, num_heads=2).eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        tokens, emb = backbone.tokens(x), backbone(x)
    assert tokens.shape == (3, 1 + 4 + 4, 32)  # CLS, 4 registers, 2 x 2 patches
    torch.testing.assert_close(emb, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))


@pytest.mark.parametrize("name, expected", [
    ("uni", {"init_values": 1e-5, "dynamic_img_size": True}),
    ("h-optimus-0", {"init_values": 1e-5, "dynamic_img_size": False}),
    ("virchow2", {"act_layer": torch.nn.SiLU}),
])
def test_pretrained_calls_timm_as_the_model_card_does(name: str, expected: dict, monkeypatch) -> None:
    import timm
    from timm.layers import SwiGLUPacked

    calls = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: calls.append((a, kw)) or torch.nn.Identity())
    create_backbone(name, pretrained=True)
    (args, kwargs), = calls
    assert args == (f"hf-hub:{get_spec(name).extras['hub_repo']}",) and kwargs.pop("pretrained") is True
    assert kwargs == expected | ({"mlp_layer": SwiGLUPacked} if name == "virchow2" else {})


def test_offline_with_empty_cache_gives_clear_error(tmp_path) -> None:
    """HF_HUB_OFFLINE=1 and an empty HF_HOME: timm (UNI) and transformers (Phikon) paths both explain what to do."""
    code = ("from spfm.models.backbones import create_backbone\n"
            "from spfm.models.backbones.weights import HubAccessError\n"
            "for name in ('uni', 'phikon'):\n"
            "    try:\n"
            "        create_backbone(name, pretrained=True)\n"
            "    except HubAccessError as exc:\n"
            "        print('ERR', exc)\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 2
    assert "https://huggingface.co/MahmoodLab/uni" in lines[0] and "https://huggingface.co/owkin/phikon" in lines[1]
    for line in lines:
        assert "HF_TOKEN" in line and "huggingface-cli login" in line and "checkpoint=" in line
        assert "HF_HUB_OFFLINE=1" in line


def test_gated_and_wrapped_hub_errors_become_hub_access_errors() -> None:
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/paige-ai/Virchow2"))
    with pytest.raises(HubAccessError, match=r"gated.*huggingface\.co/paige-ai/Virchow2.*HF_TOKEN"):
        with hub_access("paige-ai/Virchow2"):
            raise GatedRepoError("401 Client Error", response=response)
    # transformers re-raises Hub failures as a bare OSError: recognised through the exception chain or its text
    with pytest.raises(HubAccessError, match="MahmoodLab/UNI2-h"):
        with hub_access("MahmoodLab/UNI2-h"):
            try:
                raise GatedRepoError("401", response=response)
            except GatedRepoError as exc:
                raise OSError("You are trying to access a gated repo.") from exc
    with pytest.raises(ValueError, match="unrelated"):  # other failures are not disguised as access problems
        with hub_access("owkin/phikon"):
            raise ValueError("unrelated")


def test_safetensors_file_round_trip(tmp_path) -> None:
    backbone = _tiny(seed=1)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.trunk.state_dict().items()}, str(path))
    reloaded = create_backbone("vit_tiny_patch16_224", checkpoint=path, **TINY).eval()
    fresh = _tiny(seed=2)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), backbone(x))
        assert not torch.allclose(fresh(x), backbone(x))


def test_directory_round_trip_restores_build_options(tmp_path) -> None:
    """save_backbone writes config.json + model.safetensors; the directory alone rebuilds the 32 px model."""
    backbone = _tiny(seed=3)
    out = save_backbone(backbone, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = create_backbone("vit_tiny_patch16_224", checkpoint=out).eval()
    assert reloaded.build_kwargs == TINY
    again = create_backbone("vit_tiny_patch16_224", checkpoint=save_backbone(reloaded, tmp_path / "again")).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), backbone(x))
        assert torch.equal(again(x), backbone(x))


def test_weights_only_pickle_loads(tmp_path) -> None:
    backbone = _tiny(seed=4)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": backbone.trunk.state_dict()}, path)
    reloaded = create_backbone("vit_tiny_patch16_224", checkpoint=path, **TINY).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), backbone(x))


class _Payload:
    """A pickle that would run code on load: it creates a marker file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_unsafe_pickle_is_never_unpickled(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    with pytest.raises(DataError, match="refusing to load") as info:
        create_backbone("vit_tiny_patch16_224", checkpoint=path, **TINY)
    assert "evil.pth" in str(info.value)
    assert not marker.exists()


def test_checkpoint_for_another_architecture_names_the_keys(tmp_path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny().trunk.state_dict().items()}, str(path))
    with pytest.raises(DataError, match=r"shape mismatch .*blocks\.0\.attn\.qkv\.weight \(checkpoint \(576, 192\)"):
        create_backbone("vit_small_patch16_224", checkpoint=path, **TINY)
    with pytest.raises(DataError, match=r"shape mismatch \[1\]: pos_embed"):
        create_backbone("vit_tiny_patch16_224", checkpoint=path, img_size=64, depth=2)
    with pytest.raises(DataError, match=r"unexpected \[\d+\]: blocks\.1\."):
        create_backbone("vit_tiny_patch16_224", checkpoint=path, img_size=32, depth=1)


def test_bad_checkpoint_paths(tmp_path) -> None:
    with pytest.raises(DataError, match="checkpoint not found"):
        create_backbone("uni", checkpoint=tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no weights file"):
        create_backbone("uni", checkpoint=tmp_path / "empty")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(DataError, match="unknown weights format"):
        create_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "w.txt")
    with pytest.raises(SpfmError, match="not both"):
        create_backbone("vit_tiny_patch16_224", pretrained=True, checkpoint=tmp_path / "w.txt")


PHIKON_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32)


def test_transformers_backbone_cls_readout_and_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("phikon", **PHIKON_TINY).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        emb = backbone(x)
        assert torch.equal(emb, backbone.trunk(pixel_values=x).last_hidden_state[:, 0])
    assert emb.shape == (2, 32)
    reloaded = create_backbone("phikon", checkpoint=save_backbone(backbone, tmp_path / "phikon")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), emb)
    # A bare weights file is loaded strictly into the published architecture (here overridden to the tiny one).
    path = tmp_path / "phikon.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.trunk.state_dict().items()}, str(path))
    with torch.no_grad():
        assert torch.equal(create_backbone("phikon", checkpoint=path, **PHIKON_TINY).eval()(x), emb)
    with pytest.raises(DataError, match="missing"):
        create_backbone("phikon", checkpoint=path, **{**PHIKON_TINY, "num_hidden_layers": 3})
