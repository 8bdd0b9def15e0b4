"""Data-path throughput: shard writing against a naive baseline, and loading against the JPEG decode limit.

Prints one JSON object (``--out`` also writes it under ``benchmarks/results/``). Everything runs in this one process
(torch limited to one thread), on the same records. Each figure is the median of ``--repeats`` runs, interleaved,
timed by process CPU time (user + system), which a busy shared machine disturbs far less than wall time; wall-time
figures are reported beside them.

1. Shard writing: ``spfm.data.shards.write_shards(workers=1)`` on a HEST root, against a naive baseline that opens
   each slide image with PIL (decoding it whole), crops and resizes every spot the writer kept, encodes it as JPEG
   at the same quality and writes one file per patch. The naive baseline does less (no tissue mask, no expression,
   no metadata, no checksums) and gets its spot coordinates for free. Figure: patches per second; goal >= 3x.
2. Loading: ``spfm.data.loader.make_loader(split="train", augment=False, num_workers=0)`` over one epoch, against the
   decode limit: read the same shards' tar members and decode each JPEG into a float (3, H, W) tensor in [0, 1],
   with PIL (the limit the issue names) and with torchvision's decoder. Figure: samples per second; goal >= 90%.

The writer's time is also split by stage in a separate, instrumented pass (wrappers around the slide read, resize,
tissue mask, JPEG encode and shard write), which says where per-patch time goes.

Datasets: ``her2st`` (default; the four HER2ST sections of ../shared/data imported into a temporary HEST root) or
``synthetic`` (spfm's synthetic corpus).

    python benchmarks/data_throughput.py [--dataset her2st|synthetic] [--repeats 5] [--out [PATH]]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from her2st_folds import HER2ST_SECTIONS, SHARED_DATA, import_her2st
from report import emit, peak_memory_mb, versions


def build_root(dataset: str, root: Path, data: Path) -> str:
    """Write the benchmark corpus as a HEST root; return a description of it."""
    if dataset == "her2st":
        if not (data / "her2st").is_dir():
            sys.exit(f"{data / 'her2st'} not found; pass --data or use --dataset synthetic")
        import_her2st(data, root)  # patient = the section's letter
        return f"her2st ({', '.join(HER2ST_SECTIONS)}), imported with spfm.data.importers.import_legacy_st"
    from spfm.data.synthetic import make_synthetic_corpus

    make_synthetic_corpus(root, seed=0)
    return "synthetic (make_synthetic_corpus(seed=0))"


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_writer(root: Path, out: Path, quality: int) -> tuple[Clock, dict]:
    """Time write_shards on the whole root (one process); return the clock and the manifest."""
    import shutil

    from spfm.data.shards import write_shards

    shutil.rmtree(out, ignore_errors=True)
    with Clock() as clock:
        manifest = write_shards(root, out, jpeg_quality=quality, workers=1, progress=False, card=False)
    return clock, manifest


def kept_spots(root: Path, manifest: dict) -> dict[str, tuple[float, np.ndarray]]:
    """Per sample: (slide pixel size, (n, 2) pixel (x, y) of the spots the writer kept), read from the shards."""
    spots: dict[str, list] = defaultdict(list)
    for shard in manifest["shards"]:
        with tarfile.open(root / shard["path"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    spots[meta["sample_id"]].append((meta["x"], meta["y"]))
    return {sid: (manifest["samples"][sid]["pixel_size_um"], np.asarray(xy)) for sid, xy in spots.items()}


def run_naive(hest_root: Path, spots: dict, out: Path, patch_px: int, patch_um: float, quality: int) -> Clock:
    """Time the naive baseline: PIL opens each slide whole, then crop + resize + JPEG + one file per patch."""
    import shutil

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    shutil.rmtree(out, ignore_errors=True)
    with Clock() as clock:
        for sid, (pixel_size, xy) in spots.items():
            folder = out / sid
            folder.mkdir(parents=True)
            slide = next((hest_root / "wsis").glob(f"{sid}.*"))
            side = patch_px * patch_um / pixel_size
            with Image.open(slide) as image:
                image.load()  # decodes the whole slide
                if image.mode != "RGB":
                    image = image.convert("RGB")
                for i, (x, y) in enumerate(xy):
                    x0, y0 = round(x - side / 2), round(y - side / 2)
                    crop = image.crop((x0, y0, x0 + round(side), y0 + round(side)))
                    crop.resize((patch_px, patch_px), Image.Resampling.BILINEAR).save(folder / f"{i}.jpg",
                                                                                      quality=quality)
    return clock


def run_loader(shards: Path, split: str) -> tuple[Clock, int]:
    """Time one epoch of make_loader over ``split`` (one process, no augmentation); also return the sample count."""
    from spfm.data.loader import make_loader

    loader = make_loader(shards, split=split, batch_size=32, augment=False, num_workers=0)
    n = 0
    with Clock() as clock:
        for batch in loader:
            n += batch["image"].shape[0]
    return clock, n


def run_decode_limit(shards: Path, manifest: dict, split: str, decoder: str) -> tuple[Clock, int]:
    """Time reading the split's tar members and decoding each JPEG to a float (3, H, W) tensor in [0, 1]."""
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    paths = [shards / s["path"] for s in manifest["shards"] if s["split"] == split]
    n = 0
    with Clock() as clock:
        for path in paths:
            with tarfile.open(path) as tar:
                for member in tar:
                    if not member.name.endswith(".jpg"):
                        continue
                    data = tar.extractfile(member).read()
                    if decoder == "pil":
                        with Image.open(io.BytesIO(data)) as im:
                            chw = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)
                    else:
                        chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                          mode=ImageReadMode.RGB)
                    chw.float().div_(255)
                    n += 1
    return clock, n


