"""Training-step overhead: spfm's loop (``spfm.train.train``) against a plain PyTorch + timm loop, same process.

Both train the same timm ViT with spfm's ``expression`` objective (an MLP head, masked MSE) on the same batches,
already in memory (on the device), with the same optimiser (AdamW, cosine schedule, gradient clipping at 1.0) and
the same precision. spfm's side is the real ``train()`` (Accelerate, gradient-accumulation context, per-step NaN
check across ranks, metric logging, checkpointing only at the end); only its shard loader is replaced by the
in-memory batches, which also time the loop: the interval between fetching batch ``warmup`` and batch
``warmup + steps`` is ``steps`` whole training steps. The plain loop is timed the same way (synchronised around the
measured steps on a GPU). Runs alternate, ``--repeats`` times each; the median is reported. Goal: spfm within 5%
of plain (``spfm_fraction_of_plain >= 0.95``).

On CUDA it also reports MFU: FLOPs per image = 3 x the forward FLOPs of backbone + head (counted with
``torch.utils.flop_counter.FlopCounterMode``), against the GPU's dense peak for the precision.

    python benchmarks/train_overhead.py [--backbone vit_tiny_patch16_224] [--img-size 64] [--batch-size 32]
        [--steps 30] [--warmup 5] [--precision no|bf16|fp16] [--repeats 3] [--out [PATH]]
    python benchmarks/train_overhead.py --backbone vit_base_patch16_224 --img-size 224 --batch-size 128 \
        --precision bf16      # on a GPU; then vit_large_patch16_224
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from report import emit, peak_memory_mb, versions

# Dense peak TFLOP/s by GPU name fragment and precision (vendor data sheets; fp32 runs use TF32 tensor cores).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "no": 494.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "no": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "no": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "no": 156.0},
}


class _Clock:
    """Wall and process CPU time at each call of :meth:`tick`."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def span(self, start: int, end: int) -> tuple[float, float]:
        return self.wall[end] - self.wall[start], self.cpu[end] - self.cpu[start]


class _MemoryLoader:
    """Stands in for the shard loader: yields prepared batches endlessly, ticking a clock at each fetch."""

    def __init__(self, batches: list[dict[str, Any]], genes: list[str], clock: _Clock) -> None:
        self.batches = batches
        self.clock = clock
        self.dataset = type("Dataset", (), {"genes": genes})()

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        i = 0
        while True:
            self.clock.tick()
            yield self.batches[i % len(self.batches)]
            i += 1


def make_batches(n: int, batch_size: int, img_size: int, n_genes: int, device: Any) -> list[dict[str, Any]]:
    """``n`` batches like the loader's: image (B, 3, S, S) in [0, 1], log1p expression (B, G), mask (B, G)."""
    import torch

    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(n):
        expression = torch.log1p(torch.poisson(torch.full((batch_size, n_genes), 2.0), generator=g))
        batches.append(dict(image=torch.rand(batch_size, 3, img_size, img_size, generator=g).to(device),
                            expression=expression.to(device),
                            mask=torch.ones(batch_size, n_genes, dtype=torch.bool).to(device),
                            key=[f"B{b}_{i}" for i in range(batch_size)], meta=[{}] * batch_size))
    return batches


def _recipe(args: argparse.Namespace, out: Path, total_steps: int) -> dict[str, Any]:
    return dict(
        data=dict(shards="(in memory)", batch_size=args.batch_size),
        model=dict(backbone=args.backbone, img_size=args.img_size),
        objectives=[dict(name="expression")],
        optim=dict(lr=1e-4, weight_decay=0.05, warmup_steps=2, max_steps=total_steps, clip_grad_norm=1.0),
        precision=args.precision, seed=0, output_dir=str(out), checkpoint_every=10 * total_steps, keep_last=1,
        tracker="none", progress=False,
    )


def run_spfm(args: argparse.Namespace, batches: list[dict[str, Any]], genes: list[str]) -> tuple[float, float]:
    """(wall s, cpu s) of ``args.steps`` steps of spfm's train()."""
    import spfm.train.loop as loop

    clock = _Clock()
    original = loop.make_train_loader
    loop.make_train_loader = lambda *a, **k: _MemoryLoader(batches, genes, clock)
    try:
        with tempfile.TemporaryDirectory(prefix="spfm-overhead-") as tmp:
            loop.train(_recipe(args, Path(tmp), args.warmup + args.steps + 1))
    finally:
        loop.make_train_loader = original
    # fetch k happens at the start of step k (0-based); fetches warmup .. warmup + steps bracket `steps` steps
    return clock.span(args.warmup, args.warmup + args.steps)


