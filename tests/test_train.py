"""The training loop and recipes: schema errors, resume to identical weights, NaN stops, bad inputs, final weights
that load back through the registry, and every shipped recipe run in a shrunken form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TRAIN_SHRINK
from safetensors.torch import load_file, save_file
from torch import nn

from spfm.errors import DataError
from spfm.train import NonFiniteLossError, latest_checkpoint, load_recipe, train
from spfm.train.loop import _BatchStream, _lr_lambda
from spfm.train.recipe import OptimConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BACKBONE = "vit_tiny_patch16_224"


@pytest.fixture
def shards(synthetic_shards: Path) -> Path:
    return synthetic_shards


class _Regression(nn.Module):
    """A tiny expression objective (linear head, masked MSE on log1p counts) that can be made to fail at a step."""

    name = "regress"

    def __init__(self, embed_dim: int, n_genes: int, nan_at: int | None = None) -> None:
        super().__init__()
        self.head = nn.Linear(embed_dim, n_genes)
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, embeddings, batch, backbone):
        self.calls += 1
        mask = batch["mask"].float()
        err = (self.head(embeddings) - torch.log1p(batch["expression"])) ** 2
        loss = (err * mask).sum() / mask.sum().clamp(min=1)
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "mse": loss.detach()}


@pytest.fixture
def local_objective(monkeypatch):
    """Route every objective name to :class:`_Regression` (options pass through), whatever the registry holds."""
    import spfm.models.objectives as registry

    monkeypatch.setattr(registry, "build_objective",
                        lambda name, *, embed_dim, n_genes, **options: _Regression(embed_dim, n_genes, **options))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so each run starts as a fresh process would."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _recipe(shards: Path, out: Path, **changes) -> dict:
    recipe = dict(
        data=dict(shards=str(shards), batch_size=8, shuffle=50, log1p=True),
        model=dict(backbone=BACKBONE, img_size=32),
        objectives=[dict(name="expression")],
        optim=dict(lr=1e-3, max_steps=6, warmup_steps=2),
        output_dir=str(out),
        checkpoint_every=3,
        progress=False,
        tracker="none",
    )
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            recipe[section] = {**recipe[section], field: value}
        else:
            recipe[key] = value
    return recipe


# ----------------------------------------------------------------------------------------------------------------
# Recipes


def test_unknown_key_and_wrong_type_fail_with_the_key_path(tmp_path):
    base = _recipe(tmp_path / "shards", tmp_path / "out")
    with pytest.raises(DataError, match=r"optim\.lr_rate") as info:
        load_recipe({**base, "optim": {**base["optim"], "lr_rate": 0.1}})
    assert "Extra inputs are not permitted" in str(info.value)
    with pytest.raises(DataError, match=r"optim\.max_steps") as info:
        load_recipe(base, overrides=["optim.max_steps=ten"])
    assert info.value.field == "optim.max_steps"
    with pytest.raises(DataError, match=r"objectives\.0\.weight"):
        load_recipe(base, overrides=["objectives.0.weight=-1"])
    with pytest.raises(DataError, match=r"data\.batch_size"):
        load_recipe(base, overrides=["data.batch_size='8'"])  # strict: a string is not an int
    with pytest.raises(DataError, match=r"objectives.*3 is not one of them|has 1 entries"):
        load_recipe(base, overrides=["objectives.3.weight=2"])
    with pytest.raises(DataError, match=r"model\b"):
        load_recipe({k: v for k, v in base.items() if k != "model"})


def test_yaml_is_loaded_safely_and_overrides_apply(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path / "shards", tmp_path / "out")))
    recipe = load_recipe(path, overrides=["optim.lr=3e-4", "data.genes=[A, B]", "eval={split: val, every: 2}"])
    assert recipe.optim.lr == 3e-4 and recipe.data.genes == ["A", "B"]
    assert recipe.eval is not None and recipe.eval.every == 2 and recipe.eval.split == "val"
    assert load_recipe(path, overrides=["precision=no"]).precision == "no"  # YAML 1.1 reads `no` as false
    with pytest.raises(DataError, match="precision"):
        load_recipe(path, overrides=["precision=true"])
    path.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(DataError, match="not valid YAML") as info:
        load_recipe(path)
    assert info.value.path == str(path)


def test_learning_rate_warms_up_then_decays_by_cosine():
    factor = _lr_lambda(OptimConfig(max_steps=10, warmup_steps=4, min_lr_ratio=0.1))
    values = [factor(s) for s in range(11)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert values[4] == pytest.approx(1.0) and values[10] == pytest.approx(0.1)
    assert values[7] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


# ----------------------------------------------------------------------------------------------------------------
# The loop


def test_resume_after_a_kill_gives_bitwise_identical_weights(shards, tmp_path):
    """2N steps straight == N steps, a save cut off half-way, resume to 2N; with grad accumulation, dropout,
    augmentation and more than one pass over the data (8 steps x 2 x 8 records > the 112 training records)."""
    changes = dict(optim__max_steps=8, optim__grad_accum=2, checkpoint_every=2, data__augment=True,
                   model__kwargs={"proj_drop_rate": 0.1},
                   objectives=[dict(name="expression"), dict(name="contrastive", weight=0.5, options={"dropout": 0.1})])
    straight = train(_recipe(shards, tmp_path / "a", **changes))
    assert straight["step"] == 8
    interrupted = _recipe(shards, tmp_path / "b", **changes)
    partial = train(interrupted, stop_after=5)
    assert partial["step"] == 5 and not (tmp_path / "b" / "final").exists()
    # The save at step 5 was cut off before its training_state.json: resume must take step 4's and drop it.
    newest = latest_checkpoint(tmp_path / "b")
    assert json.loads((newest / "training_state.json").read_text())["step"] == 5
    (newest / "training_state.json").unlink()
    assert json.loads((latest_checkpoint(tmp_path / "b") / "training_state.json").read_text())["step"] == 4
    resumed = train(interrupted, resume=True)
    assert resumed["step"] == 8
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    heads_a = load_file(tmp_path / "a" / "final" / "objectives.safetensors")
    heads_b = load_file(tmp_path / "b" / "final" / "objectives.safetensors")
    assert all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)
    # keep_last=3 kept the three newest complete checkpoints
    kept = sorted(json.loads((p / "training_state.json").read_text())["step"]
                  for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert kept == [4, 6, 8]


def test_nan_loss_stops_with_step_and_keys_and_keeps_the_last_checkpoint(shards, tmp_path, local_objective):
    recipe = _recipe(shards, tmp_path / "out", objectives=[dict(name="regress", options={"nan_at": 5})])
    recipe["data"]["log1p"] = False  # the local objective takes log1p itself
    with pytest.raises(NonFiniteLossError, match=r"at step 5 .*batch keys: \[SYN0") as info:
        train(recipe)
    assert "the last good checkpoint is" in str(info.value)
    kept = latest_checkpoint(tmp_path / "out")
    assert json.loads((kept / "training_state.json").read_text())["step"] == 3
    assert not (tmp_path / "out" / "final").exists()


def test_final_weights_load_through_the_registry(shards, tmp_path):
    from spfm.models.backbones import create_backbone

    out = tmp_path / "out"
    metrics = train(_recipe(shards, out, eval={"split": "val", "every": 3}, tracker="tensorboard"))
    assert metrics["step"] == 6 and "eval/loss" in metrics and torch.isfinite(torch.tensor(metrics["eval/loss"]))
    assert json.loads((out / "metrics.json").read_text())["step"] == 6
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard wrote no events"
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["backbone"] == BACKBONE and config["embed_dim"] == 192 and config["img_size"] == 32
    assert config["mean"] == [0.5, 0.5, 0.5] and len(config["genes"]) == 50
    assert config["recipe"]["optim"]["max_steps"] == 6
    saved = load_file(out / "final" / "model.safetensors")
    loaded = create_backbone(BACKBONE, checkpoint=str(out / "final" / "model.safetensors"), img_size=32)
    state = loaded.trunk.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    # the folder alone rebuilds the trained shape (img_size 32 from config.json) with identical outputs
    rebuilt = create_backbone(BACKBONE, checkpoint=str(out / "final")).eval()
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(rebuilt(images), loaded.eval()(images))
    fresh = create_backbone(BACKBONE, img_size=32).trunk.state_dict()
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])


def test_batch_stream_wraps_passes_and_rejects_an_empty_rank():
    class Loader:
        def __init__(self, n):
            self.n, self.epochs = n, []

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            self.epochs.append(self.epoch)
            return iter([{"i": (self.epoch, i)} for i in range(self.n)])

    loader = Loader(3)
    stream = _BatchStream(loader, epoch=1, consumed=2)
    assert [stream.next()["i"] for _ in range(4)] == [(1, 2), (2, 0), (2, 1), (2, 2)]
    assert stream.position() == {"rank": 0, "epoch": 2, "consumed": 3} and loader.epochs == [1, 2]
    with pytest.raises(DataError, match="rank 1 got no batches"):
        _BatchStream(Loader(0), rank=1).next()


# ----------------------------------------------------------------------------------------------------------------
# Bad input, caught before the first step


def test_panel_genes_missing_from_the_vocabulary(shards, tmp_path):
    recipe = _recipe(shards, tmp_path / "out", data__genes=["SG0001", "NOT_A_GENE"])
    with pytest.raises(DataError, match=r"1 of the 2 panel genes.*NOT_A_GENE") as info:
        train(recipe)
    assert info.value.field == "genes"
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_split_without_shards_and_missing_manifest(shards, tmp_path):
    with pytest.raises(DataError, match=r"no split 'holdout'"):
        train(_recipe(shards, tmp_path / "out", data__train_split="holdout"))
    with pytest.raises(DataError, match=r"manifest"):
        train(_recipe(tmp_path / "nowhere", tmp_path / "out"))


def test_a_finished_run_is_not_overwritten_without_resume(shards, tmp_path):
    out = tmp_path / "out"
    train(_recipe(shards, out, optim__max_steps=1, checkpoint_every=1))
    with pytest.raises(DataError, match=r"checkpoints of an earlier run.*resume") as info:
        train(_recipe(shards, out, optim__max_steps=1, checkpoint_every=1))
    assert info.value.field == "output_dir"
    with pytest.raises(DataError, match=r"cannot load the checkpoint into this recipe's model"):
        train(_recipe(shards, out, optim__max_steps=2, model__backbone="vit_small_patch16_224"), resume=True)
    assert train(_recipe(shards, out, optim__max_steps=2, checkpoint_every=1), resume=True)["step"] == 2


def test_checkpoint_of_another_architecture(shards, tmp_path):
    from spfm.models.backbones import create_backbone

    other = create_backbone("vit_small_patch16_224", img_size=32).trunk.state_dict()
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(path))
    with pytest.raises(DataError, match=r"does not fit|size mismatch|another architecture") as info:
        train(_recipe(shards, tmp_path / "out", model__checkpoint=str(path)))
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        train(_recipe(shards, tmp_path / "out", model__checkpoint=str(tmp_path / "missing.safetensors")))


# ----------------------------------------------------------------------------------------------------------------
# The shipped recipes, shrunken


def _shrink(shards: Path, out: Path) -> list[str]:
    return [f"data.shards={shards}", f"output_dir={out}", *TRAIN_SHRINK]


@pytest.mark.parametrize("name", ["pretrain_synthetic", "pretrain_her2st", "pretrain_hest1k"])
def test_pretraining_recipes_run_shrunken(name, shards, tmp_path):
    path = RECIPES / f"{name}.yaml"
    recipe = load_recipe(path)
    assert recipe.model.backbone.startswith("vit_")
    metrics = train(path, overrides=_shrink(shards, tmp_path / "out"))
    assert metrics["step"] == 2 and (tmp_path / "out" / "final" / "model.safetensors").is_file()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("eval/"))


@pytest.mark.parametrize(("name", "mode"), [("finetune_her2st", "lora"), ("finetune_her2st", "last_k"),
                                          ("finetune_her2st", "frozen"), ("finetune_synthetic", "lora")])
def test_finetune_recipe_runs_shrunken_from_a_pretrained_checkpoint(name, mode, shards, tmp_path):
    pretrained = tmp_path / "pre"
    train(RECIPES / "pretrain_synthetic.yaml", overrides=_shrink(shards, pretrained))
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.model.finetune.mode in ("lora", "last_k", "frozen") and recipe.eval is not None
    out = tmp_path / "ft"
    metrics = train(RECIPES / f"{name}.yaml", overrides=[
        *_shrink(shards, out), f"model.checkpoint={pretrained / 'final' / 'model.safetensors'}",
        f"model.finetune.mode={mode}"])
    assert metrics["step"] == 2 and "eval/loss" in metrics
    tuned = load_file(out / "final" / "model.safetensors")
    start = load_file(pretrained / "final" / "model.safetensors")
    assert tuned.keys() == start.keys()  # LoRA merged back: plain timm keys
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    if mode == "frozen":
        assert not changed
    else:
        assert changed and "patch_embed.proj.weight" not in changed
