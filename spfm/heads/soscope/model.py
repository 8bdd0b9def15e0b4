"""soScope's networks as plain ``nn.Module``s over tensors and PyG edge indices.

Shapes: N spots, M subspots (M = N*K for a fixed layout), G_m features of modality m, G = sum G_m, L image
feature size, D latent size (128), H hidden size (128).

* :class:`GraphEncoder` q(z | X, A): 3 ``TransformerConv`` layers (hidden H, ReLU between, self loops added, edge
  weights not used), the last one outputs 2D -> (mu, sigma = softplus + 1e-7).
* :class:`EnhancementDecoder` p(x_sub | z, y): input ``concat[z_parent / K, (2 - 1/K) * y]``, Linear(D+L -> H),
  two residual blocks ``x + ReLU(Linear(ReLU(Linear(x))))``, Linear(H -> 2G) -> per-modality (a, b).
* :class:`SpotDecoder` (stage 1, VGAE pretraining): MLP D -> H -> H -> 2G over spot profiles.

Parameterisations per modality (the reference's): ``gaussian`` mean a, sd clamp(softplus(b) + 1e-7, scale/K,
100*scale/K); ``nb`` logits a, total_count r = softplus(b) + 1e-7, mean r * exp(a); ``poisson`` rate softplus(b) +
1e-7 (the spot decoder uses softplus(a) for the rate, as the reference's Poisson node decoder has one output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import TransformerConv
from torch_geometric.utils import add_remaining_self_loops

OMICS = ("nb", "poisson", "gaussian")


class GraphEncoder(nn.Module):
    """q(z | X, A): (N, G) spot inputs + (2, E) edges -> mu, sigma, each (N, D)."""

    def __init__(self, in_dim: int, z_dim: int = 128, hidden: int = 128, heads: int = 1) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.conv1 = TransformerConv(in_dim, hidden, heads=heads)
        self.conv2 = TransformerConv(hidden * heads, hidden, heads=heads)
        # The reference's last layer emits 2D // heads channels per head, concatenated back to 2D.
        self.conv3 = TransformerConv(hidden * heads, 2 * z_dim // heads, heads=heads)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        edge_index, _ = add_remaining_self_loops(edge_index, num_nodes=x.shape[0])
        h = F.relu(self.conv1(x, edge_index))
        h = F.relu(self.conv2(h, edge_index))
        out = self.conv3(h, edge_index)
        mu, raw = out[:, : self.z_dim], out[:, self.z_dim:]
        return mu, F.softplus(raw) + 1e-7


class _Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.fc2(F.relu(self.fc1(x))))


class EnhancementDecoder(nn.Module):
    """(M, D) parent latents, (M, L) image features, (M,) K of the parent -> (M, 2G) raw parameters."""

    def __init__(self, z_dim: int, image_dim: int, out_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.inp = nn.Linear(z_dim + image_dim, hidden)
        self.res1 = _Residual(hidden)
        self.res2 = _Residual(hidden)
        self.out = nn.Linear(hidden, 2 * out_dim)

    def forward(self, z_sub: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        k = k.to(z_sub.dtype)[:, None]
        # The reference's scaling: the spot latent is shared by K subspots, the image feature is subspot-specific.
        h = self.inp(torch.cat([z_sub / k, (2.0 - 1.0 / k) * y], dim=1))
        return self.out(self.res2(self.res1(h)))


class SpotDecoder(nn.Module):
    """Stage-1 decoder p(x | z): (N, D) -> (N, 2G)."""

    def __init__(self, z_dim: int, out_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def split_params(raw: torch.Tensor, dims: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(R, 2G) -> per modality (a, b), each (R, G_m); the first G columns are all a's, the next G all b's."""
    G = sum(dims)
    a, b = raw[:, :G], raw[:, G:]
    out, start = [], 0
    for g in dims:
        out.append((a[:, start:start + g], b[:, start:start + g]))
        start += g
    return out


def subspot_mean(omics: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of a subspot's distribution (R, G_m)."""
    if omics == "nb":
        # NB(total_count r, logits a) has mean r * p / (1 - p) = r * exp(a).
        return (F.softplus(b) + 1e-7) * torch.exp(a.clamp(max=20.0))
    if omics == "poisson":
        return F.softplus(b) + 1e-7
    return a


def gaussian_sd(b: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's clamped sd: clamp(softplus(b) + 1e-7, scale/K, 100 scale/K)."""
    lo = (scale / k.to(b.dtype))[:, None]
    sd = F.softplus(b) + 1e-7
    return torch.maximum(torch.minimum(sd, 100.0 * lo), lo)


def spot_log_likelihood(omics: str, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Stage-1 log p(x | z) per spot (N,), summed over features."""
    if omics == "gaussian":
        dist = torch.distributions.Normal(a, scale, validate_args=False)
    elif omics == "nb":
        dist = torch.distributions.NegativeBinomial(total_count=F.softplus(b) + 1e-7, logits=a.clamp(-20, 20),
                                                    validate_args=False)
    else:
        dist = torch.distributions.Poisson(F.softplus(a) + 1e-7, validate_args=False)
    return dist.log_prob(x).sum(dim=1)


class SoScopeModule(nn.Module):
    """The whole model: encoder, enhancement decoder, stage-1 spot decoder.

    Args:
        dims: features per modality [G_1, ...].
        omics: distribution per modality (``nb``, ``poisson``, ``gaussian``).
        image_dim: L, the subspot feature size.
        z_dim, hidden, heads: D, H and the TransformerConv heads.
    """

    def __init__(self, dims: list[int], omics: list[str], image_dim: int, z_dim: int = 128, hidden: int = 128,
                 heads: int = 1) -> None:
        super().__init__()
        self.dims = list(dims)
        self.omics = list(omics)
        G = sum(self.dims)
        self.encoder = GraphEncoder(G, z_dim, hidden, heads)
        self.decoder = EnhancementDecoder(z_dim, image_dim, G, hidden)
        self.spot_decoder = SpotDecoder(z_dim, G, hidden)
        # Per-feature divisor of the data (fitted; ones = the reference, which models values as given). Outputs
        # are multiplied back, so enhance() returns the data's own scale.
        self.register_buffer("feature_scale", torch.ones(G))

    def encode(self, x: torch.Tensor, edge_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, G), (2, E) -> mu, sigma (N, D)."""
        return self.encoder(x, edge_index)

    def subspot_params(self, z: torch.Tensor, parent: torch.Tensor, y: torch.Tensor,
                       k: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(N, D) spot latents, (M,) parent index, (M, L) features, (M,) K -> per modality (a, b), (M, G_m)."""
        return split_params(self.decoder(z[parent], y, k), self.dims)

    @torch.no_grad()
    def enhance(self, x: torch.Tensor, edge_index: torch.Tensor, parent: torch.Tensor, y: torch.Tensor,
                k: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Inference: z = posterior mean, subspot = distribution mean (counts clamped >= 0); (M, G).

        ``x`` is the encoder input (already divided by ``feature_scale``); the output is on the data's scale.
        """
        mu, _ = self.encode(x, edge_index)
        outs = []
        for s in range(0, parent.shape[0], chunk):
            sl = slice(s, s + chunk)
            params = self.subspot_params(mu, parent[sl], y[sl], k[sl])
            cols = []
            for om, (a, b) in zip(self.omics, params):
                m = subspot_mean(om, a, b)
                cols.append(m.clamp_min(0.0) if om != "gaussian" else m)
            outs.append(torch.cat(cols, dim=1))
        return torch.cat(outs, dim=0) * self.feature_scale
