"""``SoScope``: the AnnData-facing soScope head (resolution enhancement).

Usage::

    head = SoScope(omics="nb", layout="square:3").fit(spots, image_features=Y)   # Y: (N*K, L)
    sub = head.enhance()          # AnnData, K rows per spot, obs["parent_spot"], obsm["spatial"]

Training (Li, Bao et al. 2024 and the authors' code): stage 1 pretrains the graph encoder as a VGAE (spot decoder
likelihood + BCE(sigmoid(Z Z^T), A) + beta KL); stage 2 keeps the encoder, drops the spot decoder and trains the
enhancement decoder from scratch on ``aggregation + image_weight * image BCE + beta KL``:

* aggregation: counts (``nb``/``poisson``): the subspot means summed within each spot vs the spot total,
  (1/scale) MSE; ``gaussian``: a sample of each subspot averaged within the spot vs the spot value;
* image BCE: sigmoid(R R^T) against W with R = subspot profile minus its parent's per-subspot profile (spot / K
  for counts, the spot value for gaussian), per-modality Lambdas combined as 1 - prod(1 - Lambda);
* KL: single-sample log q(z) - log N(z; 0, I).

The reference multiplies the whole stage-2 loss by gamma(t) (1 -> 0.01, on beta's iteration settings: constant
before step 5000), which under Adam is nearly a no-op; its README calls it learning-rate decay, so spfm applies it to
the learning rate (``gamma_end``, ``gamma_schedule``). Both pairwise BCEs are evaluated as the reference does
(sigmoid, then torch's BCE with logs clamped at -100), which is what keeps raw counts in the hundreds finite.
"""

from __future__ import annotations

import math
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree
from torch_geometric.utils import k_hop_subgraph

from spfm.errors import DataError
from spfm.heads.soscope.inputs import Problem, as_list, build_problem, modality_values
from spfm.heads.soscope.layouts import Layout
from spfm.heads.soscope.losses import exp_schedule, kl_standard_normal, pair_bce
from spfm.heads.soscope.model import (
    OMICS,
    SoScopeModule,
    gaussian_sd,
    split_params,
    spot_log_likelihood,
    subspot_mean,
)

