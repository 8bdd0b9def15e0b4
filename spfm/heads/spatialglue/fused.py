"""One SpatialGlue training step with a hand-written backward: the same loss and gradients as autograd through
:meth:`SpatialGlueModule.forward` + :meth:`~SpatialGlueModule.loss`, about half the CPU time.

Why: at the paper's sizes (1-10k spots, 64 latent) an epoch is ~40 small GEMMs and sparse products plus ~250
autograd nodes, zero-fills, copies and elementwise kernels, and the bookkeeping cost as much as the arithmetic.
Writing the backward by hand lets every product be batched over modalities and views and keeps only what it needs:

* the spatial graph is shared, so every spatial propagation of the step is one sparse product over the modalities'
  columns side by side (``A_s [P_1 .. P_M]``, ``A_s [Z, Y_1 .. Y_M]``, ``A_s (A_s Y)``), forward and backward
  (``A_s`` is symmetric, so its backward is itself);
* ``Enc_b(Dec_b(Y_a)) = A_s (A_s Y_a W'_b) W_b = (A_s^2 Y_a) (W'_b W_b)``: the correspondence path multiplies by
  one H x H matrix instead of a H x D_b and a D_b x H one (the same value, reassociated);
* both views of an attention layer go through ``tanh(V W) u`` as one stacked (T N, H) product.

Shapes: N spots, M modalities, D_m input dimensions, H latent. Nothing is N x N dense.
"""

from __future__ import annotations

import torch

from spfm.heads.spatialglue.model import SpatialGlueModule, pairs


