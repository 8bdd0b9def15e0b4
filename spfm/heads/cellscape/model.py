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

The encoder's layers are :class:`GATLayer`, PyG's GATConv with one more way to compute the same thing: when a
layer's input is no wider than one head's output (the first layer on a small panel: osmFISH's 33 genes, 50 in the
scaling runs, against 128 channels a head), it weights and sums the neighbours' inputs and projects the sum, rather
than projecting every neighbour and summing 512-wide messages. Same parameters, same state_dict keys, the same
outputs up to float rounding; on the 100k scaling subgraph that layer's forward + backward is 3.5x cheaper.

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
from torch_geometric.utils import softmax as edge_softmax

from spfm.heads.cellscape.genomap import to_maps


def edges_into(edge_index: torch.Tensor, n_src: int, n_dst: int) -> torch.Tensor:
    """The edges (2, E') of ``edge_index`` (2, E) from the first ``n_src`` nodes into the first ``n_dst``."""
    src, dst = edge_index
    return edge_index[:, (src < n_src) & (dst < n_dst)]


class GATLayer(GATConv):
    """PyG's GATConv (the same parameters and state_dict keys), which can compute only the first rows and, when its
    input is narrow, aggregates in input space.

    Attention is linear in a node's projected features, and so is the weighted sum over neighbours: for head h with
    projection W_h (C, p), ``a . (W_h x) = (W_h^T a) . x`` and ``sum_j alpha_ij W_h x_j = W_h sum_j alpha_ij x_j``.
    When ``in_channels <= out_channels`` (p <= C) messages of width p per head are cheaper than messages of width C,
    and no projection of the source nodes is needed at all. The path is taken only for the configuration CellScape
    builds (one shared linear map, self loops, no edge features, no residual); anything else falls back to GATConv.
    """

    def _input_space(self) -> bool:
        return (self.in_channels <= self.out_channels and getattr(self, "lin", None) is not None
                and self.add_self_loops and getattr(self, "lin_edge", None) is None
                and getattr(self, "res", None) is None)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, n_out: int | None = None) -> torch.Tensor:
        """(N, in) node features, (2, E) (source, target) edges -> (n_out, heads * C) (concat) or (n_out, C);
        ``n_out`` defaults to N. Only the first ``n_out`` outputs are computed; other edges are ignored."""
        n = x.shape[0]
        n_out = n if n_out is None else int(n_out)
        if n_out < n:
            edge_index = edges_into(edge_index, n, n_out)
        if not self._input_space():
            return super().forward(x, edge_index)[:n_out]
        heads, c = self.heads, self.out_channels
        w = self.lin.weight.view(heads, c, -1)  # (H, C, p)
        att_src = torch.einsum("hcp,hc->ph", w, self.att_src[0])  # (p, H): attention weights in input space
        att_dst = torch.einsum("hcp,hc->ph", w, self.att_dst[0])
        src, dst = edge_index
        keep = src != dst  # GATConv replaces any self loop by exactly one per node
        loops = torch.arange(n_out, device=x.device)
        src, dst = torch.cat([src[keep], loops]), torch.cat([dst[keep], loops])
        logits = F.leaky_relu((x @ att_src)[src] + (x[:n_out] @ att_dst)[dst], self.negative_slope)  # (E, H)
        alpha = edge_softmax(logits, dst, num_nodes=n_out)
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        summed = x.new_zeros(n_out, heads, x.shape[1]).index_add_(0, dst, alpha[:, :, None] * x[src][:, None, :])
        out = torch.einsum("nhp,hcp->nhc", summed, w)  # (n_out, H, C)
        out = out.reshape(n_out, heads * c) if self.concat else out.mean(1)
        return out + self.bias if self.bias is not None else out


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
            self.layers.append(GATLayer(dim, hidden_dim // heads, heads=heads, concat=True, dropout=dropout))
            dim = hidden_dim
        self.layers.append(GATLayer(dim, out_dim, heads=1, concat=False, dropout=dropout))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """(N, p) -> (N, out_dim); with ``rows`` (one count per layer, non-increasing) -> (rows[-1], out_dim),
        layer i computing only its first rows[i] outputs (module docstring)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, edge_index, None if rows is None else rows[i])
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