_HYPER = dict(
    omics="nb", layout="square:2", modalities=None, z_dim=128, hidden_dim=128, heads=1,
    stage1_epochs=2500, stage2_epochs=2500, stage1_lr=1e-3, stage2_lr=5e-4, stage1_scale=10.0, scale=1.0,
    beta_start=1.0, beta_end=1.0, beta_steps=10000, beta_start_step=5000, gamma_end=0.01, image_weight=1.0,
    image_loss="auto", dense_max_subspots=4096, n_negatives=None, batch_spots=None, similarity_s=5.0,
    no_image="noise", noise_dim=32, standardize_image=False, encoder_input="raw", normalize="none", rounding=False,
    layer=None, pair_link="reference", gamma_schedule="reference", project="none", interp_input=False,
    pitch=None, seed=0,
)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class SoScope:
    """soScope resolution enhancement (set up from spot-level AnnData, ``.fit()``, ``.enhance()``).

    Args (keyword only, all JSON-serialisable):
        omics: ``"nb"``, ``"poisson"``, ``"gaussian"``, or a list, one per modality (RNA + protein: ``["nb",
            "poisson"]``; RNA + ATAC: ``["nb", "gaussian"]``).
        layout: ``square:A[:reference]``, ``visium7``, ``visium_split`` or ``cells`` (see
            :mod:`spfm.heads.soscope.layouts`).
        modalities: names of the modalities (default ``["rna"]``, ``["mod0", "mod1", ...]``).
        z_dim, hidden_dim, heads: D = 128, H = 128, TransformerConv heads = 1 (the reference).
        stage1_epochs, stage2_epochs, stage1_lr, stage2_lr: full-batch steps and Adam learning rates per stage
            (reference NB: 2500 / 2500, 1e-3 / 5e-4; Poisson: stage 2 lr 1e-4, 5000 epochs; Gaussian K=25: stage 2
            lr 1e-3, 10000 epochs).
        stage1_scale, scale: the sigma of the Gaussian likelihoods / the 1/scale of the aggregation MSE (10, 1).
        beta_start, beta_end, beta_steps, beta_start_step: KL weight schedule (exponential, the reference's).
        gamma_end: stage-2 learning-rate decay factor (the reference's gamma 1 -> 0.01).
        gamma_schedule: ``"reference"`` (the authors' code: gamma shares beta's iteration settings, constant until
            ``beta_start_step`` and reaching ``gamma_end`` ``beta_steps`` later -- with the default 5000 / 10000 it
            never moves in a 2500-step stage 2) or ``"run"`` (spfm option: exponential decay over the stage-2
            steps, reaching ``gamma_end`` at the last one).
        pair_link: how a pair's BCE is evaluated in the stage-1 graph term and the image term: ``"reference"``
            (sigmoid, then torch's BCE with logs clamped at -100: saturated pairs are bounded and pass no gradient)
            or ``"logits"`` (log-space, overflows on raw counts; see :mod:`spfm.heads.soscope.losses`).
        project: ``"none"`` (the reference) or ``"aggregate"`` (spfm option): at enhance time, make each spot's
            subspots aggregate exactly to the measured spot (counts: rescale the K values to sum to the spot
            total, an all-zero spot split evenly; gaussian: shift them so they average to the spot value).
        image_weight: w_g, weight of the image BCE (1).
        image_loss: ``"dense"`` (exact, O(M^2)), ``"sampled"`` (W's pairs + n_negatives sampled pairs, O(M)),
            ``"auto"`` (dense up to ``dense_max_subspots`` subspots per step, sampled above).
        n_negatives: sampled pairs per step (default 8 * M).
        batch_spots: train on spatial mini-batches of this many spots (plus their 3-hop context for the encoder)
            when the slide has more spots; None = full batch (the reference).
        similarity_s: s of W's weights (the median neighbour pair gets 1/s).
        no_image: decoder input when no image features are given: ``"noise"`` (standard Gaussian noise of
            ``noise_dim`` columns, as the paper's no-image variant), ``"offset"`` (the subspot's position in its
            spot, an spfm option) or ``"interp"`` (spfm option: the spot profiles linearly interpolated at the subspot
            centres, z-scored, at most 32 features; W is then weighted by their similarity).
        standardize_image: z-score the image features before the decoder (spfm option; off = reference).
        interp_input: append the spot profiles linearly interpolated at the subspot centres (as ``no_image="interp"``)
            to the decoder input (spfm option; off = reference).
        encoder_input: ``"raw"`` (the reference: spot totals / values as given) or ``"log1p"`` (spfm option for
            counts: the encoder sees log1p of the totals; losses unchanged).
        normalize: ``"none"`` (the reference: values as given) or ``"feature"`` (spfm option: each feature divided by
            its mean per-subspot value (counts; spot mean / K) or its standard deviation (gaussian) before
            training, outputs multiplied back; keeps the image term's dot products O(1) on high counts and weighs
            features equally in the aggregation MSE). The divisors are the module buffer ``feature_scale``.
        rounding: round non-integer values of ``nb``/``poisson`` modalities instead of refusing them.
        layer: read values from ``layers[layer]`` instead of ``X``.
        pitch: spot pitch in coordinate units (default: the median nearest-neighbour distance).
        seed: seeds torch, numpy and the no-image noise.
    """

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(_HYPER) - {"fitted"})
        if unknown:
            raise TypeError(f"unknown SoScope arguments {unknown}")
        fitted = kwargs.pop("fitted", None)
        self.hparams: dict[str, Any] = {**_HYPER, **kwargs}
        omics = self.hparams["omics"]
        self.omics: list[str] = [omics] if isinstance(omics, str) else list(omics)
        for om in self.omics:
            if om not in OMICS:
                raise DataError(f"omics must be one of {OMICS}, got {om!r}", field="omics")
        self.hparams["omics"] = omics if isinstance(omics, str) else list(omics)
        mods = self.hparams["modalities"]
        if mods is None:
            mods = ["rna"] if len(self.omics) == 1 else [f"mod{i}" for i in range(len(self.omics))]
        if len(mods) != len(self.omics):
            raise DataError(f"{len(mods)} modality names for {len(self.omics)} omics types", field="modalities")
        self.modalities: list[str] = list(mods)
        self.layout = Layout.parse(self.hparams["layout"])
        self.hparams["layout"] = self.layout.spec
        for key, allowed in (("image_loss", ("auto", "dense", "sampled")), ("no_image", ("noise", "offset", "interp")),
                             ("encoder_input", ("raw", "log1p")), ("normalize", ("none", "feature")),
                             ("pair_link", ("reference", "logits")), ("gamma_schedule", ("reference", "run")),
                             ("project", ("none", "aggregate"))):
            if self.hparams[key] not in allowed:
                raise DataError(f"{key} must be one of {allowed}, got {self.hparams[key]!r}", field=key)
        self.fitted: dict[str, Any] | None = fitted
        self.module: SoScopeModule | None = None
        self.history: dict[str, list[float]] = {}
        self._problem: Problem | None = None
        if fitted is not None:
            self.module = self._build(fitted["dims"], fitted["image_dim"])

    # ------------------------------------------------------------------------------------------------ config

    def to_config(self) -> dict[str, Any]:
        """Hyperparameters plus the fitted state (feature names per modality, image size, pitch)."""
        return {**self.hparams, "fitted": self.fitted}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SoScope":
        """A head whose ``module`` has the trained shapes; load the state dict into it."""
        return cls(**config)

    def _build(self, dims: list[int], image_dim: int) -> SoScopeModule:
        h = self.hparams
        return SoScopeModule(dims, self.omics, image_dim, h["z_dim"], h["hidden_dim"], h["heads"])

    # ------------------------------------------------------------------------------------------------ inputs

    def _problem_for(self, adata, image_features, subspot_graph, assignment, subspot_xy, fitting: bool) -> Problem:
        h = self.hparams
        adatas = as_list(adata)
        x = modality_values(adatas, self.omics, self.modalities, h["layer"], h["rounding"])
        if not fitting:
            for a, name, names in zip(adatas, self.modalities, self.fitted["var_names"]):
                if list(map(str, a.var_names)) != names:
                    raise DataError(f"modality {name!r} has features {list(a.var_names)[:5]}..., the head was"
                                    f" trained on {names[:5]}... ({len(names)} features, same order)",
                                    field=f"{name}: var_names")
        counts = np.array([om != "gaussian" for om in self._feature_omics([a.n_vars for a in adatas])])
        prob = build_problem(adatas, self.layout, x, image_features=image_features, subspot_graph_in=subspot_graph,
                             assignment=assignment, subspot_xy=subspot_xy, pitch=h["pitch"],
                             similarity_s=h["similarity_s"], no_image=h["no_image"], noise_dim=h["noise_dim"],
                             seed=h["seed"], standardize=h["standardize_image"], counts=counts,
                             interp_index=None if fitting else self.fitted.get("interp_index"),
                             interp_input=h["interp_input"])
        if not fitting and prob.y.shape[1] != self.fitted["image_dim"]:
            raise DataError(f"image features have {prob.y.shape[1]} columns, the head was trained on"
                            f" {self.fitted['image_dim']}", field="image_features")
        return prob

    def _encoder_x(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams["encoder_input"] == "log1p":
            cols, start = [], 0
            for om, g in zip(self.omics, self.fitted["dims"]):
                block = x[:, start:start + g]
                cols.append(torch.log1p(block) if om != "gaussian" else block)
                start += g
            return torch.cat(cols, dim=1)
        return x

    # ------------------------------------------------------------------------------------------------ training

    def fit(self, adata, image_features: np.ndarray | None = None, subspot_graph=None, *, assignment=None,
            subspot_xy: np.ndarray | None = None, seed: int | None = None, progress: bool = True,
            device: str = "auto") -> "SoScope":
        """Run both stages on spot-level data.

        Args:
            adata: spots x features AnnData (``obsm["spatial"]``; ``obs["array_row"/"array_col"]`` when present
                give the spot graph), or a list of them (one per modality, same spots in the same order).
            image_features: (M, L) subspot image features, subspot k of spot n at row n*K + k (see
                :func:`spfm.heads.soscope.image.subspot_image_features` to compute them with a registry backbone).
            subspot_graph: a precomputed W (scipy sparse M x M or PyG ``Data``) instead of one built from the
                features (bead-based platforms without an image).
            assignment: layout ``cells``: (M,) parent region per cell, or an N x M region x cell 0/1 matrix.
            subspot_xy: layout ``cells``: (M, 2) cell positions.
            seed: overrides the constructor's seed.
            progress: tqdm bar over the epochs of both stages.
            device: ``"auto"`` (cuda if available), ``"cpu"``, ``"cuda"``.
        """
        from tqdm.auto import tqdm

        if seed is not None:
            self.hparams["seed"] = int(seed)
        h = self.hparams
        torch.manual_seed(h["seed"])
        np.random.seed(h["seed"])
        adatas = as_list(adata)
        prob = self._problem_for(adatas, image_features, subspot_graph, assignment, subspot_xy, fitting=True)
        self.fitted = {"dims": [int(a.n_vars) for a in adatas], "var_names": [list(map(str, a.var_names))
                                                                              for a in adatas],
                       "image_dim": int(prob.y.shape[1]), "pitch": prob.pitch,
                       "interp_index": prob.interp_index}
        self._problem = prob
        dev = _device(device)
        self.module = self._build(self.fitted["dims"], self.fitted["image_dim"])
        self.module.feature_scale.copy_(self._feature_scale(prob))
        self.module.to(dev)
        gen = torch.Generator().manual_seed(h["seed"])
        batches = _Batcher(prob, h["batch_spots"], gen)
        total = h["stage1_epochs"] + h["stage2_epochs"]
        self.history = {"stage1": [], "stage2": [], "node": [], "image": [], "kl": []}
        with tqdm(total=total, disable=not progress, desc="soScope") as bar:
            self._stage1(prob, batches, dev, gen, bar)
            self._stage2(prob, batches, dev, gen, bar)
        self.module.eval()
        return self

    def _feature_scale(self, prob: Problem) -> torch.Tensor:
        """(G,) divisors: ones (reference) or per-feature mean per-subspot value / standard deviation."""
        G = prob.x.shape[1]
        if self.hparams["normalize"] == "none":
            return torch.ones(G)
        K_mean = float(prob.k.mean())
        cols, start = [], 0
        for om, g in zip(self.omics, self.fitted["dims"]):
            block = prob.x[:, start:start + g].double()
            f = block.std(dim=0) if om == "gaussian" else block.mean(dim=0) / K_mean
            cols.append(f)
            start += g
        f = torch.cat(cols).float()
        # A feature that is all zeros (or constant) keeps divisor 1.
        return torch.where(f > 1e-8, f, torch.ones_like(f))

    def _pair_mode(self, M: int) -> str:
        mode = self.hparams["image_loss"]
        if mode == "auto":
            return "dense" if M <= self.hparams["dense_max_subspots"] else "sampled"
        return mode

    def _stage1(self, prob: Problem, batches: "_Batcher", dev: torch.device, gen: torch.Generator, bar) -> None:
        h, mod = self.hparams, self.module
        params = list(mod.encoder.parameters()) + list(mod.spot_decoder.parameters())
        opt = torch.optim.Adam(params, lr=h["stage1_lr"])
        mod.train()
        step = 0
        for _ in range(h["stage1_epochs"]):
            for b in batches.epoch():
                x = b.x.to(dev) / mod.feature_scale
                mu, sigma = mod.encode(self._encoder_x(x), b.edge_index.to(dev))
                mu, sigma, xc = mu[b.core], sigma[b.core], x[b.core]
                z = mu + sigma * torch.randn_like(mu)
                raw = mod.spot_decoder(z)
                ll = sum(spot_log_likelihood(om, a, bb, xc[:, s:s + g], h["stage1_scale"])
                         for om, (a, bb), s, g in zip(self.omics, split_params(raw, self.fitted["dims"]),
                                                      np.cumsum([0] + self.fitted["dims"][:-1]),
                                                      self.fitted["dims"]))
                node = -ll.mean()
                graph = pair_bce([z], b.a_index.to(dev), torch.ones(b.a_index.shape[1], device=dev),
                                 mode=self._pair_mode(z.shape[0]), n_negatives=h["n_negatives"], generator=gen,
                                 link=h["pair_link"])
                beta = exp_schedule(step, h["beta_start"], h["beta_end"], h["beta_steps"], h["beta_start_step"])
                kl = kl_standard_normal(mu, sigma, z).mean()
                loss = node + graph + beta * kl
                _check_finite(loss, 1, step)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
            self.history["stage1"].append(float(loss.detach()))
            bar.update(1)

    def _stage2(self, prob: Problem, batches: "_Batcher", dev: torch.device, gen: torch.Generator, bar) -> None:
        h, mod = self.hparams, self.module
        params = list(mod.encoder.parameters()) + list(mod.decoder.parameters())
        opt = torch.optim.Adam(params, lr=h["stage2_lr"])
        if h["gamma_schedule"] == "reference":
            # The reference builds gamma with beta's iteration settings (start, length), per optimisation step.
            def gamma(s: int) -> float:
                return exp_schedule(s, 1.0, h["gamma_end"], h["beta_steps"], h["beta_start_step"])
        else:
            n_steps = max(1, h["stage2_epochs"] * batches.n_batches)

            def gamma(s: int) -> float:
                return exp_schedule(s, 1.0, h["gamma_end"], n_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, gamma)
        mod.train()
        step = 0
        offs = np.cumsum([0] + self.fitted["dims"][:-1])
        for _ in range(h["stage2_epochs"]):
            for b in batches.epoch():
                x = b.x.to(dev) / mod.feature_scale
                mu, sigma = mod.encode(self._encoder_x(x), b.edge_index.to(dev))
                z = mu + sigma * torch.randn_like(mu)
                parent, k, y = b.parent.to(dev), b.k.to(dev), b.y.to(dev)
                sub = mod.subspot_params(z, parent, y, k)
                node = 0.0
                R = []
                for om, (a, bb), s, g in zip(self.omics, sub, offs, self.fitted["dims"]):
                    xm = x[:, s:s + g]
                    if om == "gaussian":
                        eps = a + gaussian_sd(bb, k, h["scale"]) * torch.randn_like(a)
                        agg = torch.zeros_like(xm).index_add_(0, parent, eps) / _spot_k(parent, k, xm.shape[0])
                        R.append(eps - xm[parent])
                    else:
                        mean = subspot_mean(om, a, bb)
                        agg = torch.zeros_like(xm).index_add_(0, parent, mean)
                        R.append(mean - xm[parent] / k[:, None])
                    node = node + (1.0 / h["scale"]) * ((agg[b.core] - xm[b.core]) ** 2).mean()
                image = pair_bce(R, b.w_index.to(dev), b.w_value.to(dev), mode=self._pair_mode(parent.shape[0]),
                                 n_negatives=h["n_negatives"], generator=gen, link=h["pair_link"])
                beta = exp_schedule(step, h["beta_start"], h["beta_end"], h["beta_steps"], h["beta_start_step"])
                kl = kl_standard_normal(mu[b.core], sigma[b.core], z[b.core]).mean()
                loss = node + h["image_weight"] * image + beta * kl
                _check_finite(loss, 2, step)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
            self.history["stage2"].append(float(loss.detach()))
            self.history["node"].append(float(node.detach()))
            self.history["image"].append(float(image.detach()))
            self.history["kl"].append(float(kl.detach()))
            bar.update(1)

    # ------------------------------------------------------------------------------------------------ inference

    def enhance(self, adata=None, image_features: np.ndarray | None = None, subspot_graph=None, *,
                assignment=None, subspot_xy: np.ndarray | None = None, device: str = "auto") -> ad.AnnData:
        """Enhanced profiles: an AnnData with one row per subspot (K per spot; spot n's at rows n*K .. n*K+K-1).

        ``adata=None`` enhances the data the head was fitted on; otherwise give new spots (same features) and
        their subspot image features. Writes ``obs["parent_spot"]`` (the spot's obs name), ``obs["subspot"]`` (k),
        ``obsm["spatial"]`` (subspot centres), ``var["modality"]``, ``uns["soscope"]`` (layout, K, omics).
        Values are distribution means (counts at the per-subspot scale, clamped >= 0).
        """
        if self.module is None or self.fitted is None:
            raise RuntimeError("SoScope.enhance() needs a fitted head: call fit() or load a state dict")
        if adata is None:
            if self._problem is None:
                raise DataError("no fitted data in this head (loaded from a config); pass adata", field="adata")
            prob = self._problem
        else:
            prob = self._problem_for(adata, image_features, subspot_graph, assignment, subspot_xy, fitting=False)
        dev = next(self.module.parameters()).device if device == "auto" else _device(device)
        self.module.to(dev).eval()
        x = prob.x.to(dev) / self.module.feature_scale
        out = self.module.enhance(self._encoder_x(x), prob.edge_index.to(dev), prob.parent.to(dev),
                                  prob.y.to(dev), prob.k.to(dev)).cpu().numpy()
        parent = prob.parent.numpy()
        if self.hparams["project"] == "aggregate":
            out = project_to_spots(out, prob.x.numpy(), parent, self._feature_omics(self.fitted["dims"]))
        within = _within_index(parent)
        names = prob.spot_names[parent]
        obs = pd.DataFrame({"parent_spot": pd.Categorical(names, categories=prob.spot_names),
                            "subspot": within}, index=[f"{n}_{k}" for n, k in zip(names, within)])
        var_names = [v for names_m in self.fitted["var_names"] for v in names_m]
        mods = [m for m, names_m in zip(self.modalities, self.fitted["var_names"]) for _ in names_m]
        if len(set(var_names)) < len(var_names):
            var_names = [f"{m}:{v}" for m, v in zip(mods, var_names)]
        var = pd.DataFrame({"modality": mods}, index=var_names)
        result = ad.AnnData(out.astype(np.float32), obs=obs, var=var)
        result.obsm["spatial"] = prob.sub_xy
        result.uns["soscope"] = {"layout": self.layout.spec, "K": self.layout.K, "omics": self.omics,
                                 "modalities": self.modalities, "pitch": prob.pitch}
        return result

    def _feature_omics(self, dims: list[int]) -> list[str]:
        """Each feature's distribution, modality by modality (``dims`` features each)."""
        return [om for om, g in zip(self.omics, dims) for _ in range(g)]

    def subspot_positions(self, adata: ad.AnnData) -> np.ndarray:
        """(N*K, 2) subspot centres this head would use for ``adata`` (to cut image patches at them)."""
        from spfm.heads.soscope.inputs import spot_coordinates
        from spfm.heads.soscope.layouts import spot_pitch, subspot_positions

        xy = spot_coordinates(adata)
        return subspot_positions(xy, self.layout, self.hparams["pitch"] or spot_pitch(xy))


def project_to_spots(sub: np.ndarray, x: np.ndarray, parent: np.ndarray, kinds: list[str]) -> np.ndarray:
    """Make subspots aggregate exactly to their spot: (M, G) subspot values, (N, G) spot values -> (M, G).

    Count features (``nb``/``poisson``: a spot is the sum of its subspots) are rescaled within each spot so they sum
    to the spot total (the closest point in KL; a spot whose predictions are all zero is split evenly); continuous
    features (``gaussian``: a spot is the mean) are shifted so they average to the spot value (the closest point in
    L2). The within-spot pattern (which subspot is higher) is the model's; the spot level is the measurement.
    """
    sub = np.asarray(sub, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    N = x.shape[0]
    k = np.bincount(parent, minlength=N).astype(np.float64)[:, None]
    tot = np.zeros_like(x)
    np.add.at(tot, parent, sub)
    counts = np.array([kd != "gaussian" for kd in kinds])
    out = sub.copy()
    if counts.any():
        c = np.nonzero(counts)[0]
        s, xc = tot[:, c], x[:, c]
        ratio = np.divide(xc, s, out=np.zeros_like(xc), where=s > 0)
        even = np.where(s > 0, 0.0, xc / np.maximum(k, 1.0))
        out[:, c] = np.clip(sub[:, c], 0.0, None) * ratio[parent] + even[parent]
    if (~counts).any():
        g = np.nonzero(~counts)[0]
        out[:, g] = sub[:, g] + (x[:, g] - tot[:, g] / np.maximum(k, 1.0))[parent]
    return out.astype(np.float32)


def _check_finite(loss: torch.Tensor, stage: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"soScope stage {stage} loss became non-finite at step {step}. The reference settings can diverge on"
            " large raw counts (hundreds per spot): try normalize='feature' and encoder_input='log1p', or a lower"
            " learning rate")


def _spot_k(parent: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
    """(n, 1) number of subspots per spot of the batch (at least 1)."""
    c = torch.zeros(n, device=parent.device).index_add_(0, parent, torch.ones_like(k))
    return c.clamp_min(1.0)[:, None]


def _within_index(parent: np.ndarray) -> np.ndarray:
    order = np.argsort(parent, kind="stable")
    first = np.searchsorted(parent[order], parent[order])
    within = np.empty(len(parent), dtype=np.int64)
    within[order] = np.arange(len(parent)) - first
    return within


class _Batch:
    """One training step's tensors; ``core`` indexes (into the batch's spots) the spots whose losses count."""

    def __init__(self, x, edge_index, core, a_index, parent, k, y, w_index, w_value, ctx) -> None:
        self.x, self.edge_index, self.core, self.a_index, self.ctx = x, edge_index, core, a_index, ctx
        self.parent, self.k, self.y, self.w_index, self.w_value = parent, k, y, w_index, w_value


class _Batcher:
    """Full batch (the reference), or spatial mini-batches: ``batch_spots`` nearest spots around a random spot,
    encoded with their 3-hop neighbourhood (the encoder's receptive field) so their latents are exact."""

    def __init__(self, prob: Problem, batch_spots: int | None, gen: torch.Generator) -> None:
        self.prob, self.gen = prob, gen
        N = prob.x.shape[0]
        self.full = batch_spots is None or batch_spots >= N
        if batch_spots is not None and batch_spots < 2:
            raise DataError(f"batch_spots must be at least 2, got {batch_spots}", field="batch_spots")
        self.batch_spots = batch_spots
        self.n_batches = 1 if self.full else math.ceil(N / batch_spots)
        self._full_batch = self._make(torch.arange(N), torch.arange(N)) if self.full else None
        if not self.full:
            self.tree = cKDTree(prob.spot_xy)

    def epoch(self):
        if self.full:
            yield self._full_batch
            return
        N = self.prob.x.shape[0]
        for _ in range(self.n_batches):
            seed = int(torch.randint(0, N, (1,), generator=self.gen))
            _, core = self.tree.query(self.prob.spot_xy[seed], k=self.batch_spots)
            core = torch.as_tensor(np.sort(np.atleast_1d(core)), dtype=torch.long)
            ctx, _, _, _ = k_hop_subgraph(core, 3, self.prob.edge_index, num_nodes=N)
            yield self._make(core, ctx)

    def _make(self, core: torch.Tensor, ctx: torch.Tensor) -> _Batch:
        p = self.prob
        N, M = p.x.shape[0], p.parent.shape[0]
        spot_map = torch.full((N,), -1, dtype=torch.long)
        spot_map[ctx] = torch.arange(ctx.numel())
        keep_e = (spot_map[p.edge_index[0]] >= 0) & (spot_map[p.edge_index[1]] >= 0)
        edge_index = spot_map[p.edge_index[:, keep_e]]
        in_core = torch.zeros(N, dtype=torch.bool)
        in_core[core] = True
        core_local = spot_map[core]
        # A over the core spots (self loops included), the stage-1 BCE target.
        core_map = torch.full((N,), -1, dtype=torch.long)
        core_map[core] = torch.arange(core.numel())
        keep_a = in_core[p.edge_index[0]] & in_core[p.edge_index[1]]
        a_index = core_map[p.edge_index[:, keep_a]]
        loops = torch.arange(core.numel())
        a_index = torch.cat([a_index, torch.stack([loops, loops])], dim=1)
        # Subspots of the core spots, and W restricted to them.
        subs = torch.nonzero(in_core[p.parent]).ravel()
        sub_map = torch.full((M,), -1, dtype=torch.long)
        sub_map[subs] = torch.arange(subs.numel())
        keep_w = (sub_map[p.w_index[0]] >= 0) & (sub_map[p.w_index[1]] >= 0)
        return _Batch(x=p.x[ctx], edge_index=edge_index, core=core_local, a_index=a_index,
                      parent=spot_map[p.parent[subs]], k=p.k[subs], y=p.y[subs],
                      w_index=sub_map[p.w_index[:, keep_w]], w_value=p.w_value[keep_w], ctx=ctx)
