"""``spfm demo`` for HisToSGE: histology -> expression on the synthetic corpus, both variants, plus a denser lattice.

Two breast sections (Visium-like) train the head; the third breast section (a legacy-ST-like square lattice,
another patient) is held out. Features come from a tiny random-init ViT (``vit_tiny_patch16_224`` at 32 px,
patches of 112 um), so the figures measure what the head makes of plain image features, not a pretrained model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

#: The tiny backbone and patches of the demo: 32 px at 3.5 um/px = 112 um, HEST's field of view.
DEMO_BACKBONE = "vit_tiny_patch16_224"
DEMO_IMG = 32
DEMO_PIXEL_UM = 3.5


def run_demo_histosge(out_dir: Path, seed: int = 0, *, root: str | Path | None = None,
                      checkpoint: str | Path | None = None, epochs: int = 60,
                      progress: bool = False) -> dict[str, Any]:
    """Train HisToSGE (published chunk attention and spfm's kNN attention) on synthetic slides; score a held-out one.

    Args:
        out_dir: where the outputs go.
        seed: corpus (when generated), backbone (when random) and head seed.
        root: a synthetic HEST root holding SYN00, SYN01 (train) and SYN03 (held out), e.g. ``spfm demo``'s;
            None generates a small one under ``out_dir/corpus``.
        checkpoint: backbone weights (``spfm demo`` passes the tiny ViT it pretrained and fine-tuned, trained at
            32 px over the same 112 um field); None embeds with the tiny ViT at random init.
        epochs, progress: HisToSGE training.

    Writes under ``out_dir``: ``corpus/`` (when generated), ``embeddings/``, ``histosge_heldout.png`` (measured vs
    predicted maps) and ``histosge_denser.png`` (predictions on the 4x denser lattice of the held-out slide).

    Returns:
        ``{"heldout_pearson": {"chunk": r, "knn": r}, "ridge_pearson": r, "n_genes": G, "n_denser_positions": n,
        "seconds": s}``.
    """
    import numpy as np
    import torch

    from spfm import pl
    from spfm.data.patches import PatchConfig
    from spfm.data.synthetic import make_synthetic_corpus
    from spfm.eval.hest_bench import run_split
    from spfm.heads.histosge.head import HisToSGE
    from spfm.heads.histosge.metrics import scores
    from spfm.heads.histosge.tasks import denser_positions, embed_positions, embed_samples

    began = time.perf_counter()
    out_dir = Path(out_dir)
    if root is None:
        root = out_dir / "corpus"
        if not (root / "metadata" / "SYN03.json").is_file():
            make_synthetic_corpus(root, n_samples=4, seed=seed, spots_per_sample=(150, 220), overwrite=True)
    root = Path(root)
    if checkpoint is None:
        backbone: dict[str, Any] = dict(backbone=DEMO_BACKBONE, backbone_kwargs={"img_size": DEMO_IMG})
    else:
        backbone = dict(checkpoint=checkpoint)  # name and input size come from the checkpoint's config
    patch = PatchConfig(size_px=DEMO_IMG, pixel_size_um=DEMO_PIXEL_UM)
    torch.manual_seed(seed)  # the random-init backbone
    train_ids, test_id = ["SYN00", "SYN01"], "SYN03"
    slides = embed_samples(root, [*train_ids, test_id], out_dir / "embeddings", patch=patch, **backbone)
    train, test = slides[:2], slides[2]
    print(f"histosge demo: train {train_ids} ({sum(a.n_obs for a in train)} spots), held out {test_id} "
          f"({test.n_obs} spots); features from {checkpoint or 'the tiny ViT at random init'}")
    result: dict[str, Any] = {"heldout_pearson": {}}
    heads = {}
    for attention in ("chunk", "knn"):
        head = HisToSGE(attention=attention, n_top_genes=50, epochs=epochs, seed=seed)
        head.fit(train, progress=progress)
        pred = head.predict(test)
        s = scores(pred.layers["predicted"], pred.layers["measured"])
        result["heldout_pearson"][attention] = round(s["pearson"], 4)
        heads[attention] = (head, pred)
        print(f"histosge demo: {attention:5s} attention: held-out mean per-gene Pearson {s['pearson']:.3f}, "
              f"MSE {s['mse']:.3f}")
    head, pred = heads["knn"]
    key = head.params["embedding_key"]
    from spfm.heads.histosge.inputs import log1p_normalised

    ridge = run_split(np.concatenate([a.obsm[key] for a in train]),
                      np.concatenate([log1p_normalised(a, head.genes, 1e4) for a in train]),
                      test.obsm[key], pred.layers["measured"])
    result["ridge_pearson"] = round(float(np.nanmean(ridge["pearson"])), 4)
    print(f"histosge demo: Ridge probe (PCA + Ridge on the same features): {result['ridge_pearson']:.3f}")
    # the three genes that vary most on the held-out slide
    genes = [str(head.genes[i]) for i in np.argsort(-pred.layers["measured"].var(axis=0))[:3]]
    pl.plot_expression_maps(pred, genes, out_dir / "histosge_heldout.png", root=root, sample_id=test_id)
    dense = embed_positions(root, test_id, denser_positions(test), patch=patch, **backbone)
    dense_pred = head.predict(dense)
    pl.plot_expression_maps(dense_pred, genes, out_dir / "histosge_denser.png", root=root, sample_id=test_id)
    result["n_genes"] = len(head.genes)
    result["n_denser_positions"] = int(dense.n_obs)
    print(f"histosge demo: predicted {dense.n_obs} positions on the 4x denser lattice of {test_id} "
          f"({test.n_obs} measured)")
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result
