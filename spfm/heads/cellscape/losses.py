"""CellScape's two objectives and PCGrad.

* :func:`sce_loss`: scaled cosine error ``mean_i (1 - cos(x_i, x_hat_i))^gamma`` over masked cells (gamma = 3).
* :func:`neighbourhood_contrastive`: multi-positive (MIL-NCE style) loss on L2-normalised z,
  ``-log( sum_{j in N(i)} e^{z_i.z_j/tau} / sum_k sum_{l in N(k)} e^{z_i.z_l/tau} )`` averaged over anchors i;
  the denominator pools every neighbour set of the batch's anchors, each l counted once per set it belongs to.
  Only a (B, |pool|) similarity block is formed, never N x N.
* :func:`pcgrad_backward`: Yu et al. 2020 for two losses: per-loss gradients; on the parameters both losses reach,
  each gradient is projected off the other where they conflict (negative dot product); the projected gradients
  are summed. Parameters only one loss reaches keep that loss's gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sce_loss(x: torch.Tensor, x_hat: torch.Tensor, gamma: float = 3.0) -> torch.Tensor:
    """Scalar mean of (1 - cos(x, x_hat))^gamma over rows of x, x_hat (M, p); 0 when M = 0."""
    if x.shape[0] == 0:
        return x_hat.sum() * 0.0
    cos = F.cosine_similarity(x, x_hat, dim=1, eps=1e-8)
    return (1.0 - cos).pow(gamma).mean()


def neighbourhood_contrastive(z: torch.Tensor, anchors: torch.Tensor, edge_index: torch.Tensor,
                              tau: float) -> torch.Tensor:
    """Multi-positive contrastive loss (scalar).

    Args:
        z: embeddings of the subgraph (N, d) (normalised here).
        anchors: (B,) local ids of the anchor cells (the batch's seeds).
        edge_index: (2, E) local (source j, target i) edges; N(i) = sources of edges into i.
        tau: temperature.
    """
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    is_anchor = torch.zeros(n, dtype=torch.bool, device=z.device)
    is_anchor[anchors] = True
    src, dst = edge_index
    keep = is_anchor[dst] & (src != dst)
    src, dst = src[keep], dst[keep]
    if src.numel() == 0:
        return z.sum() * 0.0
    # pool: every neighbour of an anchor, weighted by the number of anchors' neighbour sets containing it
    pool, count = torch.unique(src, return_counts=True)
    anchor_pos = torch.full((n,), -1, dtype=torch.long, device=z.device)
    anchor_pos[anchors] = torch.arange(len(anchors), device=z.device)
    sim = z[anchors] @ z[pool].T / tau  # (B, |pool|)
    log_den = torch.logsumexp(sim + count.log().to(sim.dtype)[None, :], dim=1)  # (B,)
    pos = (z[dst] * z[src]).sum(1) / tau  # (E_pos,)
    row = anchor_pos[dst]
    # log-sum-exp of the positives per anchor, stabilised by the anchor's max over the pool
    m = sim.max(1).values.detach()
    num = torch.zeros(len(anchors), dtype=sim.dtype, device=z.device).index_add_(0, row, torch.exp(pos - m[row]))
    has = num > 0
    log_num = torch.log(num[has]) + m[has]
    return (log_den[has] - log_num).mean()


def pcgrad_backward(losses: list[torch.Tensor], params: list[torch.nn.Parameter]) -> dict[str, float]:
    """Set ``p.grad`` of ``params`` to the PCGrad combination of the gradients of ``losses``.

    Returns diagnostics: ``cosine`` between the two raw gradients on the shared parameters (the last pair) and
    ``conflict`` (1.0 when they conflicted).
    """
    grads = []
    for i, loss in enumerate(losses):
        g = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
        grads.append(g)
    shared = [all(g[k] is not None for g in grads) for k in range(len(params))]

    def flat(g: tuple, which: list[bool]) -> torch.Tensor:
        parts = [g[k].reshape(-1) for k in range(len(params)) if which[k]]
        return torch.cat(parts) if parts else torch.zeros(0)

    flats = [flat(g, shared) for g in grads]
    projected = [f.clone() for f in flats]
    info = {"cosine": 0.0, "conflict": 0.0}
    for i in range(len(flats)):
        for j in range(len(flats)):
            if i == j:
                continue
            dot = torch.dot(projected[i], flats[j])
            if dot < 0:
                projected[i] = projected[i] - dot / flats[j].pow(2).sum().clamp_min(1e-20) * flats[j]
                info["conflict"] = 1.0
    if len(flats) == 2 and flats[0].numel():
        info["cosine"] = float(F.cosine_similarity(flats[0], flats[1], dim=0))
    merged = torch.stack(projected).sum(0)
    offset = 0
    for k, p in enumerate(params):
        if shared[k]:
            n = p.numel()
            p.grad = merged[offset:offset + n].view_as(p).clone()
            offset += n
        else:
            own = [g[k] for g in grads if g[k] is not None]
            p.grad = torch.stack(own).sum(0) if own else None
    return info
