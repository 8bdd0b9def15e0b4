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
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over all M^2 pairs of BCE(1 - prod_m sigmoid(-r^m_i . r^m_j), W_ij).

    Args:
        R: per modality (M, G_m) rows (soScope: subspot profile minus its parent's per-subspot profile).
        pos_index: (2, E) coalesced (unique) pairs where W is non-zero (both directions, self loops included).
        pos_weight: (E,) W values in [0, 1].
        mode: ``"dense"`` (exact, O(M^2) memory) or ``"sampled"`` (unbiased estimate, O(E + S)).
        n_negatives: S, pairs drawn for the negative sum (default 8 * M).
        generator: torch generator for the draws.
    """
    M = R[0].shape[0]
    i, j = pos_index
    w = pos_weight.to(R[0].dtype)
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
    S = int(n_negatives or 8 * M)
    dev = R[0].device
    si = torch.randint(0, M, (S,), generator=generator, device="cpu").to(dev)
    sj = torch.randint(0, M, (S,), generator=generator, device="cpu").to(dev)
    keys = torch.sort(i * M + j).values
    q = si * M + sj
    at = torch.searchsorted(keys, q).clamp_max(keys.numel() - 1)
    neg = keys[at] != q
    if neg.any():
        total = total + (float(M) * float(M) / S) * _t(R, si[neg], sj[neg]).sum()
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
