"""soScope's loss terms: the pairwise similarity BCE (exact dense or sparse + sampled negatives), KL, schedules.

Pairwise BCE. The reference scores every pair (i, j) of M rows: Lambda_ij = sigmoid(r_i . r_j) and
``mean_ij BCE(Lambda_ij, W_ij)`` over all M^2 pairs, W sparse (grid neighbours + self loops, 0 elsewhere). With
several modalities the per-modality Lambdas combine as ``1 - prod_m (1 - Lambda^m)`` (= Lp + Lg - Lp Lg for two).
Write t_ij = sum_m softplus(s^m_ij), so that -log(1 - Lambda_ij) = t_ij; then

    sum_ij BCE_ij = sum_{all ij} t_ij + sum_{ij in W} W_ij (-log Lambda_ij - t_ij)

The second sum runs over W's E entries only. The first is split into W's support (exact) and the rest, the
"negatives", which :func:`pair_bce` ``mode="sampled"`` estimates from S pairs drawn uniformly from all M^2 (with
replacement), dropping the draws that hit W's support and weighting the others by M^2 / S:

    sum_{ij not in W} t_ij  ~=  (M^2 / S) * sum_{sampled, not in W} t_ij

which is unbiased (each pair is drawn with probability S / M^2 in expectation). Cost O((E + S) * G) time and
memory instead of O(M^2 * G): the (N*K)^2 matrix is never built. ``mode="dense"`` computes the exact mean for small
inputs. Both divide by M^2, the reference's normalisation.

Two ways to evaluate one pair's BCE (``link``):

* ``"reference"`` (default, the authors' code): Lambda = sigmoid(s) in float32, then torch's
  ``binary_cross_entropy``, which clamps each log at -100. A pair whose sigmoid saturates (|s| > ~17) costs a bounded
  amount and passes no gradient. On raw counts in the hundreds the residual dot products reach 1e4-1e6, so nearly
  every pair saturates: the image term is inert until the aggregation term has pulled the residuals down, and
  training stays finite. The sum over W's support and the sampled negatives use the same per-pair function
  (``sum_{W} BCE(Lambda, W_ij) + (M^2/S) sum_{sampled, not in W} BCE(Lambda, 0)``), so the estimator stays
  unbiased for it.
* ``"logits"`` (spfm option): the same loss in log space via t_ij (above), exact where the sigmoid saturates, with a
  gradient that keeps growing with |s|. On raw counts this overflows (1/t with t denormal -> inf, times a zero
  sigmoid derivative -> NaN): it is only safe on normalised values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _neg_log_lambda(t: torch.Tensor) -> torch.Tensor:
    """-log(1 - exp(-t)) = -log Lambda, stable for small and large t (clamped like torch's BCE at 100)."""
    return -torch.log((-torch.expm1(-t)).clamp_min(math.exp(-100.0)))


def _t(R: list[torch.Tensor], i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return sum(F.softplus((r[i] * r[j]).sum(dim=1)) for r in R)


def pair_bce(R: list[torch.Tensor], pos_index: torch.Tensor, pos_weight: torch.Tensor, *,
             mode: str = "sampled", n_negatives: int | None = None,
             generator: torch.Generator | None = None, link: str = "reference") -> torch.Tensor:
    """Mean over all M^2 pairs of BCE(1 - prod_m sigmoid(-r^m_i . r^m_j), W_ij).

    Args:
        R: per modality (M, G_m) rows (soScope: subspot profile minus its parent's per-subspot profile).
        pos_index: (2, E) coalesced (unique) pairs where W is non-zero (both directions, self loops included).
        pos_weight: (E,) W values in [0, 1].
        mode: ``"dense"`` (exact, O(M^2) memory) or ``"sampled"`` (unbiased estimate, O(E + S)).
        n_negatives: S, pairs drawn for the negative sum (default 8 * M).
        generator: torch generator for the draws.
        link: ``"reference"`` (sigmoid then clamped BCE, the authors') or ``"logits"`` (log-space, see above).
    """
    M = R[0].shape[0]
    i, j = pos_index
    w = pos_weight.to(R[0].dtype)
    if link == "reference":
        return _pair_bce_reference(R, i, j, w, mode, n_negatives, generator)
    if link != "logits":
        raise ValueError(f"link must be 'reference' or 'logits', got {link!r}")
    if mode == "dense":
        t = sum(F.softplus(r @ r.T) for r in R)
        Wd = torch.zeros(M, M, dtype=t.dtype, device=t.device)
        Wd[i, j] = w
        bce = Wd * _neg_log_lambda(t) + (1.0 - Wd) * t
        return bce.mean()
    if mode != "sampled":
        raise ValueError(f"mode must be 'dense' or 'sampled', got {mode!r}")
    t_pos = _t(R, i, j)
    total = (w * _neg_log_lambda(t_pos) + (1.0 - w) * t_pos).sum()
    si, sj, S = _negatives(M, i, j, n_negatives, generator, R[0].device)
    if si.numel():
        total = total + (float(M) * float(M) / S) * _t(R, si, sj).sum()
    return total / (float(M) * float(M))


def _negatives(M: int, i: torch.Tensor, j: torch.Tensor, n_negatives: int | None, generator, dev):
    """S uniform draws of (i, j) from all M^2 pairs, those on W's support dropped; returns (si, sj, S)."""
    S = int(n_negatives or 8 * M)
    si = torch.randint(0, M, (S,), generator=generator, device="cpu").to(dev)
    sj = torch.randint(0, M, (S,), generator=generator, device="cpu").to(dev)
    keys = torch.sort(i * M + j).values
    q = si * M + sj
    at = torch.searchsorted(keys, q).clamp_max(keys.numel() - 1)
    neg = keys[at] != q
    return si[neg], sj[neg], S


def _lambda(R: list[torch.Tensor], i: torch.Tensor | None = None, j: torch.Tensor | None = None) -> torch.Tensor:
    """Lambda = 1 - prod_m (1 - sigmoid(r^m_i . r^m_j)) in probability space (the reference's Lp + Lg - Lp Lg);
    all pairs (M, M) when i, j are None, else the listed pairs."""
    lam = None
    for r in R:
        s = r @ r.T if i is None else (r[i] * r[j]).sum(dim=1)
        p = torch.sigmoid(s)
        lam = p if lam is None else lam + p - lam * p
    return lam


def _pair_bce_reference(R, i, j, w, mode, n_negatives, generator) -> torch.Tensor:
    """The authors' per-pair BCE (sigmoid, then torch's BCE with logs clamped at -100), dense or sampled."""
    M = R[0].shape[0]
    if mode == "dense":
        lam = _lambda(R)
        if not torch.isfinite(lam).all():
            return lam.sum()  # NaN: torch's BCE would raise; the caller reports the divergence
        Wd = torch.zeros(M, M, dtype=lam.dtype, device=lam.device)
        Wd[i, j] = w
        return F.binary_cross_entropy(lam, Wd)
    if mode != "sampled":
        raise ValueError(f"mode must be 'dense' or 'sampled', got {mode!r}")
    lam_pos = _lambda(R, i, j)
    if not torch.isfinite(lam_pos).all():
        return lam_pos.sum()  # NaN: torch's BCE would raise; the caller reports the divergence
    total = F.binary_cross_entropy(lam_pos, w, reduction="sum")
    si, sj, S = _negatives(M, i, j, n_negatives, generator, R[0].device)
    if si.numel():
        lam = _lambda(R, si, sj).nan_to_num(nan=0.5)  # finite here whenever the positives were
        total = total + (float(M) * float(M) / S) * F.binary_cross_entropy(lam, torch.zeros_like(lam),
                                                                           reduction="sum")
    return total / (float(M) * float(M))


def kl_standard_normal(mu: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Single-sample KL as the reference computes it: log q(z) - log N(z; 0, I), summed over D, (N,)."""
    log_q = (-0.5 * ((z - mu) / sigma) ** 2 - torch.log(sigma)).sum(dim=1)
    log_p = (-0.5 * z**2).sum(dim=1)
    return log_q - log_p


def exp_schedule(step: int, start: float, end: float, n_steps: int, start_step: int = 0) -> float:
    """start until ``start_step``, then geometric interpolation to ``end`` over ``n_steps`` (linear if one is 0)."""
    if start == end or step <= start_step or n_steps <= 0:
        return float(start)
    frac = min(1.0, (step - start_step) / n_steps)
    if start > 0 and end > 0:
        return float(start * (end / start) ** frac)
    return float(start + (end - start) * frac)