@contextmanager
def stage_timers():
    """Wrap the writer's stages with CPU timers; yields a dict stage -> [seconds, calls]."""
    import webdataset as wds

    import spfm.data.patches as patches
    import spfm.data.shards as shards
    from spfm.data.slide import Slide

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    targets = [
        (Slide, "read_region", "slide read (tile decode + copy)"),
        (patches, "resize", "resize"),
        (patches, "tissue_fraction", "tissue mask"),
        (shards, "_encode_image", "image encode"),
        (wds.ShardWriter, "write", "tar write"),
        (shards, "encode_record", "record encode (npy + json)"),
        (shards, "read_sample", "read sample (h5ad + checks)"),
        (shards, "_counts_matrix", "counts onto vocabulary"),
    ]
    originals = []

    def wrap(fn, name):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name][0] += time.process_time() - start
                totals[name][1] += 1
        return timed

    for owner, attr, name in targets:
        originals.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, wrap(getattr(owner, attr), name))
    try:
        yield totals
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


def _rate(n: int, clocks: list[Clock], attr: str) -> float:
    return n / statistics.median(getattr(c, attr) for c in clocks)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("her2st", "synthetic"), default="her2st")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder (for her2st)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement (median reported)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality for both writer and baseline")
    parser.add_argument("--out", nargs="?", type=Path, const=True, default=None,
                        help="write the JSON under benchmarks/results/ (or to the path given)")
    args = parser.parse_args(argv)

    import torch

    from spfm.data.patches import PatchConfig

    torch.set_num_threads(1)  # one process, one core: the loader's collation would otherwise fan out
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spfm-bench-") as tmp:
        tmp = Path(tmp)
        root, shards, naive = tmp / "hest", tmp / "shards", tmp / "naive"
        with Clock() as import_clock:
            description = build_root(args.dataset, root, args.data)
        patch = PatchConfig()

        # warm-up (imports, codec set-up, page cache), then writer and baseline alternately
        _, manifest = run_writer(root, shards, args.quality)
        spots = kept_spots(shards, manifest)
        run_naive(root, {sid: (ps, xy[:4]) for sid, (ps, xy) in spots.items()}, naive, patch.size_px,
                  patch.pixel_size_um, args.quality)
        writer, baseline = [], []
        for _ in range(args.repeats):
            writer.append(run_writer(root, shards, args.quality)[0])
            baseline.append(run_naive(root, spots, naive, patch.size_px, patch.pixel_size_um, args.quality))
        n_patches = manifest["totals"]["records"]
        assert n_patches == sum(len(xy) for _, xy in spots.values())

        with stage_timers() as stages:
            staged, _ = run_writer(root, shards, args.quality)
        breakdown = {name: round(1e3 * sec / n_patches, 4)
                     for name, (sec, _) in sorted(stages.items(), key=lambda kv: -kv[1][0])}
        breakdown["everything else"] = round(1e3 * (staged.cpu - sum(sec for sec, _ in stages.values())) / n_patches, 4)

        per_split = manifest["totals"]["records_per_split"]
        split = max(per_split, key=per_split.get)
        run_loader(shards, split)
        loader, pil, tv = [], [], []
        for _ in range(args.repeats):
            clock, n_loaded = run_loader(shards, split)
            loader.append(clock)
            clock, n_decoded = run_decode_limit(shards, manifest, split, "pil")
            pil.append(clock)
            tv.append(run_decode_limit(shards, manifest, split, "torchvision")[0])
        assert n_loaded == n_decoded == per_split[split]

    figures: dict = dict(patches=n_patches, samples=len(spots), loader_split=split, loader_records=n_loaded,
                         writer_goal_speedup=3.0, loader_goal_fraction=0.9)
    for attr in ("cpu", "wall"):
        w, b = _rate(n_patches, writer, attr), _rate(n_patches, baseline, attr)
        ld, lp, lt = _rate(n_loaded, loader, attr), _rate(n_decoded, pil, attr), _rate(n_decoded, tv, attr)
        figures[attr] = dict(
            writer_patches_per_s=round(w, 1),
            naive_patches_per_s=round(b, 1),
            writer_speedup_vs_naive=round(w / b, 3),
            loader_samples_per_s=round(ld, 1),
            decode_limit_pil_samples_per_s=round(lp, 1),
            decode_limit_torchvision_samples_per_s=round(lt, 1),
            loader_fraction_of_pil_decode_limit=round(ld / lp, 3),
            loader_fraction_of_torchvision_decode_limit=round(ld / lt, 3),
        )
    figures["writer_cpu_ms_per_patch_by_stage"] = breakdown

    def runs(clocks: list[Clock]) -> dict:
        return dict(cpu=[round(c.cpu, 3) for c in clocks], wall=[round(c.wall, 3) for c in clocks])

    result = dict(
        name="data_throughput",
        dataset=description,
        figures=figures,
        seconds=dict(total=round(time.perf_counter() - began, 2), import_corpus=round(import_clock.wall, 2),
                     writer=runs(writer), naive=runs(baseline), loader=runs(loader), decode_limit_pil=runs(pil),
                     decode_limit_torchvision=runs(tv)),
        settings=dict(repeats=args.repeats, statistic="median", primary_clock="cpu (process user + system)",
                      jpeg_quality=args.quality, patch=patch.to_dict(), torch_threads=1,
                      writer="write_shards(workers=1, card=False)",
                      loader="make_loader(batch_size=32, shuffle=1000, augment=False, num_workers=0)",
                      decode_limit="tarfile read + JPEG decode + float (3, H, W) / 255, per image"),
        peak_memory_mb=peak_memory_mb(),
        versions=versions("numpy", "PIL", "torch", "torchvision", "webdataset",
                          cpu=platform.processor() or platform.machine()),
    )
    return emit(result, args.out, f"data_throughput_{args.dataset}.json")


if __name__ == "__main__":
    main()
