"""Hub integration: local round trips for every kind, Auto classes, remote code, gated backbones, bad input."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import spfm
from spfm.errors import DataError, SpfmError
from spfm.hub import (
    SpfmBackboneModel,
    from_pretrained,
    hub_to_backbone,
    register_head_kind,
    save_pretrained,
    to_hub_model,
)
from spfm.models.backbones import BackboneSpec, create_backbone, register_backbone
from spfm.models.backbones.registry import timm_builder

TINY = dict(img_size=32, depth=2)


# --- a small head that follows the head contract (COMMON.md) ---------------------------------------------------

class TinyModule(nn.Module):
    """(N, G) expression -> (N, H) embedding; ``gene_mean`` is a fitted statistic kept as a buffer."""

    def __init__(self, n_genes: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_genes, hidden)
        self.register_buffer("gene_mean", torch.zeros(n_genes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x - self.gene_mean)


class TinyHead:
    """AnnData-facing head: keyword hyperparameters, to_config/from_config, ``module``."""

    def __init__(self, genes: list[str], hidden: int = 4, scale: float = 1.0, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.genes, self.hidden, self.scale, self.seed = list(genes), hidden, scale, seed
        self.module = TinyModule(len(genes), hidden)

    def fit(self, X: np.ndarray) -> TinyHead:
        with torch.no_grad():
            self.module.gene_mean.copy_(torch.as_tensor(X.mean(0), dtype=torch.float32))
            self.module.proj.weight.add_(1.0)  # "training" moves the weights away from any fresh init
        self.scale = float(X.std())
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (self.module(torch.as_tensor(X, dtype=torch.float32)) * self.scale).numpy()

    def to_config(self) -> dict:
        return {"genes": self.genes, "hidden": self.hidden, "scale": self.scale, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict) -> TinyHead:
        return cls(**config)


KIND = register_head_kind("spfm-tinyhead", TinyHead)


def fitted_head(seed: int = 0) -> tuple[TinyHead, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.poisson(3.0, size=(20, 6)).astype(np.float32)
    return TinyHead([f"GENE{i}" for i in range(6)], hidden=4, seed=seed).fit(X), X


def tiny_backbone(seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone("vit_tiny_patch16_224", **TINY)


IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# A no-derivatives backbone like UNI: its "published" weights come from a seeded builder instead of the Hub.
def _nd_builder(pretrained: bool = False, checkpoint=None, **kw):
    if pretrained:
        torch.manual_seed(1234)
    return timm_builder("vit_tiny_patch16_224", arch_kwargs={"num_classes": 0})(checkpoint=checkpoint, **kw)


@pytest.fixture()
def nd_backbone():
    """Registers "test-nd-vit" for one test and removes it again (other test files list the registry)."""
    from spfm.models.backbones import registry

    register_backbone(BackboneSpec(name="test-nd-vit", builder=_nd_builder, embed_dim=192,
                                   source="hf-hub:test-org/nd", gated=True, license="cc-by-nc-nd-4.0",
                                   no_derivatives=True, extras={"timm_name": "vit_tiny_patch16_224",
                                                                "hub_repo": "test-org/nd",
                                                                "arch_kwargs": {"num_classes": 0}}), overwrite=True)
    yield "test-nd-vit"
    registry._REGISTRY.pop("test-nd-vit", None)


# --- round trips ------------------------------------------------------------------------------------------------

def test_backbone_round_trip_gives_identical_embeddings(tmp_path):
    backbone = tiny_backbone()
    out = save_pretrained(backbone, tmp_path / "bb", datasets=["synthetic"], metrics={"eval/loss": 0.5})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "configuration_spfm.py",
                                                      "model.safetensors", "modeling_spfm.py"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "spfm-backbone" and config["model_args"]["depth"] == 2
    assert set(load_file(out / "model.safetensors")) == set(backbone.state_dict())
    model = spfm.from_pretrained(out)
    assert isinstance(model, SpfmBackboneModel)
    with torch.no_grad():
        expected = backbone(IMAGES)
        assert torch.equal(model.embed(IMAGES), expected)
        assert torch.equal(model(IMAGES).pooler_output, expected)
        # back to a registry Backbone (spfm embed, fine-tuning) with the same build options
        again = hub_to_backbone(model)
        assert again.build_kwargs == {"img_size": 32, "depth": 2}
        assert torch.equal(again(IMAGES), expected)


def test_head_round_trip_runs_on_new_data_without_training_data(tmp_path):
    head, _ = fitted_head()
    out = save_pretrained(head, tmp_path / "head", license="mit")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "spfm-tinyhead"
    assert config["head_config"]["genes"] == head.genes and config["genes"] == head.genes
    assert "modeling_spfm.py" not in {p.name for p in out.iterdir()}  # heads are not remote code
    new = np.random.default_rng(5).poisson(3.0, size=(7, 6)).astype(np.float32)
    model = from_pretrained(out)
    assert isinstance(model.head, TinyHead) and model.head.scale == head.scale
    assert torch.equal(model.module.gene_mean, head.module.gene_mean)
    np.testing.assert_array_equal(model.head.transform(new), head.transform(new))


def test_composite_round_trip(tmp_path):
    backbone, (head, X) = tiny_backbone(), fitted_head()
    out = save_pretrained((backbone, head), tmp_path / "comp")
    keys = set(load_file(out / "model.safetensors"))
    assert any(k.startswith("backbone.trunk.") for k in keys) and "head_model.module.gene_mean" in keys
    model = from_pretrained(out)
    assert type(model).__name__ == "SpfmCompositeModel"
    with torch.no_grad():
        assert torch.equal(model.embed(IMAGES), backbone(IMAGES))
    np.testing.assert_array_equal(model.head.transform(X), head.transform(X))
    card = (out / "README.md").read_text()
    assert "library_name: \"spfm\"" in card and "GENE0" in card


def test_head_state_is_read_at_save_time(tmp_path):
    head, X = fitted_head()
    model = to_hub_model(head)
    head.scale = 7.0  # the fitted state changes after wrapping
    model.save_pretrained(tmp_path / "h")
    assert from_pretrained(tmp_path / "h").head.scale == 7.0
    head.module = TinyModule(6, 4)  # refitting replaced the module: the wrapper would save stale tensors
    with pytest.raises(SpfmError, match="was replaced after wrapping"):
        model.save_pretrained(tmp_path / "h2")
    with pytest.raises(TypeError, match="push_to_hub=True"):
        to_hub_model(head).save_pretrained(tmp_path / "h3", push_to_hub=True)


def test_gene_panel_of_a_multimodal_head_config():
    from spfm.hub.configs import SpfmHeadConfig

    config = SpfmHeadConfig(head_config={"modalities": [{"kind": "protein", "features": ["CD3", "CD4"]},
                                                        {"kind": "rna", "features": ["ACTB", "GAPDH"]}]})
    assert config.genes == ["ACTB", "GAPDH"]
    assert SpfmHeadConfig(head_config={"genes": ["A"], "modalities": []}).genes == ["A"]
    assert SpfmHeadConfig(head_config={"genes": [1, 2]}).genes == []


def test_model_card_metadata(tmp_path):
    from spfm.hub.configuration_spfm import card_metadata

    model = to_hub_model(tiny_backbone(), datasets=["hest-1k"], metrics={"pearson": 0.31}, tags=["visium"])
    meta = card_metadata(model.config)
    assert meta["library_name"] == "spfm" and meta["license"] == "apache-2.0"
    assert "base_model" not in meta and meta["spfm_backbone"] == "vit_tiny_patch16_224"  # not a Hub repo id
    assert meta["datasets"] == ["hest-1k"]
    assert meta["spfm_metrics"] == {"pearson": 0.31} and "visium" in meta["tags"]
    model.save_pretrained(tmp_path / "m", repo_id="me/tiny")
    card = (tmp_path / "m" / "README.md").read_text()
    front = card.split("---")[1]
    import yaml

    assert yaml.safe_load(front)["spfm_metrics"] == {"pearson": 0.31}
    assert "| pearson | 0.31 |" in card
    assert 'spfm.from_pretrained("me/tiny")' in card and "trust_remote_code=True" in card
    model.config.license = "other (Owkin non-commercial)"
    assert {k: card_metadata(model.config)[k] for k in ("license", "license_name")} == {
        "license": "other", "license_name": "other-owkin-non-commercial"}


def test_training_output_folder_becomes_a_hub_model(tmp_path):
    from spfm.models.backbones import save_backbone

    backbone = tiny_backbone()
    final = tmp_path / "run" / "final"
    save_backbone(backbone, final)
    config = json.loads((final / "config.json").read_text())
    config.update(backbone="vit_tiny_patch16_224", embed_dim=192, img_size=32, genes=["A", "B"], step=3,
                  recipe={"data": {"shards": "/data/my-corpus"}})
    (final / "config.json").write_text(json.dumps(config))
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"loss": 0.25, "step": 3, "images_per_s": None}))
    model = to_hub_model(tmp_path / "run")
    assert model.config.genes == ["A", "B"] and model.config.metrics == {"loss": 0.25, "step": 3.0}
    assert model.config.datasets == ["my-corpus"]
    with torch.no_grad():
        assert torch.equal(model.embed(IMAGES), backbone(IMAGES))


# --- Auto classes and remote code -------------------------------------------------------------------------------

def test_automodel_after_import_spfm(tmp_path):
    from transformers import AutoConfig, AutoModel

    save_pretrained(tiny_backbone(), tmp_path / "bb")
    save_pretrained(fitted_head()[0], tmp_path / "head")
    model = AutoModel.from_pretrained(tmp_path / "bb")  # no trust_remote_code: spfm's registered class
    assert type(model) is SpfmBackboneModel
    assert type(AutoConfig.from_pretrained(tmp_path / "head")) is KIND.config_class
    head_model = AutoModel.from_pretrained(tmp_path / "head")
    assert type(head_model) is KIND.model_class and isinstance(head_model.head, TinyHead)
    save_pretrained((tiny_backbone(), fitted_head()[0]), tmp_path / "pair")
    assert type(AutoModel.from_pretrained(tmp_path / "pair")).__name__ == "SpfmCompositeModel"


REMOTE = """
import sys
class _NoSpfm:  # the remote-code path must work where spfm cannot even be imported
    def find_spec(self, name, path=None, target=None):
        if name == "spfm" or name.startswith("spfm."):
            raise ImportError("spfm is blocked in this process")
