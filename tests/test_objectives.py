"""Pretraining objectives (spfm.models.objectives) on a random-init tiny ViT with 32 px images (4 patches)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from spfm.errors import DataError
from spfm.models.backbones import create_backbone
from spfm.models.objectives import (
    OBJECTIVES,
    ContrastiveObjective,
    ExpressionObjective,
    MaskedImageObjective,
    build_objective,
    combine,
    masked_l1,
    symmetric_info_nce,
)

N_GENES = 12


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", img_size=32)


def paired_batch(batch_size: int = 16, seed: int = 0) -> dict:
    """Images of distinct flat colours (+ noise) and expression that is a fixed function of the colour."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(batch_size, 3, generator=g)
    images = (colours[:, :, None, None] + 0.05 * torch.randn(batch_size, 3, 32, 32, generator=g)).clamp(0, 1)
    weights = torch.randn(3, N_GENES, generator=torch.Generator().manual_seed(123)) * 2
    expression = torch.log1p(torch.exp(colours @ weights))         # already log1p'd, as with data.log1p: true
    mask = torch.ones(batch_size, N_GENES, dtype=torch.bool)
    return {"image": images, "expression": expression, "mask": mask, "key": [str(i) for i in range(batch_size)],
            "meta": [{} for _ in range(batch_size)]}


def run(objective, backbone, batch: dict) -> dict:
    """What the training loop does: normalise, embed once, call the objective with the normalised images."""
    images = backbone.normalize(batch["image"])
    return objective(backbone(images), {**batch, "image": images}, backbone)