def _plain_model(args: argparse.Namespace, n_genes: int, device: Any):
    import timm
    import torch

    from spfm.models.objectives import build_objective

    torch.manual_seed(0)
    trunk = timm.create_model(args.backbone, img_size=args.img_size, num_classes=0).to(device)
    head = build_objective("expression", embed_dim=trunk.num_features, n_genes=n_genes).to(device)
    return trunk, head


def run_plain(args: argparse.Namespace, batches: list[dict[str, Any]], n_genes: int) -> tuple[float, float]:
    """(wall s, cpu s) of ``args.steps`` steps of a plain loop: autocast, backward, clip, AdamW, cosine schedule."""
    import torch

    device = batches[0]["image"].device
    trunk, head = _plain_model(args, n_genes, device)
    params = [p for m in (trunk, head) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    total = args.warmup + args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * s / total)))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    mean = torch.tensor([0.5, 0.5, 0.5], device=device).view(1, 3, 1, 1)
    clock = _Clock()
    for step in range(total + 1):
        if step in (args.warmup, total):
            if device.type == "cuda":
                torch.cuda.synchronize()
            clock.tick()
        if step == total:
            break
        batch = batches[step % len(batches)]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            embeddings = trunk((batch["image"] - mean) / 0.5)
            loss = head(embeddings, batch, trunk)["loss"]
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return clock.span(0, 1)


def forward_flops_per_image(args: argparse.Namespace, batches: list[dict[str, Any]], n_genes: int) -> float:
    """Forward FLOPs of backbone + expression head per image (FlopCounterMode counts matmuls and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = batches[0]["image"].device
    trunk, head = _plain_model(args, n_genes, device)
    batch = batches[0]
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        head(trunk(batch["image"]), batch, trunk)
    return counter.get_total_flops() / batch["image"].shape[0]


def _peak(device_name: str, precision: str) -> float | None:
    for fragment, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if fragment in device_name:
            return peaks[precision] * 1e12
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--genes", type=int, default=250, help="expression panel size")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", nargs="?", type=Path, const=True, default=None,
                        help="write the JSON under benchmarks/results/ (or to the path given)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True  # both loops alike
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name(0)
    else:
        device = torch.device("cpu")
        device_name = platform.processor() or platform.machine()
    began = time.perf_counter()
    batches = make_batches(4, args.batch_size, args.img_size, args.genes, device)
    genes = [f"G{i}" for i in range(args.genes)]
    spfm_runs, plain_runs = [], []
    for _ in range(args.repeats):
        spfm_runs.append(run_spfm(args, batches, genes))
        plain_runs.append(run_plain(args, batches, args.genes))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    images = args.steps * args.batch_size
    clock = 0 if device.type == "cuda" else 1  # wall on a GPU; process CPU time on a (shared) CPU
    spfm_rate = images / statistics.median(r[clock] for r in spfm_runs)
    plain_rate = images / statistics.median(r[clock] for r in plain_runs)
    figures: dict[str, Any] = dict(
        spfm_images_per_s=round(spfm_rate, 2),
        plain_images_per_s=round(plain_rate, 2),
        spfm_fraction_of_plain=round(spfm_rate / plain_rate, 4),
        goal_fraction=0.95,
        clock="wall" if clock == 0 else "cpu (process user + system)",
    )
    if device.type == "cuda":
        flops = 3 * forward_flops_per_image(args, batches, args.genes)
        peak = _peak(device_name, args.precision)
        figures.update(train_gflops_per_image=round(flops / 1e9, 3),
                       peak_tflops=peak / 1e12 if peak else None,
                       spfm_mfu=round(spfm_rate * flops / peak, 4) if peak else None,
                       plain_mfu=round(plain_rate * flops / peak, 4) if peak else None,
                       peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    result = dict(
        name="train_overhead",
        dataset=f"random in-memory batches ({args.batch_size} x 3 x {args.img_size}^2, {args.genes} genes)",
        device=device_name,
        settings=dict(backbone=args.backbone, img_size=args.img_size, batch_size=args.batch_size, steps=args.steps,
                      warmup=args.warmup, precision=args.precision, repeats=args.repeats, statistic="median",
                      torch_threads=torch.get_num_threads(), optimiser="AdamW + cosine + clip 1.0",
                      objective="expression"),
        figures=figures,
        seconds=dict(total=round(time.perf_counter() - began, 2),
                     spfm=[[round(w, 4), round(c, 4)] for w, c in spfm_runs],
                     plain=[[round(w, 4), round(c, 4)] for w, c in plain_runs], columns=["wall", "cpu"]),
        peak_memory_mb=peak_memory_mb(),
        versions=versions("torch", "accelerate", "timm"),
    )
    tag = f"{args.backbone}_{args.precision}_{'gpu' if device.type == 'cuda' else 'cpu'}"
    return emit(result, args.out, f"train_overhead_{tag}.json")


if __name__ == "__main__":
    main()