sys.meta_path.insert(0, _NoSpfm())
import torch
from transformers import AutoModel
images = torch.load(sys.argv[1], weights_only=True)
for folder, out in zip(sys.argv[2::2], sys.argv[3::2]):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        torch.save(model(images).pooler_output, out)
    print(type(model).__module__)
assert not any(m == "spfm" or m.startswith("spfm.") for m in sys.modules)
"""

PHIKON_TINY = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128, image_size=32)


def test_transformers_trunk_round_trip(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("phikon-v2", **PHIKON_TINY)  # a transformers Dinov2Model trunk
    model = from_pretrained(save_pretrained(backbone, tmp_path / "p"))
    assert model.config.library == "transformers"
    with torch.no_grad():
        assert torch.equal(model.embed(IMAGES), backbone(IMAGES))


def test_remote_code_loads_in_a_fresh_process_without_spfm(tmp_path):
    timm_backbone = tiny_backbone()
    torch.manual_seed(0)
    hf_backbone = create_backbone("phikon", **PHIKON_TINY)  # a transformers ViTModel trunk
    save_pretrained(timm_backbone, tmp_path / "timm")
    save_pretrained(hf_backbone, tmp_path / "hf-trunk")
    torch.save(IMAGES, tmp_path / "images.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path / "images.pt"),
                             str(tmp_path / "timm"), str(tmp_path / "timm.pt"),
                             str(tmp_path / "hf-trunk"), str(tmp_path / "hf.pt")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("transformers_modules") == 2
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "timm.pt", weights_only=True), timm_backbone(IMAGES))
        assert torch.equal(torch.load(tmp_path / "hf.pt", weights_only=True), hf_backbone.eval()(IMAGES))


def test_pathology_backbones_are_described_for_remote_code():
    """The SwiGLU layer classes of Virchow2-like trunks are written by name and rebuilt identically (meta)."""
    from spfm.hub.convert import _signature, backbone_config
    from spfm.hub.modeling_spfm import build_trunk

    with torch.device("meta"):
        backbone = create_backbone("virchow2")
        config = backbone_config(backbone)
        rebuilt = build_trunk(type(config).from_dict(json.loads(config.to_json_string())))
    assert config.model_args["mlp_layer"] == {"__class__": "timm.layers.SwiGLUPacked"}
    assert config.no_derivatives and config.hub_repo == "paige-ai/Virchow2" and config.readout == "cls+mean"
    assert _signature(rebuilt) == _signature(backbone.trunk)


# --- gated, no-derivatives backbones ----------------------------------------------------------------------------

def test_no_derivatives_backbone_weights_are_left_out_unless_asked(tmp_path, nd_backbone):
    torch.manual_seed(0)
    backbone = create_backbone("test-nd-vit", **TINY)
    head, X = fitted_head()
    save_pretrained((backbone, head), tmp_path / "kept")  # own disk: everything by default
    assert any(k.startswith("backbone.") for k in load_file(tmp_path / "kept" / "model.safetensors"))

    save_pretrained((backbone, head), tmp_path / "shared", include_restricted_weights=False)
    keys = set(load_file(tmp_path / "shared" / "model.safetensors"))
    assert keys and not any(k.startswith("backbone.") for k in keys)
    config = json.loads((tmp_path / "shared" / "config.json").read_text())
    assert config["backbone_config"]["backbone_weights"] == "external"
    assert config["base_model"] == "test-org/nd" and config["license"] == "cc-by-nc-nd-4.0"
    assert "not** included" in (tmp_path / "shared" / "README.md").read_text()
    # loading fetches the published weights (here: the seeded builder) and the saved head
    model = from_pretrained(tmp_path / "shared")
    published = create_backbone("test-nd-vit", pretrained=True, **TINY)
    with torch.no_grad():
        assert torch.equal(model.embed(IMAGES), published(IMAGES))
        assert not torch.equal(model.embed(IMAGES), backbone(IMAGES))
    np.testing.assert_array_equal(model.head.transform(X), head.transform(X))


def test_no_derivatives_backbone_alone_records_only_its_id(tmp_path, nd_backbone):
    backbone = create_backbone("test-nd-vit", **TINY)
    save_pretrained(backbone, tmp_path / "nd")  # an earlier save with the weights, into the same folder
    out = save_pretrained(backbone, tmp_path / "nd", include_restricted_weights=False)
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["backbone_weights"] == "external"
    model = from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(model.embed(IMAGES), create_backbone("test-nd-vit", pretrained=True, **TINY)(IMAGES))


# --- bad input --------------------------------------------------------------------------------------------------

def test_config_that_is_not_spfms(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DataError, match=r"config.json: model_type: not an spfm model: model_type 'bert'"):
        from_pretrained(tmp_path / "bert")
    with pytest.raises(DataError, match="no config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(DataError, match="folder not found"):
        from_pretrained(tmp_path / "typo")


def test_registry_checkpoint_gets_a_hint(tmp_path):
    from spfm.models.backbones import save_backbone

    save_backbone(tiny_backbone(), tmp_path / "ckpt")
    with pytest.raises(DataError, match="registry checkpoint"):
        from_pretrained(tmp_path / "ckpt")


def test_missing_weights(tmp_path):
    out = save_pretrained(tiny_backbone(), tmp_path / "bb")
    (out / "model.safetensors").unlink()
    with pytest.raises(DataError, match=r"no model.safetensors \(files: \['README.md'"):
        from_pretrained(out)


def test_shape_mismatch_names_the_keys(tmp_path):
    out = save_pretrained(tiny_backbone(), tmp_path / "bb")
    config = json.loads((out / "config.json").read_text())
    config["model_args"]["embed_dim"] = 96  # the config now describes another architecture than the weights
    config["model_args"]["num_heads"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"shape mismatch \[30\]: trunk\.blocks\.0\.attn\.proj\.bias \(file \(192,\) "
                                        r"vs model \(96,\)\)"):
        from_pretrained(out)


def test_missing_and_unexpected_keys(tmp_path):
    head, _ = fitted_head()
    out = save_pretrained(head, tmp_path / "h")
    state = load_file(out / "model.safetensors")
    state["module.extra"] = state.pop("module.gene_mean")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(DataError, match=r"missing \[1\]: module.gene_mean \| unexpected \[1\]: module.extra"):
        from_pretrained(out)


class _Boom:
    """Unpickling this writes a marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("unpickled!",))


