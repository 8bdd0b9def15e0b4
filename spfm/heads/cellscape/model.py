"""CellScape's networks: masked GAT spatial encoder, CNN intrinsic encoder, linear fusion, GAT decoder.

Shapes: N cells (of a subgraph), p genes, q = ceil(sqrt(p)) the genomic-map side, E edges (source, target).

``variant="full"``: ``z = W [z_spatial || z_intrinsic]``; ``variant="cci"`` (CellScape_CCI, for spot platforms):
the spatial branch only, ``z = W z_spatial``.

Choices the paper leaves open (tuned on osmFISH / STARmap, see docs/cellscape.md):

* GAT encoder: ``n_layers`` GATConv layers (default 2), hidden ``hidden_dim`` split over ``heads`` concatenated
  heads, ELU between layers, the last layer one head of ``latent_dim``. PyG's GATConv adds a self loop to every
  node (the graph itself has none), so a cell attends to itself and its neighbours, as in GraphMAE.
* CNN: two Conv2d(3x3) -> BatchNorm2d -> ELU blocks (1 -> 16 -> 32 channels, the second with stride 2), flatten,
  Linear -> ``latent_dim``.
* Decoder: one GATConv(``fused_dim`` -> p), a single head.
* Edge weights (distances in the paper's A) are not used: standard GAT ignores them, as the spec notes.

Mini-batches (``rows``): a sampled subgraph lists its nodes by hop from the seed cells (seeds first), and the
output of a layer with k layers after it is read only within k hops of the seeds. Given ``rows`` (per layer, how
many leading nodes its output is needed for), each layer computes messages only into those nodes and hands on only
those rows, as PyG's ``trim_to_layer`` does. The rows kept are exactly what the untrimmed pass gives them. On 100k
simulated cells (Delaunay graph, 1,024 random seeds) a 3-hop subgraph holds 36 nodes a seed, 19 within 2 hops and
6.9 within 1: the second GAT layer, the CNN and the fusion now run on those 6.9. In training mode the CNN's
BatchNorm statistics are those of the rows it sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATConv

from spfm.heads.cellscape.genomap import to_maps


def edges_into(edge_index: torch.Tensor, n_src: int, n_dst: int) -> torch.Tensor:
    """The edges (2, E') of ``edge_index`` (2, E) from the first ``n_src`` nodes into the first ``n_dst``."""
    src, dst = edge_index
    return edge_index[:, (src < n_src) & (dst < n_dst)]


class GATEncoder(nn.Module):
    """Stacked multi-head GAT: (N, p) -> (N, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, heads: int, n_layers: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_dim % heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by heads {heads}")
        self.layers = nn.ModuleList()
        dim = in_dim
        for _ in range(n_layers - 1):
            self.layers.append(GATConv(dim, hidden_dim // heads, heads=heads, concat=True, dropout=dropout))
            dim = hidden_dim
        self.layers.append(GATConv(dim, out_dim, heads=1, concat=False, dropout=dropout))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """(N, p) -> (N, out_dim); with ``rows`` (one count per layer, non-increasing) -> (rows[-1], out_dim),
        layer i computing only its first rows[i] outputs (module docstring)."""
        for i, layer in enumerate(self.layers):
            if rows is None:
                x = layer(x, edge_index)
            else:
                x = layer(x, edges_into(edge_index, x.shape[0], rows[i]))[: rows[i]]
            if i < len(self.layers) - 1:
                x = F.elu(x)
        return x


class CNNEncoder(nn.Module):
    """(N, 1, q, q) genomic maps -> (N, out_dim)."""

    def __init__(self, q: int, out_dim: int, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ELU(),
        )
        side = (q + 1) // 2
        self.fc = nn.Linear(c2 * side * side, out_dim)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(maps).flatten(1))


class CellScapeModule(nn.Module):
    """The whole CellScape network over one (sub)graph.

    Buffers: ``grid_index`` (p,) int64, the flat q x q position of each gene (the genomic map, see
    :mod:`spfm.heads.cellscape.genomap`); a zero-length placeholder for ``variant="cci"``.
    """

    def __init__(self, n_genes: int, *, variant: str = "full", hidden_dim: int = 512, latent_dim: int = 64,
                 fused_dim: int = 64, heads: int = 4, n_layers: int = 2, dropout: float = 0.0,
                 map_side: int | None = None) -> None:
        super().__init__()
        from spfm.heads.cellscape.genomap import grid_side

        self.variant = variant
        self.n_genes = int(n_genes)
        self.q = grid_side(n_genes) if map_side is None else int(map_side)  # genomic-map side
        self.spatial = GATEncoder(n_genes, hidden_dim, latent_dim, heads, n_layers, dropout)
        if variant == "full":
            self.intrinsic = CNNEncoder(self.q, latent_dim)
            self.register_buffer("grid_index", torch.arange(n_genes, dtype=torch.long))
            self.fusion = nn.Linear(2 * latent_dim, fused_dim)
        else:
            self.intrinsic = None
            self.register_buffer("grid_index", torch.zeros(0, dtype=torch.long))
            self.fusion = nn.Linear(latent_dim, fused_dim)
        self.decoder = GATConv(fused_dim, n_genes, heads=1, concat=False)

    def encode(self, x: torch.Tensor, edge_index: torch.Tensor, rows: list[int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(z_spatial (M, latent), z_intrinsic (M, latent) or None, z fused (M, fused)) from x (N, p): M = N, or
        rows[-1] with ``rows`` (one count per encoder layer; module docstring)."""
        z_spatial = self.spatial(x, edge_index, rows)
        if self.intrinsic is None:
            return z_spatial, None, self.fusion(z_spatial)
        z_intrinsic = self.intrinsic(to_maps(x[: z_spatial.shape[0]], self.grid_index, self.q))
        return z_spatial, z_intrinsic, self.fusion(torch.cat([z_spatial, z_intrinsic], 1))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, mask: torch.Tensor | None = None,
                rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked forward: cells in ``mask`` (N,) bool get zero expression and a zero map (the map is built from
        the masked vector, so both are zero together). Returns (z (N, fused), x_hat (N, p)); with ``rows`` (one
        count per encoder layer, then one for the decoder) (z (rows[-2], fused), x_hat (rows[-1], p))."""
        if mask is not None:
            x = x.masked_fill(mask[:, None], 0.0)
        if rows is None:
            _, _, z = self.encode(x, edge_index)
            return z, self.decoder(z, edge_index)
        _, _, z = self.encode(x, edge_index, rows[:-1])
        return z, self.decoder(z, edges_into(edge_index, z.shape[0], rows[-1]))[: rows[-1]]