def _spmm(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return torch.sparse.mm(A, X)


def _attention_forward(views: list[torch.Tensor], w: torch.Tensor, u: torch.Tensor):
    """``alpha = softmax_t(q^T tanh(W h_t))``, combined ``sum_t alpha_t h_t``; returns (combined, alpha (N, T),
    cache). The reference adds 1e-6 to every score, which a softmax ignores."""
    T, N = len(views), views[0].shape[0]
    V = torch.cat(views, 0)  # (T N, H)
    Th = torch.tanh(V @ w)  # (T N, H)
    alpha = torch.softmax((Th @ u).view(T, N), dim=0)  # (T, N): per spot over the views
    combined = views[0] * alpha[0, :, None]
    for t in range(1, T):
        combined.addcmul_(views[t], alpha[t, :, None])
    return combined, alpha.t(), (V, Th, alpha)


def _attention_backward(grad: torch.Tensor, w: torch.Tensor, u: torch.Tensor, cache, gw: torch.Tensor,
                        gu: torch.Tensor) -> torch.Tensor:
    """Gradient (T N, H) into the stacked views for ``grad`` (N, H) on the combined output; accumulates the
    attention weights' gradients into ``gw`` (H, H) and ``gu`` (H, 1)."""
    V, Th, alpha = cache
    T, N = alpha.shape
    H = grad.shape[1]
    g_alpha = (V.view(T, N, H) * grad).sum(-1)  # (T, N)
    g_score = alpha * (g_alpha - (alpha * g_alpha).sum(0, keepdim=True))  # softmax backward
    g_score = g_score.reshape(T * N, 1)
    gu.addmm_(Th.t(), g_score)
    g_pre = (g_score * u.view(1, H)).mul_(1.0 - Th * Th)  # through q^T and tanh
    gw.addmm_(V.t(), g_pre)
    g_views = g_pre @ w.t()
    g_views.view(T, N, H).addcmul_(alpha.unsqueeze(-1), grad.unsqueeze(0))  # the direct path sum_t alpha_t h_t
    return g_views


def loss_and_grads(module: SpatialGlueModule, features: list[torch.Tensor], adj_spatial: torch.Tensor,
                   adj_feature: list[torch.Tensor], weights: list[float]) -> tuple[float, dict[str, float]]:
    """Loss of one full-batch step, and its gradients written into every parameter's ``.grad``.

    Args:
        module: the network (its parameters receive ``.grad``; previous gradients are replaced).
        features: M tensors (N, D_m).
        adj_spatial: (N, N) sparse symmetric normalised spatial adjacency.
        adj_feature: M sparse symmetric normalised feature adjacencies (N, N).
        weights: M reconstruction weights then one per ordered pair in :func:`pairs` order.

    Returns:
        ``(total loss, {term name: value})`` with the names of :meth:`SpatialGlueModule.loss`.
    """
    M, H = len(features), module.dim_output
    N = features[0].shape[0]
    dims = [x.shape[1] for x in features]
    W = [e.weight for e in module.encoders]  # (D_m, H)
    Wd = [d.weight for d in module.decoders]  # (H, D_m)
    with torch.no_grad():
        # ---------------------------------------------------------------- forward
        P = [x @ w for x, w in zip(features, W)]
        S = _spmm(adj_spatial, torch.cat(P, 1))  # (N, M H)
        latent, caches = [], []
        for m in range(M):
            view_feature = _spmm(adj_feature[m], P[m])
            y, _, cache = _attention_forward([S[:, m * H:(m + 1) * H], view_feature], module.within[m].w_omega,
                                             module.within[m].u_omega)
            latent.append(y)
            caches.append(cache)
        del P, S, view_feature  # the attention caches hold copies of the views; at 10^6 spots each is 256 MB
        z, _, cross_cache = _attention_forward(latent, module.cross.w_omega, module.cross.u_omega)
        Q = _spmm(adj_spatial, torch.cat([z] + latent, 1))  # (N, (M+1) H): A Z, A Y_1 .. A Y_M
        Wd_cat = torch.cat(Wd, 1)  # (H, sum D)
        recon = Q[:, :H] @ Wd_cat  # (N, sum D)
        twice = _spmm(adj_spatial, Q[:, H:])  # (N, M H): A^2 Y
        K = [wd @ w for wd, w in zip(Wd, W)]  # (H, H): decoder b then encoder b
        # ---------------------------------------------------------------- loss and its gradient
        terms: dict[str, float] = {}
        total = 0.0
        E = torch.empty_like(recon)
        start = 0
        for m, d in enumerate(dims):
            diff = E[:, start:start + d]
            torch.sub(recon[:, start:start + d], features[m], out=diff)
            value = float(diff.pow(2).mean())
            terms[f"recon_{m}"] = value
            total += weights[m] * value
            diff.mul_(2.0 * weights[m] / (N * d))
            start += d
        del recon
        g_Wd_cat = Q[:, :H].t() @ E
        g_Q = torch.empty_like(Q)
        torch.mm(E, Wd_cat.t(), out=g_Q[:, :H])
        del Q, E
        g_twice = torch.zeros_like(twice)
        g_K = [torch.zeros(H, H, dtype=z.dtype, device=z.device) for _ in range(M)]
        g_latent = [torch.zeros_like(z) for _ in range(M)]
        for i, (a, b) in enumerate(pairs(M)):
            across = twice[:, a * H:(a + 1) * H] @ K[b]
            C = across.sub_(latent[a])
            value = float(C.pow(2).mean())
            terms[f"corr_{a}{b}"] = value
            w_ab = weights[M + i]
            total += w_ab * value
            C.mul_(2.0 * w_ab / (N * H))
            g_K[b].addmm_(twice[:, a * H:(a + 1) * H].t(), C)
            g_twice[:, a * H:(a + 1) * H].addmm_(C, K[b].t())
            g_latent[a].sub_(C)
        # ---------------------------------------------------------------- backward through the graphs
        del twice, across, C
        g_Q[:, H:] = _spmm(adj_spatial, g_twice)
        del g_twice
        g_ZY = _spmm(adj_spatial, g_Q)  # (N, (M+1) H)
        del g_Q
        for m in range(M):
            g_latent[m].add_(g_ZY[:, (m + 1) * H:(m + 2) * H])
        g_w_cross, g_u_cross = torch.zeros_like(module.cross.w_omega), torch.zeros_like(module.cross.u_omega)
        g_views = _attention_backward(g_ZY[:, :H], module.cross.w_omega, module.cross.u_omega, cross_cache,
                                      g_w_cross, g_u_cross)
        del cross_cache
        g_S = torch.empty(N, M * H, dtype=z.dtype, device=z.device)
        g_P_feature = []
        g_within = []
        for m in range(M):
            g_latent[m].add_(g_views[m * N:(m + 1) * N])
            att = module.within[m]
            gw, gu = torch.zeros_like(att.w_omega), torch.zeros_like(att.u_omega)
            g_two = _attention_backward(g_latent[m], att.w_omega, att.u_omega, caches[m], gw, gu)
            caches[m] = None
            g_S[:, m * H:(m + 1) * H] = g_two[:N]
            g_P_feature.append(_spmm(adj_feature[m], g_two[N:]))
            g_within.append((gw, gu))
        del g_views, g_ZY, g_latent, g_two
        g_P = _spmm(adj_spatial, g_S)
        del g_S
        # ---------------------------------------------------------------- parameter gradients
        start = 0
        for m, d in enumerate(dims):
            g_Pm = g_P_feature[m].add_(g_P[:, m * H:(m + 1) * H])
            g_W = features[m].t() @ g_Pm
            g_W.addmm_(Wd[m].t(), g_K[m])  # K_m = W'_m W_m
            g_Wd = g_Wd_cat[:, start:start + d].addmm(g_K[m], W[m].t())
            module.encoders[m].weight.grad = g_W
            module.decoders[m].weight.grad = g_Wd
            module.within[m].w_omega.grad, module.within[m].u_omega.grad = g_within[m]
            start += d
        module.cross.w_omega.grad, module.cross.u_omega.grad = g_w_cross, g_u_cross
    return total, terms
