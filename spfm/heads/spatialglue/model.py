"""SpatialGlue's network as plain ``nn.Module``s over dense features and sparse normalised adjacencies.

Shapes: N spots, M modalities (2 or 3), D_m input dimensions of modality m (its PCA/LSI features), H = 64 latent.

* Encoder m: ``H_g = A_g X_m W_m`` for g in {spatial, feature}: one GCN layer without bias or activation, the SAME
  ``W_m`` (D_m, H) for both graphs (so ``X_m W_m`` is computed once and propagated twice).
* Within-modality attention: ``e_g = q^T tanh(W h_g)``, softmax over the two graphs per spot, ``Y_m = sum_g a_g H_g``.
* Between-modality attention: the same layer over the M latents -> ``Z`` (N, H) and per-spot weights ``beta``.
* Decoder m: ``X_hat_m = A_spatial Z W'_m`` (H, D_m), linear, no bias.
* Correspondence for the ordered pair (a, b): ``Enc_b(Dec_b(Y_a))`` on the spatial graph, compared with ``Y_a``.

Parameters are created (and Xavier-initialised) in the reference's order -- encoder 1, decoder 1, encoder 2,
decoder 2, [encoder 3, decoder 3,] attention 1, attention 2, [attention 3,] cross attention -- so the same torch
seed gives the reference's initial weights.

The adjacencies are symmetric (``D^-1/2 (A + A^T + I) D^-1/2`` of a symmetrised kNN graph), which
:class:`SymSpMM` uses: the gradient of ``A X`` with respect to X is ``A^T G = A G``, so backward reuses the same
CSR matrix instead of building its transpose every step. Nothing here is N x N dense.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F


class SymSpMM(torch.autograd.Function):
    """``A @ X`` for a sparse symmetric A (N, N) and dense X (N, H), differentiable in X only."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.A = A
        return torch.sparse.mm(A, X)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return None, torch.sparse.mm(ctx.A, grad.contiguous())


def spmm(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Propagate X (N, H) over the symmetric sparse adjacency A (N, N)."""
    return SymSpMM.apply(A, X)


class Linear(nn.Module):
    """A bias-free weight (in, out), Xavier-uniform initialised (the reference's Encoder/Decoder weight)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Attention(nn.Module):
    """``alpha = softmax_t(q^T tanh(W h_t) + 1e-6)`` over T views; returns ``sum_t alpha_t h_t`` and alpha."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w_omega = nn.Parameter(torch.empty(dim, dim))
        self.u_omega = nn.Parameter(torch.empty(dim, 1))
        nn.init.xavier_uniform_(self.w_omega)
        nn.init.xavier_uniform_(self.u_omega)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """views: T tensors (N, H) -> combined (N, H), alpha (N, T)."""
        # View by view rather than on a stacked (N, T, H) tensor: the same arithmetic, fewer N x T x H activations
        # kept for backward (it matters at a million spots).
        scores = torch.cat([torch.tanh(v @ self.w_omega) @ self.u_omega for v in views], dim=1)  # (N, T)
        alpha = F.softmax(scores + 1e-6, dim=1)  # per spot over the views, as the reference
        combined = alpha[:, :1] * views[0]
        for t in range(1, len(views)):
            combined = combined + alpha[:, t:t + 1] * views[t]
        return combined, alpha


def pairs(n_modalities: int) -> list[tuple[int, int]]:
    """Ordered pairs (a, b), a != b, in the order of the correspondence loss weights: (0,1), (1,0) for two."""
    if n_modalities == 2:
        return [(0, 1), (1, 0)]
    return list(itertools.permutations(range(n_modalities), 2))


class SpatialGlueModule(nn.Module):
    """The dual-attention graph autoencoder.

    Args:
        in_dims: D_m of each modality (2 or 3 entries).
        dim_output: latent size H (64 in the paper).
    """

    def __init__(self, in_dims: list[int], dim_output: int = 64) -> None:
        super().__init__()
        self.in_dims = [int(d) for d in in_dims]
        self.dim_output = int(dim_output)
        encoders, decoders = [], []
        for d in self.in_dims:  # reference order: encoder m, decoder m, then the next modality
            encoders.append(Linear(d, dim_output))
            decoders.append(Linear(dim_output, d))
        self.encoders = nn.ModuleList(encoders)
        self.decoders = nn.ModuleList(decoders)
        self.within = nn.ModuleList([Attention(dim_output) for _ in self.in_dims])
        self.cross = Attention(dim_output)

    def encode(self, m: int, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return spmm(A, self.encoders[m](x))

    def decode(self, m: int, z: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return spmm(A, self.decoders[m](z))

    def forward(self, features: list[torch.Tensor], adj_spatial: torch.Tensor,
                adj_feature: list[torch.Tensor]) -> dict[str, object]:
        """Run the network.

        Args:
            features: M tensors (N, D_m).
            adj_spatial: (N, N) sparse normalised spatial adjacency (shared by the modalities: same spots).
            adj_feature: M sparse normalised feature adjacencies (N, N).

        Returns:
            dict with ``latent`` (M tensors Y_m (N, H)), ``combined`` Z (N, H), ``alpha`` (M tensors (N, 2): spatial,
            feature), ``beta`` (N, M), ``recon`` (M tensors (N, D_m)), ``across`` {(a, b): Enc_b(Dec_b(Y_a))}.
        """
        latent, alphas = [], []
        for m, x in enumerate(features):
            xw = self.encoders[m](x)  # one X W for both graphs (same weight)
            y, a = self.within[m]([spmm(adj_spatial, xw), spmm(adj_feature[m], xw)])
            latent.append(y)
            alphas.append(a)
        z, beta = self.cross(latent)
        recon = [self.decode(m, z, adj_spatial) for m in range(len(features))]
        across = {(a, b): self.encode(b, self.decode(b, latent[a], adj_spatial), adj_spatial)
                  for a, b in pairs(len(features))}
        return {"latent": latent, "combined": z, "alpha": alphas, "beta": beta, "recon": recon, "across": across}

    def loss(self, out: dict, features: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, dict]:
        """``sum_m w_m MSE(X_m, X_hat_m) + sum_(a,b) w_ab MSE(Y_a, Enc_b(Dec_b(Y_a)))`` (MSE = mean over elements).

        ``weights`` lists the M reconstruction weights then one per ordered pair in :func:`pairs` order.
        """
        M = len(features)
        terms = {f"recon_{m}": F.mse_loss(out["recon"][m], features[m]) for m in range(M)}
        for a, b in pairs(M):
            terms[f"corr_{a}{b}"] = F.mse_loss(out["across"][(a, b)], out["latent"][a])
        total = sum(w * t for w, t in zip(weights, terms.values()))
        return total, {k: float(v.detach()) for k, v in terms.items()}