def test_pickle_weights_are_refused_and_never_loaded(tmp_path, monkeypatch):
    out = save_pretrained(tiny_backbone(), tmp_path / "bb")
    (out / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    (out / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was about to be loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    with pytest.raises(DataError, match=r"found only pickle weights \['pytorch_model.bin'\], which spfm never loads"):
        from_pretrained(out)
    from transformers import AutoModel

    with pytest.raises(ValueError, match="never loads"):
        AutoModel.from_pretrained(out)
    assert not marker.exists()


def test_a_pickle_beside_safetensors_is_ignored(tmp_path):
    backbone = tiny_backbone()
    out = save_pretrained(backbone, tmp_path / "bb")
    marker = tmp_path / "marker"
    (out / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    with torch.no_grad():
        assert torch.equal(from_pretrained(out).embed(IMAGES), backbone(IMAGES))
    assert not marker.exists()


def test_config_cannot_choose_the_classes_spfm_imports(tmp_path):
    head, _ = fitted_head()
    out = save_pretrained(head, tmp_path / "h")
    config = json.loads((out / "config.json").read_text())
    config["head_class"] = "os:system"  # ignored: the class is the one registered for the model_type
    (out / "config.json").write_text(json.dumps(config))
    assert isinstance(from_pretrained(out).head, TinyHead)
    bb = save_pretrained(tiny_backbone(), tmp_path / "bb")
    config = json.loads((bb / "config.json").read_text())
    config["model_args"]["act_layer"] = {"__class__": "os.system"}
    (bb / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only timm.\\* and torch.nn.\\* classes"):
        from_pretrained(bb)


def test_head_kinds_and_contract_errors():
    with pytest.raises(SpfmError, match="already bound"):
        register_head_kind("spfm-tinyhead", "somewhere:Else")
    with pytest.raises(SpfmError, match="start with 'spfm-'"):
        register_head_kind("tiny", TinyHead)

    class NotAHead:
        module = nn.Linear(2, 2)

        def to_config(self):
            return {"weights": np.zeros(3)}

    with pytest.raises(SpfmError, match="not a registered head kind"):
        to_hub_model(NotAHead())
    register_head_kind("spfm-notahead", NotAHead, overwrite=True)
    with pytest.raises(SpfmError, match=r"to_config\(\)\['weights'\] is not JSON-serialisable"):
        to_hub_model(NotAHead())


def test_builtin_head_kinds_are_registered_and_a_missing_head_fails_clearly(tmp_path):
    from spfm.hub import head_kinds

    kinds = head_kinds()
    for model_type, name in (("spfm-histosge", "HisToSGE"), ("spfm-soscope", "SoScope"),
                             ("spfm-spatialglue", "SpatialGlue"), ("spfm-cellscape", "CellScape")):
        assert kinds[model_type].class_path == f"spfm.heads:{name}"
        try:  # a head that has landed exposes the contract the Hub layer calls
            cls = kinds[model_type].load_head_class()
        except SpfmError:
            continue
        assert callable(cls.from_config) and callable(cls.to_config)
    register_head_kind("spfm-absent", "spfm.heads.not_written_yet:Nope", overwrite=True)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "config.json").write_text(json.dumps({"model_type": "spfm-absent", "head_config": {}}))
    save_file({}, str(tmp_path / "h" / "model.safetensors"))
    with pytest.raises(SpfmError, match="needs the head 'spfm.heads.not_written_yet:Nope'"):
        from_pretrained(tmp_path / "h")


def test_cli_push_and_pull_are_listed():
    from spfm.cli import build_parser

    args = build_parser().parse_args(["push", "folder", "me/repo", "--include-restricted-weights", "--dataset", "a"])
    assert args.include_restricted_weights and args.dataset == ["a"] and not args.private
    args = build_parser().parse_args(["pull", "me/repo", "out"])
    assert args.repo_id == "me/repo" and args.out == "out"