def train(objective, backbone, batch: dict, steps: int, lr: float = 1e-3, reseed: bool = False) -> list[float]:
    params = list(backbone.parameters()) + list(objective.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        if reseed:  # the same random mask every step
            torch.manual_seed(1)
        loss = run(objective, backbone, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------------------------------------------
# All objectives


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_is_finite_scalar_and_trains_the_backbone(name, backbone):
    objective = build_objective(name, embed_dim=backbone.embed_dim, n_genes=N_GENES)
    batch = paired_batch(8)
    if name == "masked_image":  # image-only corpora: it must work without expression
        batch = {k: v for k, v in batch.items() if k not in ("expression", "mask")}
    out = run(objective, backbone, batch)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert all(v.shape == () and not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    first_block = backbone.trunk.blocks[0].attn.qkv.weight.grad
    assert first_block is not None and first_block.abs().sum() > 0
    assert all(p.grad is not None for p in objective.parameters() if p.requires_grad)


def test_build_objective_errors():
    with pytest.raises(DataError, match="unknown objective 'mim'.*contrastive, expression, masked_image"):
        build_objective("mim", embed_dim=8, n_genes=4)
    with pytest.raises(DataError, match="option 'proj_dimm'.*options: .*proj_dim") as err:
        build_objective("contrastive", embed_dim=8, n_genes=4, proj_dimm=16)
    assert err.value.field == "options.proj_dimm"
    with pytest.raises(DataError, match="option 'mask_ratio'.*less than 1"):
        build_objective("masked_image", embed_dim=8, n_genes=0, mask_ratio=1.5)
    with pytest.raises(DataError, match="option 'hidden_dim'"):   # a string is not silently coerced
        build_objective("expression", embed_dim=8, n_genes=4, hidden_dim="64")
    with pytest.raises(DataError, match="n_genes"):
        build_objective("expression", embed_dim=8, n_genes=0)


def test_expression_objectives_reject_a_batch_of_another_panel(backbone):
    objective = build_objective("expression", embed_dim=backbone.embed_dim, n_genes=N_GENES + 1)
    with pytest.raises(DataError, match=f"built for {N_GENES + 1} genes"):
        run(objective, backbone, paired_batch(4))
    contrastive = build_objective("contrastive", embed_dim=backbone.embed_dim, n_genes=N_GENES)
    image_only = {k: v for k, v in paired_batch(4).items() if k != "expression"}
    with pytest.raises(DataError, match=r"needs batch\['expression'\]"):
        run(contrastive, backbone, image_only)


def test_combine_weights_and_prefixes(backbone):
    torch.manual_seed(0)
    parts = {"expression": build_objective("expression", embed_dim=backbone.embed_dim, n_genes=N_GENES),
             "contrastive": build_objective("contrastive", embed_dim=backbone.embed_dim, n_genes=N_GENES,
                                            dropout=0.0)}
    combined = combine(parts, {"contrastive": 0.25})
    out = run(combined, backbone, paired_batch(8))
    expected = out["expression/loss"] * 1.0 + out["contrastive/loss"] * 0.25
    assert torch.allclose(out["loss"], expected)
    assert {"contrastive/temperature", "contrastive/accuracy", "expression/measured"} <= set(out)
    assert out["loss"].requires_grad and not out["contrastive/loss"].requires_grad
    with pytest.raises(DataError, match="not combined"):
        combine(parts, {"masked_image": 1.0})
    with pytest.raises(DataError, match="positive"):
        combine(parts, {"expression": 0.0})


# ----------------------------------------------------------------------------------------------------------------
# Contrastive


def test_info_nce_is_symmetric_and_log_n_at_chance():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=-1)
    scale = torch.tensor(7.0)
    ab, _ = symmetric_info_nce(a, b, scale)
    ba, _ = symmetric_info_nce(b, a, scale)
    assert torch.allclose(ab, ba)
    same = torch.nn.functional.normalize(torch.ones(10, 8), dim=-1)
    chance, _ = symmetric_info_nce(same, same, scale)
    assert chance.item() == pytest.approx(math.log(10), abs=1e-5)
    perfect, acc = symmetric_info_nce(torch.eye(10), torch.eye(10), torch.tensor(100.0))
    assert perfect.item() < 1e-3 and acc.item() == 1.0


def test_contrastive_learns_paired_data_and_not_shuffled(backbone):
    torch.manual_seed(0)
    batch = paired_batch(16)
    log_b = math.log(16)
    objective = ContrastiveObjective(backbone.embed_dim, N_GENES, dropout=0.0)

    def shuffled_loss() -> float:
        with torch.no_grad():
            return sum(run(objective, backbone, {**batch, "expression": batch["expression"][torch.randperm(16)]}
                           )["loss"].item() for _ in range(5)) / 5

    init = run(objective, backbone, batch)
    # at init the pairing is unknown: chance level, the same as with shuffled pairs
    assert init["loss"].item() == pytest.approx(log_b, abs=0.4)
    assert init["loss"].item() == pytest.approx(shuffled_loss(), abs=0.15)
    assert init["temperature"].item() == pytest.approx(0.07, rel=1e-5)
    losses = train(objective, backbone, batch, steps=20, lr=1e-4)
    with torch.no_grad():
        backbone.eval()
        objective.eval()
        paired = run(objective, backbone, batch)
    assert paired["loss"].item() < log_b - 1.0, losses
    assert paired["accuracy"].item() > 0.5
    shuffled = shuffled_loss()
    assert shuffled > log_b - 0.3 and shuffled > paired["loss"].item() + 1.0


def test_contrastive_temperature_is_learnt():
    """The temperature moves with training, sharpening for fitted pairs and softening for mismatched ones."""
    torch.manual_seed(0)
    objective = ContrastiveObjective(32, N_GENES, dropout=0.0, proj_dim=32, hidden_dim=32)
    embeddings = torch.randn(16, 32)
    batch = paired_batch(16)
    opt = torch.optim.Adam(objective.parameters(), lr=1e-2)
    for _ in range(40):
        out = objective(embeddings, batch, None)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert abs(out["temperature"].item() - 0.07) > 1e-3

    def scale_grad(expression):
        objective.zero_grad()
        objective(embeddings, {**batch, "expression": expression}, None)["loss"].backward()
        return objective.logit_scale.grad.item()

    assert scale_grad(batch["expression"]) < 0                       # fitted pairs: a larger scale lowers the loss
    assert scale_grad(batch["expression"].roll(1, dims=0)) > 0       # mismatched pairs: a smaller one does


def test_contrastive_fixed_temperature_and_clamp(backbone):
    frozen = ContrastiveObjective(backbone.embed_dim, N_GENES, learn_temperature=False)
    assert not frozen.logit_scale.requires_grad
    train(frozen, backbone, paired_batch(8), steps=2)
    assert frozen.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    clamped = ContrastiveObjective(backbone.embed_dim, N_GENES, init_temperature=0.001, max_logit_scale=100.0)
    assert run(clamped, backbone, paired_batch(8))["temperature"].item() == pytest.approx(0.01, rel=1e-5)


def test_contrastive_encoder_sees_the_mask_not_the_masked_values():
    objective = ContrastiveObjective(16, N_GENES, dropout=0.0)
    batch = paired_batch(6)
    mask = batch["mask"].clone()
    mask[:, :3] = False
    z = objective.embed_expression(batch["expression"], mask)
    altered = batch["expression"].clone()
    altered[:, :3] += 50.0
    assert torch.allclose(z, objective.embed_expression(altered, mask))
    assert not torch.allclose(z, objective.embed_expression(batch["expression"], batch["mask"]))


_DDP_SCRIPT = textwrap.dedent("""
    import gc, json, os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from spfm.models.objectives import ContrastiveObjective

    SIZES = (3, 5)

    def data():
        g = torch.Generator().manual_seed(0)
        n = sum(SIZES)
        return (torch.randn(n, 16, generator=g), torch.rand(n, 6, generator=g) * 4,
                torch.rand(n, 6, generator=g) > 0.2)

    def model():
        torch.manual_seed(0)
        return ContrastiveObjective(16, 6, dropout=0.0, proj_dim=8, hidden_dim=8)

    def worker(rank, port, out):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        emb, expr, mask = data()
        lo = sum(SIZES[:rank]); hi = lo + SIZES[rank]
        obj = model()
        res = obj(emb[lo:hi], {"expression": expr[lo:hi], "mask": mask[lo:hi]}, None)
        # weight by the share of rows so the ranks' terms add up to the full-batch mean
        (res["loss"] * SIZES[rank] / sum(SIZES)).backward()
        grads = torch.cat([p.grad.flatten() for p in obj.parameters()])
        dist.all_reduce(grads)
        terms = torch.tensor([res["loss"].item() * SIZES[rank] / sum(SIZES), res["negatives"].item()])
        dist.all_reduce(terms[:1])
        if rank == 0:
            json.dump({"loss": terms[0].item(), "negatives": terms[1].item(), "grads": grads.tolist()},
                      open(out, "w"))
        # Drop every tensor of the autograd graph (the gathered parts' backward holds gloo work) before teardown.
        del res, grads, terms, obj
        gc.collect()
        # Both ranks done with every collective before teardown: tearing gloo down while the other rank still
        # has work in flight aborted a process now and then ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        port, out = int(sys.argv[1]), sys.argv[2]
        mp.spawn(worker, args=(port, out), nprocs=2)
        emb, expr, mask = data()
        obj = model()
        res = obj(emb, {"expression": expr, "mask": mask}, None)
        res["loss"].backward()
        dist_res = json.load(open(out))
        dist_res["single_loss"] = res["loss"].item()
        dist_res["single_grads"] = torch.cat([p.grad.flatten() for p in obj.parameters()]).tolist()
        json.dump(dist_res, open(out, "w"))
""")


def test_contrastive_gathers_negatives_across_ranks(tmp_path):
    """Two gloo processes with 3 and 5 rows: the gathered loss and gradients equal those of the 8-row batch."""
    import socket

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}                # two processes on a small CPU machine
    proc = subprocess.run([sys.executable, str(script), str(port), str(out)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["negatives"] == 7.0                     # rank 0 (3 rows) scored against all 8
    assert res["loss"] == pytest.approx(res["single_loss"], rel=1e-5)
    assert torch.allclose(torch.tensor(res["grads"]), torch.tensor(res["single_grads"]), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Expression


def test_expression_loss_ignores_masked_genes(backbone):
    torch.manual_seed(0)
    objective = ExpressionObjective(backbone.embed_dim, N_GENES, hidden_dim=32)
    batch = paired_batch(8)
    batch["mask"][:, ::2] = False
    embeddings = backbone(backbone.normalize(batch["image"])).detach().requires_grad_(True)

    def loss_and_grad(expression):
        embeddings.grad = None
        loss = objective(embeddings, {**batch, "expression": expression}, backbone)["loss"]
        loss.backward()
        return loss.item(), embeddings.grad.clone()

    base_loss, base_grad = loss_and_grad(batch["expression"])
    masked_changed = batch["expression"].clone()
    masked_changed[:, ::2] = 1e6
    loss, grad = loss_and_grad(masked_changed)
    assert loss == base_loss and torch.equal(grad, base_grad)
    measured_changed = batch["expression"].clone()
    measured_changed[:, 1] += 1.0
    assert loss_and_grad(measured_changed)[0] != pytest.approx(base_loss)
    # the value is the mean over measured entries only
    with torch.no_grad():
        pred = objective.head(embeddings)
    expected = ((pred - batch["expression"])[:, 1::2] ** 2).mean()
    assert base_loss == pytest.approx(expected.item(), rel=1e-5)


def test_expression_all_masked_batch_is_zero_without_nan(backbone):
    objective = build_objective("expression", embed_dim=backbone.embed_dim, n_genes=N_GENES, log1p=True,
                                target_sum=1e4)
    batch = paired_batch(4)
    batch["mask"][:] = False
    out = run(objective, backbone, batch)
    assert out["loss"].item() == 0.0 and out["measured"].item() == 0.0
    out["loss"].backward()
    grads = [p.grad for p in list(objective.parameters()) + list(backbone.parameters()) if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_expression_transform_options():
    objective = ExpressionObjective(4, 3, log1p=True, target_sum=10.0)
    with torch.no_grad():
        for p in objective.head.parameters():
            p.zero_()
    counts = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    # measured counts 1, 3 scaled to sum 10 -> 2.5, 7.5; the unmeasured 100 does not enter the library size
    expected = (math.log1p(2.5) ** 2 + math.log1p(7.5) ** 2) / 2
    loss = objective(torch.zeros(1, 4), {"expression": counts, "mask": mask}, None)["loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Masked image modelling


def test_mim_loss_depends_only_on_masked_patches(backbone):
    torch.manual_seed(0)
    mim = MaskedImageObjective(backbone.embed_dim, mask_ratio=0.5)
    images = backbone.normalize(paired_batch(4)["image"])
    mask = mim.sample_mask(4, 4, generator=torch.Generator().manual_seed(0))
    assert mask.sum(dim=1).tolist() == [2, 2, 2, 2]
    with torch.no_grad():
        pred, target = mim.predict(images, mask, backbone), mim.targets(images)
    loss = masked_l1(pred, target, mask)
    kept = target.clone()
    kept[~mask] += 5.0
    assert masked_l1(pred, kept, mask).item() == loss.item()
    hidden = target.clone()
    hidden[mask] += 5.0
    assert masked_l1(pred, hidden, mask).item() > loss.item() + 1.0
    # the pixels of a masked patch never reach the trunk: changing them leaves every prediction unchanged
    b, row = 0, int(mask[0].nonzero()[0])
    gy, gx = divmod(row, 2)
    changed = images.clone()
    changed[b, :, gy * 16:(gy + 1) * 16, gx * 16:(gx + 1) * 16] = torch.randn(3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(mim.predict(changed, mask, backbone), pred, atol=1e-5)
        unmasked = mim.predict(changed, torch.zeros_like(mask), backbone)
    assert not torch.allclose(unmasked[b], pred[b], atol=1e-3)


def test_mim_targets_are_patches_in_token_order():
    mim = MaskedImageObjective(8, patch_size=16, norm_target=False)
    images = torch.zeros(1, 3, 32, 32)
    images[0, 1, 16:, :16] = 1.0           # bottom-left patch, green channel: row-major patch index 2
    target = mim.targets(images).reshape(1, 4, 256, 3)
    assert target[0, 2, :, 1].eq(1).all() and target.sum().item() == 256
    normed = MaskedImageObjective(8, patch_size=16).targets(torch.rand(2, 3, 32, 32)).reshape(2, 4, 256, 3)
    assert torch.allclose(normed.mean(dim=2), torch.zeros(2, 4, 3), atol=1e-5)


def test_mim_loss_decreases_on_a_fixed_batch(backbone):
    torch.manual_seed(0)
    mim = build_objective("masked_image", embed_dim=backbone.embed_dim, n_genes=0)
    batch = {"image": paired_batch(8)["image"]}
    losses = train(mim, backbone, batch, steps=15, lr=2e-3, reseed=True)
    assert losses[-1] < 0.8 * losses[0], losses


def test_mim_checks_the_trunk(backbone):
    images = backbone.normalize(paired_batch(2)["image"])
    wrong_patch = MaskedImageObjective(backbone.embed_dim, patch_size=14)
    with pytest.raises(DataError, match="patch_size: 16"):
        wrong_patch(backbone(images), {"image": images[..., :28, :28]}, backbone)
    wrong_width = MaskedImageObjective(2 * backbone.embed_dim)
    with pytest.raises(DataError, match=f"token_dim: {backbone.embed_dim}"):
        wrong_width(backbone(images), {"image": images}, backbone)
