"""SpatialGlue benchmark: simulations, the skin spatial-CITE-seq pair, the reference package, baselines, scaling.

Prints ONE JSON object and writes it with ``--out``. Parts (``--part``, default ``all``):

* ``simulations``: the paper's five settings x seeds (default 0 1 2), 1,296 spots, datatype SPOTS. Per run:
  spfm faithful (the paper: lr 1e-4, 600 epochs, domains from Z), spfm improved (``improved=True``: lr 1e-3,
  30 epochs, domains from [Z, Y_rna, Y_protein]), the reference package on the SAME preprocessed features (its own
  graphs and trainer; clustered by spfm's ``cluster_embedding``), and baselines through the same clustering: each
  modality's PCA input alone, their concatenation, and spfm's per-modality latents Y_m. Clustering: PCA 20 + tied
  Gaussian mixture (mclust EEE), 5 clusters. Metrics: NMI, ARI, AMI, homogeneity, V-measure; means over seeds.
* ``skin``: ``../shared/data/skin_citeseq`` (1,618 spots, 10 genes, 283 ADTs; no labels), datatype 10x with
  ``n_comps=9`` (the RNA panel has only 10 genes), 6 domains: Jaccard of 50-NN between each modality's input and
  the embedding (summed over modalities, SpatialGlue's definition) and median Moran's I of the domains, for spfm
  faithful / improved / reference / baselines.
* ``speed``: end to end on simulation 1 (seed 0) and the skin pair: spfm faithful and improved ``fit_transform``
  from raw AnnData to ``obs["domain"]`` (each run before and after the reference) vs the reference with its own
  tutorial preprocessing, graphs and training (timed inside its process, imports excluded) + the same clustering;
  wall and CPU seconds per stage and the ratios.
* ``improved-epochs`` (not part of ``all``): ``improved=True`` trained for each of ``--improved-epochs`` on every
  setting x seed, NMI / ARI per run and mean / worst per epoch count, and on the skin pair per seed (Jaccard,
  Moran's I): how the improvement's epoch count was chosen.
* ``mixture-starts`` (not part of ``all``): ``improved=True`` on every setting x seed, domains clustered with each
  of ``--starts`` mixture starts (default 10 and 50): whether the runs where two domains merge are a search failure.
* ``scaling``: simulated grids of ~10k, ~100k and ~1M spots (fewer features: 100 RNA-like, 30 protein-like),
  feature kNN exact up to 20k spots and the inverted-file search (``feature_knn="ivf"``) above (the 10k row also
  gives the ivf graph's edge recall against exact), the head's fused training step, each size in its own process:
  preprocessing, graph and per-epoch training seconds over a few epochs, and peak resident memory. Full-run times
  are per-epoch x preset epochs (labelled ``extrapolated``).

Speed figures are ratios measured in the same run (training seconds at the same epochs, and end-to-end seconds
including graph building). Everything runs with ``torch.set_num_threads(THREADS)`` (default 1: on a shared
two-core machine two OpenMP threads spin-wait and run ~100x slower).

The reference venv (SpatialGlue 1.1.5 declares only ``requests``; it imports torch, scanpy, anndata, sklearn,
scipy, tqdm, which it takes from the spfm venv through a ``.pth`` file, so no second 2 GB torch):

    python3 -m venv /tmp/spatialglue-venv
    /tmp/spatialglue-venv/bin/pip install SpatialGlue==1.1.5
    echo /path/to/spfm/.venv/lib/python3.11/site-packages > \\
        /tmp/spatialglue-venv/lib/python3.11/site-packages/zz_spfm_main_venv.pth

Run: ``python benchmarks/spatialglue.py --part simulations --reference-seeds 0 --out
benchmarks/results/spatialglue_simulations.json`` (and ``--part speed`` / ``skin`` / ``scaling``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from report import emit, peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]
REF_PY = Path(os.environ.get("SPATIALGLUE_REF_PYTHON", "/tmp/spatialglue-venv/bin/python"))
DRIVER = ROOT / "benchmarks" / "spatialglue_reference_driver.py"
SKIN = ROOT.parent / "shared" / "data" / "skin_citeseq"
METRICS = ("nmi", "ari", "ami", "homogeneity", "v_measure")
N_INIT = 10  # Gaussian-mixture starts for every embedding scored here (the head's default)
N_PROBE = 8  # cells probed by the approximate feature kNN of the scaling runs


def _versions() -> dict:
    import scanpy
    import sklearn
    import torch

    import spfm

    ref = None
    if REF_PY.exists():
        r = subprocess.run([str(REF_PY), "-m", "pip", "show", "SpatialGlue"], capture_output=True, text=True)
        ref = next((line.split(":", 1)[1].strip() for line in r.stdout.splitlines() if line.startswith("Version")),
                   None)
    return {"spfm": spfm.__version__, "torch": torch.__version__, "scanpy": scanpy.__version__,
            "sklearn": sklearn.__version__, "python": platform.python_version(), "SpatialGlue_reference": ref}


def run_reference(feat: list[np.ndarray] | None, spatial: np.ndarray, datatype: str, seed: int, threads: int,
                  epochs: int = -1, counts: list[np.ndarray] | None = None, n_comps: int = 0) -> dict:
    """The reference package in its own venv, on preprocessed ``feat`` or (end to end) on raw ``counts`` with its
    own preprocessing to ``n_comps``; ``{"error": reason}`` when unavailable."""
    if not REF_PY.exists():
        return {"error": f"reference venv not found at {REF_PY}"}
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        data = ({"feat_1": feat[0], "feat_2": feat[1]} if counts is None
                else {"counts_1": counts[0], "counts_2": counts[1], "n_comps": n_comps})
        np.savez(inp, spatial=spatial, datatype=datatype, seed=seed, epochs=epochs, threads=threads, **data)
        t = time.perf_counter()
        r = subprocess.run([str(REF_PY), str(DRIVER), str(inp), str(out)], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        wall = time.perf_counter() - t
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
        o = np.load(out)
        return {"embedding": o["SpatialGlue"], "latent_1": o["latent_1"], "latent_2": o["latent_2"],
                "beta": o["alpha"], "subprocess_s": wall, "epochs": int(o["epochs"]),
                **{k: float(o[k]) for k in o.files if k.endswith("_s")}}


def _spfm(pair: dict, datatype: str, seed: int, n_domains: int, **kw):
    """spfm's head from raw AnnData to ``obs["domain"]``; returns (head, result, wall s); ``head.cpu_s_`` is the
    process CPU time of the same span."""
    from spfm.heads.spatialglue import SpatialGlue

    t, c = time.perf_counter(), time.process_time()
    head = SpatialGlue(datatype=datatype, n_domains=n_domains, seed=seed, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = head.fit_transform(pair, progress=False, device="cpu")
    head.cpu_s_ = time.process_time() - c
    return head, res, time.perf_counter() - t


def _mean(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = round(float(np.mean(vals)), 4)
    return out


def part_simulations(settings: list[int], seeds: list[int], threads: int, use_reference: bool,
                     reference_seeds: list[int] | None = None) -> dict:
    from spfm.data.simulate.spatialglue import spatialglue_simulation
    from spfm.eval.metrics import clustering_scores
    from spfm.heads.domains import cluster_embedding
    from spfm.heads.spatialglue.preprocess import fit_modality

    runs = []
    for setting in settings:
        for seed in seeds:
            rna, protein = spatialglue_simulation(setting, seed=seed)
            truth = rna.obs["ground_truth"].to_numpy()

            def score(labels):
                s = clustering_scores(truth, labels)
                return {k: round(s[k], 4) for k in METRICS}

            row = {"setting": setting, "seed": seed}
            head, res, sec = _spfm({"rna": rna, "protein": protein}, "SPOTS", 2022 + seed, 5)
            row["spfm_faithful"] = {**score(res.obs["domain"].to_numpy()), "seconds": round(sec, 2),
                                    "cpu_s": round(head.cpu_s_, 2), "train_s": round(head.timings_["train_s"], 2),
                                    "train_cpu_s": round(head.timings_["train_cpu_s"], 2),
                                    "graph_s": round(head.timings_["graphs_s"], 3),
                                    "mean_beta_protein": round(float(res.obsm["spatialglue_beta"][:, 1].mean()), 3)}
            for name in ("rna", "protein"):
                row[f"spfm_latent_{name}_only"] = score(cluster_embedding(res.obsm[f"X_spatialglue_{name}"], 5,
                                                                          seed=seed, n_init=N_INIT))
            h2, res2, sec2 = _spfm({"rna": rna, "protein": protein}, "SPOTS", 2022 + seed, 5, improved=True)
            row["spfm_improved"] = {**score(res2.obs["domain"].to_numpy()), "seconds": round(sec2, 2),
                                    "cpu_s": round(h2.cpu_s_, 2), "train_s": round(h2.timings_["train_s"], 2),
                                    "train_cpu_s": round(h2.timings_["train_cpu_s"], 2)}
            # Same preprocessing as the head (n_comps = proteins - 1 = 99), for the baselines and the reference.
            n_comps = head.fitted_[0].n_comps
            x1 = fit_modality(rna, "rna", "rna", n_comps=n_comps, scale=True, seed=2022 + seed)[0]
            x2 = fit_modality(protein, "protein", "protein", n_comps=n_comps, scale=True, seed=2022 + seed)[0]
            row["pca_rna_only"] = score(cluster_embedding(x1, 5, seed=seed, n_init=N_INIT))
            row["pca_protein_only"] = score(cluster_embedding(x2, 5, seed=seed, n_init=N_INIT))
            row["pca_concat"] = score(cluster_embedding(np.hstack([x1, x2]), 5, seed=seed, n_init=N_INIT))
            if use_reference and (reference_seeds is None or seed in reference_seeds):
                ref = run_reference([x1, x2], rna.obsm["spatial"], "SPOTS", 2022 + seed, threads)
                if "error" in ref:
                    row["reference"] = ref
                else:
                    row["reference"] = {**score(cluster_embedding(ref["embedding"], 5, seed=seed, n_init=N_INIT)),
                                        "train_s": round(ref["train_s"], 2), "graph_s": round(ref["graph_s"], 3),
                                        "train_cpu_s": round(ref["train_cpu_s"], 2),
                                        "subprocess_s": round(ref["subprocess_s"], 2),
                                        "mean_beta_protein": round(float(ref["beta"][:, 1].mean()), 3)}
                    row["speed_train_faithful_vs_reference"] = round(ref["train_s"] / head.timings_["train_s"], 2)
                    row["speed_train_improved_vs_reference"] = round(ref["train_s"] / h2.timings_["train_s"], 2)
                    row["speed_train_cpu_faithful_vs_reference"] = round(
                        ref["train_cpu_s"] / head.timings_["train_cpu_s"], 2)
            print(json.dumps(row), file=sys.stderr, flush=True)
            runs.append(row)
    return summarise_simulations(runs)


def part_improved_epochs(settings: list[int], seeds: list[int], epochs_list: list[int]) -> dict:
    """How long the improvement trains: ``improved=True`` at each epoch count on every setting x seed; NMI / ARI
    per run, and mean and worst NMI per epoch count (how the improvement's 30 epochs were chosen), and the skin
    pair's Jaccard / Moran's I per seed and epoch count; with the mean protein weight beta of each run, which
    keeps moving after the domains have settled."""
    from spfm.data.simulate.spatialglue import spatialglue_simulation
    from spfm.eval.metrics import clustering_scores

    runs = []
    for setting in settings:
        for seed in seeds:
            rna, protein = spatialglue_simulation(setting, seed=seed)
            truth = rna.obs["ground_truth"].to_numpy()
            for epochs in epochs_list:
                head, res, sec = _spfm({"rna": rna, "protein": protein}, "SPOTS", 2022 + seed, 5, improved=True,
                                       epochs=epochs)
                s = clustering_scores(truth, res.obs["domain"].to_numpy())
                row = {"setting": setting, "seed": seed, "epochs": epochs, "nmi": round(s["nmi"], 4),
                       "ari": round(s["ari"], 4), "seconds": round(sec, 2),
                       "final_loss": round(head.history_[-1], 3) if head.history_ else None,
                       "mean_beta_protein": round(float(res.obsm["spatialglue_beta"][:, 1].mean()), 3)}
                print(json.dumps(row), file=sys.stderr, flush=True)
                runs.append(row)
    skin_runs = []
    if SKIN.is_dir():  # the real pair has no labels: how far its Jaccard / Moran's I move with the epochs
        rna, protein, x1, x2, W = _skin_inputs()
        for seed in seeds:
            for epochs in epochs_list:
                head, res, sec = _spfm({"rna": rna, "protein": protein}, "10x", 2022 + seed, SKIN_DOMAINS,
                                       n_comps=SKIN_COMPS, improved=True, epochs=epochs)
                row = {"seed": seed, "epochs": epochs, **_skin_scores(res.obsm["X_spatialglue"], x1, x2, W,
                                                                      res.obs["domain"].to_numpy()),
                       "seconds": round(sec, 2),
                       "mean_beta_protein": round(float(res.obsm["spatialglue_beta"][:, 1].mean()), 3)}
                print(json.dumps({"skin": row}), file=sys.stderr, flush=True)
                skin_runs.append(row)
    summary = {}
    for epochs in epochs_list:
        rows = [r for r in runs if r["epochs"] == epochs]
        nmi = [r["nmi"] for r in rows]
        summary[str(epochs)] = {"nmi_mean": round(float(np.mean(nmi)), 4), "nmi_min": round(float(np.min(nmi)), 4),
                                "ari_mean": round(float(np.mean([r["ari"] for r in rows])), 4),
                                "runs_below_0.9": int(sum(v < 0.9 for v in nmi)),
                                "seconds_mean": round(float(np.mean([r["seconds"] for r in rows])), 2),
                                "mean_beta_protein": round(float(np.mean([r["mean_beta_protein"] for r in rows])), 3)}
        skin = [r for r in skin_runs if r["epochs"] == epochs]
        if skin:
            summary[str(epochs)]["skin"] = {key: round(float(np.mean([r[key] for r in skin])), 4) for key in
                                            ("jaccard_50nn_sum", "jaccard_rna", "jaccard_protein",
                                             "morans_i_median", "seconds", "mean_beta_protein")}
    return {"settings": settings, "seeds": seeds, "by_epochs": summary, "runs": runs, "skin_runs": skin_runs}


def part_mixture_starts(settings: list[int], seeds: list[int], starts: list[int]) -> dict:
    """Whether the improvement's occasional merged domains are the mixture's search or its objective: ``improved=True``
    on every setting x seed, clustered with each number of mixture starts (the training is the same for a seed), NMI
    and the clustering seconds per run."""
    from spfm.data.simulate.spatialglue import spatialglue_simulation
    from spfm.eval.metrics import clustering_scores

    runs = []
    for setting in settings:
        for seed in seeds:
            rna, protein = spatialglue_simulation(setting, seed=seed)
            truth = rna.obs["ground_truth"].to_numpy()
            row: dict = {"setting": setting, "seed": seed}
            for n_init in starts:
                head, res, _ = _spfm({"rna": rna, "protein": protein}, "SPOTS", 2022 + seed, 5, improved=True,
                                     n_init=n_init)
                row[f"nmi_{n_init}"] = round(clustering_scores(truth, res.obs["domain"].to_numpy())["nmi"], 4)
                row[f"cluster_s_{n_init}"] = round(head.timings_["cluster_s"], 3)
            print(json.dumps(row), file=sys.stderr, flush=True)
            runs.append(row)
    summary = {str(n): {"nmi_mean": round(float(np.mean([r[f"nmi_{n}"] for r in runs])), 4),
                        "nmi_min": round(float(np.min([r[f"nmi_{n}"] for r in runs])), 4),
                        "runs_below_0.9": int(sum(r[f"nmi_{n}"] < 0.9 for r in runs)),
                        "cluster_s_mean": round(float(np.mean([r[f"cluster_s_{n}"] for r in runs])), 3)}
               for n in starts}
    return {"settings": settings, "seeds": seeds, "by_starts": summary, "runs": runs}


def summarise_simulations(runs: list[dict]) -> dict:
    """Means over the runs (per method, and per setting) of the rows ``part_simulations`` prints one by one."""
    settings = sorted({r["setting"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    methods = list(dict.fromkeys(k for r in runs for k in r if isinstance(r[k], dict) and "nmi" in r[k]))
    summary = {m: _mean([r[m] for r in runs if "nmi" in r.get(m, {})]) for m in methods}
    paired = [r for r in runs if "nmi" in r.get("reference", {})]
    if paired and len(paired) < len(runs):  # the reference ran on some seeds only: spfm on those same runs
        for m in ("spfm_faithful", "spfm_improved"):
            summary[f"{m}_on_reference_runs"] = _mean([r[m] for r in paired])
    for key in ("speed_train_faithful_vs_reference", "speed_train_improved_vs_reference",
                "speed_train_cpu_faithful_vs_reference"):
        vals = [r[key] for r in runs if key in r]
        if vals:
            summary[key] = round(float(np.mean(vals)), 2)
    per_setting = {str(s): {m: _mean([r[m] for r in runs if r["setting"] == s and "nmi" in r.get(m, {})])
                            for m in ("spfm_faithful", "spfm_improved", "reference") if m in methods}
                   for s in settings}
    return {"settings": settings, "seeds": seeds, "n_runs": len(runs), "datatype": "SPOTS", "n_spots": 1296,
            "mean": summary, "per_setting_mean": per_setting, "runs": runs}


SKIN_DOMAINS, SKIN_COMPS = 6, 9


def _skin_inputs(seed: int = 2022):
    """The skin pair, each modality's PCA input (``SKIN_COMPS``) and the 6-NN spatial weights for Moran's I."""
    import anndata as ad

    from spfm.data.graphs import knn_graph, to_scipy
    from spfm.heads.spatialglue.preprocess import fit_modality

    rna = ad.read_h5ad(SKIN / "rna.h5ad")
    protein = ad.read_h5ad(SKIN / "protein.h5ad")
    W = to_scipy(knn_graph(rna.obsm["spatial"], 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x1 = fit_modality(rna, "rna", "rna", n_comps=SKIN_COMPS, scale=True, seed=seed)[0]
        x2 = fit_modality(protein, "protein", "protein", n_comps=SKIN_COMPS, scale=True, seed=seed)[0]
    return rna, protein, x1, x2, W


def _skin_scores(emb: np.ndarray, x1: np.ndarray, x2: np.ndarray, W, labels: np.ndarray | None = None) -> dict:
    """Jaccard of 50-NN between each modality's input and ``emb`` (and their sum) and the median Moran's I of the
    domains (``labels``, else ``emb`` clustered into ``SKIN_DOMAINS``)."""
    from spfm.eval.metrics import cluster_morans_i, knn_jaccard
    from spfm.heads.domains import cluster_embedding

    labels = cluster_embedding(emb, SKIN_DOMAINS, seed=0, n_init=N_INIT) if labels is None else labels
    mi = cluster_morans_i(labels, W)
    j1, j2 = knn_jaccard(x1, emb, 50), knn_jaccard(x2, emb, 50)
    return {"jaccard_50nn_sum": round(j1 + j2, 4), "jaccard_rna": round(j1, 4), "jaccard_protein": round(j2, 4),
            "morans_i_median": round(float(np.nanmedian(list(mi.values()))), 4)}


def part_skin(threads: int, use_reference: bool, seed: int = 2022) -> dict:
    if not SKIN.is_dir():
        return {"skipped": f"{SKIN} not found"}
    rna, protein, x1, x2, W = _skin_inputs(seed)

    def evaluate(emb, labels=None):
        return _skin_scores(emb, x1, x2, W, labels)

    out = {"n_spots": rna.n_obs, "n_genes": rna.n_vars, "n_proteins": protein.n_vars, "datatype": "10x",
           "n_comps": SKIN_COMPS, "n_domains": SKIN_DOMAINS, "seed": seed}
    head, res, sec = _spfm({"rna": rna, "protein": protein}, "10x", seed, SKIN_DOMAINS, n_comps=SKIN_COMPS)
    out["spfm_faithful"] = {**evaluate(res.obsm["X_spatialglue"], res.obs["domain"].to_numpy()),
                            "seconds": round(sec, 2), "train_s": round(head.timings_["train_s"], 2),
                            "mean_beta_protein": round(float(res.obsm["spatialglue_beta"][:, 1].mean()), 3)}
    h2, res2, sec2 = _spfm({"rna": rna, "protein": protein}, "10x", seed, SKIN_DOMAINS, n_comps=SKIN_COMPS,
                           improved=True)
    out["spfm_improved"] = {**evaluate(res2.obsm["X_spatialglue"], res2.obs["domain"].to_numpy()),
                            "seconds": round(sec2, 2), "train_s": round(h2.timings_["train_s"], 2)}
    out["pca_rna_only"] = evaluate(x1)
    out["pca_protein_only"] = evaluate(x2)
    out["pca_concat"] = evaluate(np.hstack([x1, x2]))
    if use_reference:
        ref = run_reference([x1, x2], rna.obsm["spatial"], "10x", seed, threads)
        if "error" in ref:
            out["reference"] = ref
        else:
            out["reference"] = {**evaluate(ref["embedding"]), "train_s": round(ref["train_s"], 2),
                                "subprocess_s": round(ref["subprocess_s"], 2)}
            out["speed_train_faithful_vs_reference"] = round(ref["train_s"] / head.timings_["train_s"], 2)
    return out


def _dense(a) -> np.ndarray:
    X = a.layers["counts"] if "counts" in a.layers else a.X
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float32)


def _speed_one(name: str, rna, protein, datatype: str, k: int, n_comps: int | None, seed: int, threads: int,
               truth: np.ndarray | None) -> dict:
    """End-to-end seconds on one dataset: spfm faithful and improved from raw AnnData to ``obs["domain"]`` (each run
    before and after the reference, to average out the load of a shared machine) vs the reference with its own
    preprocessing, graphs and trainer, plus the same clustering (``cluster_embedding``, n_init=10) of its
    embedding."""
    from spfm.eval.metrics import clustering_scores
    from spfm.heads.domains import cluster_embedding

    kw = {} if n_comps is None else {"n_comps": n_comps}
    runs: dict[str, list[dict]] = {"faithful": [], "improved": []}

    def run_spfm() -> None:
        for variant in runs:
            head, res, sec = _spfm({"rna": rna, "protein": protein}, datatype, seed, k,
                                   improved=variant == "improved", **kw)
            row = {"wall_s": round(sec, 2), "cpu_s": round(head.cpu_s_, 2), "epochs": head.epochs,
                   **{key: round(v, 3) for key, v in head.timings_.items()}}
            if truth is not None:
                row["nmi"] = round(clustering_scores(truth, res.obs["domain"].to_numpy())["nmi"], 4)
            runs[variant].append(row)

    run_spfm()
    comps = n_comps or protein.n_vars - 1
    ref = run_reference(None, rna.obsm["spatial"], datatype, seed, threads, counts=[_dense(rna), _dense(protein)],
                        n_comps=comps)
    run_spfm()
    out: dict = {"dataset": name, "n_spots": rna.n_obs, "datatype": datatype, "n_comps": comps}
    for variant, rows in runs.items():
        out[f"spfm_{variant}_runs"] = rows
        out[f"spfm_{variant}"] = {key: round(float(np.mean([r[key] for r in rows])), 2)
                                  for key in ("wall_s", "cpu_s", "train_s", "train_cpu_s")}
    if "error" in ref:
        out["reference"] = ref
        return out
    t, c = time.perf_counter(), time.process_time()
    labels = cluster_embedding(ref["embedding"], k, seed=seed, n_init=N_INIT)
    ref_row = {key: round(v, 3) for key, v in ref.items() if key.endswith("_s")}
    ref_row["cluster_s"] = round(time.perf_counter() - t, 3)
    ref_row["cluster_cpu_s"] = round(time.process_time() - c, 3)
    ref_row["wall_s"] = round(sum(ref_row[f"{s}_s"] for s in ("prep", "graph", "train", "cluster")), 2)
    ref_row["cpu_s"] = round(sum(ref_row[f"{s}_cpu_s"] for s in ("prep", "graph", "train", "cluster")), 2)
    if truth is not None:
        ref_row["nmi"] = round(clustering_scores(truth, labels)["nmi"], 4)
    out["reference"] = ref_row
    for variant in runs:  # reference seconds over spfm seconds; "improved" also trains fewer epochs
        mine = out[f"spfm_{variant}"]
        out[f"speedup_{variant}"] = {"end_to_end_wall": round(ref_row["wall_s"] / mine["wall_s"], 2),
                                     "end_to_end_cpu": round(ref_row["cpu_s"] / mine["cpu_s"], 2),
                                     "train_wall": round(ref_row["train_s"] / mine["train_s"], 2),
                                     "train_cpu": round(ref_row["train_cpu_s"] / mine["train_cpu_s"], 2)}
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def part_speed(threads: int, seed: int = 2022) -> dict:
    """End-to-end wall and CPU seconds, spfm faithful vs the reference, on simulation 1 (seed 0) and the skin pair."""
    import anndata as ad

    from spfm.data.simulate.spatialglue import spatialglue_simulation

    rna, protein = spatialglue_simulation(1, seed=0)
    rows = [_speed_one("simulation_1_seed_0", rna, protein, "SPOTS", 5, None, seed, threads,
                       rna.obs["ground_truth"].to_numpy())]
    if SKIN.is_dir():
        rows.append(_speed_one("skin_citeseq", ad.read_h5ad(SKIN / "rna.h5ad"), ad.read_h5ad(SKIN / "protein.h5ad"),
                               "10x", 6, 9, seed, threads, None))
    return {"what": "spfm: SpatialGlue(faithful, and improved=True).fit_transform from raw AnnData to obs['domain'] "
                    "(preprocessing, graphs, training, embedding, clustering), mean of one run before and one after "
                    "the reference; "
                    "reference: its tutorial preprocessing from the same raw counts + construct_neighbor_graph + "
                    "Train_SpatialGlue (adjacency preparation and training), timed inside its process (imports "
                    "excluded), + cluster_embedding of its embedding (mclust needs R). Same machine, same threads.",
            "rows": rows}


def scaling_one(n_target: int, epochs: int, threads: int) -> dict:
    """One size in this process (peak RSS is per process). The steps of ``SpatialGlue.fit`` run one by one so that
    each finished stage is reported on stderr (a size that runs out of time still says how far it got)."""
    import torch

    from spfm.data.simulate.spatialglue import spatialglue_simulation
    from spfm.heads.spatialglue import graphs as sg_graphs
    from spfm.heads.spatialglue.fused import loss_and_grads
    from spfm.heads.spatialglue.model import SpatialGlueModule
    from spfm.heads.spatialglue.preprocess import fit_modality

    torch.set_num_threads(threads)
    block = max(1, int(round(np.sqrt(n_target) / 6)))
    row: dict = {"n_spots": (6 * block) ** 2, "block": block, "features": [100, 30], "epochs_run": 0}
    knn = "exact" if row["n_spots"] <= 20_000 else "ivf"
    row["feature_knn"] = knn if knn == "exact" else f"ivf (n_probe={N_PROBE})"

    def stage(name: str, t0: float) -> None:
        row[name] = round(time.perf_counter() - t0, 2)
        row["peak_rss_mb"] = peak_memory_mb()
        print("STAGE " + json.dumps(row), file=sys.stderr, flush=True)

    t = time.perf_counter()
    rna, protein = spatialglue_simulation(1, seed=0, block=block, n_features=(100, 30))
    stage("simulate_s", t)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = [fit_modality(a, n, n, n_comps=29, scale=True, seed=0)[0]
                 for a, n in ((rna, "rna"), (protein, "protein"))]
    coords = rna.obsm["spatial"]
    del rna, protein
    stage("preprocess_s", t)
    t = time.perf_counter()
    A_s = sg_graphs.spatial_adjacency(coords, 3)
    stage("spatial_graph_s", t)
    t = time.perf_counter()
    A_f = [sg_graphs.feature_adjacency(x, 20, method=knn, seed=0, n_probe=N_PROBE) for x in feats]
    torch.set_num_threads(threads)
    stage("feature_graphs_s", t)
    if knn == "exact":  # how close the approximate search used for larger sizes comes, on the same features
        t = time.perf_counter()
        approx = sg_graphs.feature_adjacency(feats[1], 20, method="ivf", seed=0, n_probe=N_PROBE)
        row["ivf_feature_graph_s"] = round(time.perf_counter() - t, 2)
        exact_edges = A_f[1].to_sparse_coo().coalesce().indices()
        approx_edges = approx.to_sparse_coo().coalesce().indices()
        n = row["n_spots"]
        e = set((exact_edges[0] * n + exact_edges[1]).tolist())
        a = set((approx_edges[0] * n + approx_edges[1]).tolist())
        row["ivf_edge_recall_vs_exact"] = round(len(e & a) / len(e), 3)
        stage("ivf_check", t)
    torch.manual_seed(2022)
    module = SpatialGlueModule([29, 29], 64)
    X = [torch.from_numpy(x) for x in feats]
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4, fused=True)
    t = time.perf_counter()
    for epoch in range(epochs):  # the head's training step (fused backward), full batch
        loss_and_grads(module, X, A_s, A_f, [1.0, 5.0, 1.0, 1.0])
        optimizer.step()
        row["epochs_run"] = epoch + 1
        stage("train_s", t)
    row["per_epoch_s"] = round(row["train_s"] / max(epochs, 1), 3)
    row["extrapolated_600_epochs_s"] = round(row["preprocess_s"] + row["spatial_graph_s"] + row["feature_graphs_s"]
                                             + 600 * row["per_epoch_s"], 1)
    row["extrapolated_200_epochs_s"] = round(row["preprocess_s"] + row["spatial_graph_s"] + row["feature_graphs_s"]
                                             + 200 * row["per_epoch_s"], 1)
    return row


def _last_stage(stderr: str) -> dict:
    lines = [line for line in stderr.splitlines() if line.startswith("STAGE ")]
    return json.loads(lines[-1][6:]) if lines else {}


def part_scaling(sizes: list[int], epochs: list[int], threads: int, timeout: int) -> dict:
    rows = []
    for n, ep in zip(sizes, epochs):
        cmd = [sys.executable, __file__, "--scaling-one", str(n), "--scaling-epochs", str(ep), "--threads",
               str(threads)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            row = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {
                "n_target": n, "error": (r.stderr.strip().splitlines() or ["?"])[-1], **_last_stage(r.stderr)}
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            row = {"n_target": n, "error": f"did not finish within {timeout} s", "reached": _last_stage(err)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return {"feature_knn": f"exact up to 20,000 spots, else ivf (inverted-file search, n_probe={N_PROBE}); "
                           "the 10k row also times ivf and gives its edge recall against exact",
            "model": "SPOTS weights, 29 input dims (30 proteins - 1), 64 latent, Adam 1e-4", "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "simulations", "skin", "speed", "scaling", "improved-epochs",
                                      "mixture-starts"),
                   default="all")
    p.add_argument("--improved-epochs", type=int, nargs="+", default=[0, 5, 20, 30, 40, 100],
                   help="epoch counts of --part improved-epochs")
    p.add_argument("--starts", type=int, nargs="+", default=[10, 50], help="mixture starts of --part mixture-starts")
    p.add_argument("--settings", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--reference-seeds", type=int, nargs="+",
                   help="run the reference on these seeds only (default: every seed; it is the slowest part)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--scaling-epochs-list", type=int, nargs="+", default=[20, 5, 3])
    p.add_argument("--scaling-timeout", type=int, default=900)
    p.add_argument("--scaling-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--scaling-epochs", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--from-log", help="summarise the per-run rows a --part simulations run printed to stderr "
                   "(e.g. one stopped early) instead of running")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args()
    # threadpool_limits only reaches the thread pools loaded so far; scikit-learn's OpenMP and scipy's OpenBLAS load
    # later and read these at load (without them spfm's clustering ran on two threads, the reference on one).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy / scipy BLAS too: spin-waiting threads on a shared machine cost 10x
    if args.scaling_one:
        print(json.dumps(scaling_one(args.scaling_one, args.scaling_epochs, args.threads)))
        return
    t0 = time.perf_counter()
    result = {"name": "spatialglue", "part": args.part, "threads": args.threads, "versions": _versions()}
    if args.from_log:
        rows = [json.loads(line) for line in Path(args.from_log).read_text().splitlines()
                if line.startswith('{"setting"')]
        result["dataset_simulations"] = "spatialglue_simulation (paper Fig. 2, reconstructed)"
        result["simulations"] = {**summarise_simulations(rows), "from_log": args.from_log}
        result["peak_rss_mb"] = None
        emit(result, args.out, "spatialglue.json")
        return
    if args.part in ("all", "simulations"):
        result["dataset_simulations"] = "spatialglue_simulation settings 1-5 (paper Fig. 2, reconstructed)"
        result["simulations"] = part_simulations(args.settings, args.seeds, args.threads, not args.no_reference,
                                                 args.reference_seeds)
    if args.part in ("all", "skin"):
        result["skin_citeseq"] = part_skin(args.threads, not args.no_reference)
    if args.part in ("all", "speed"):
        result["speed"] = part_speed(args.threads)
    if args.part == "improved-epochs":  # not in "all": a tuning sweep, not a figure of the issue
        result["improved_epochs"] = part_improved_epochs(args.settings, args.seeds, args.improved_epochs)
    if args.part == "mixture-starts":  # not in "all": why some improved runs merge two domains
        result["mixture_starts"] = part_mixture_starts(args.settings, args.seeds, args.starts)
    if args.part in ("all", "scaling"):
        result["scaling"] = part_scaling(args.sizes, args.scaling_epochs_list, args.threads, args.scaling_timeout)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_mb"] = peak_memory_mb()
    emit(result, args.out, "spatialglue.json")


if __name__ == "__main__":
    main()
