"""HisToSGE's modules: patch feature + position -> one pre-norm transformer block -> gene head.

Two ways for spots to attend to each other, selected by ``attention``:

* ``"chunk"`` (the published model): spots are cut into chunks of about 50 in AnnData row order and attend to every
  spot of their chunk; positions enter as learned ``nn.Embedding(512, dim)`` tables indexed by the integer array
  column (x) and row (y), added to the image feature.
* ``"knn"`` (spfm's variant): each spot attends to itself and its k nearest spots in micrometres; each key/value
  carries a sinusoidal encoding of its offset (dx, dy) in micrometres from the query spot, so the module depends on
  physical distances only and transfers across slides and lattices. No absolute position enters. As in the
  published block, the pre-norm LayerNorm is shared by queries and keys.

Everything is over dense (B, L, D) tensors: a chunk batch, or a (N, 1 + k) gather of neighbour indices; never an
N x N matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm -> Linear(dim, mlp_dim) -> GELU -> Linear(mlp_dim, dim)."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head attention of queries (B, Lq, D) over keys/values (B, Lk, D), heads x dim_head inner width.

    The caller applies the pre-norm (queries and keys may be normed separately when they differ).
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.dropout = dropout

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_padding: torch.Tensor | None = None,
                kv_bias: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            q: (B, Lq, D) queries.
            kv: (B, Lk, D) keys and values, or (B, Lk, 2 * heads * dim_head) already projected when ``kv_bias``
                is given (see :meth:`attend_projected`).
            key_padding: (B, Lk) bool, True where a key is padding and must not be attended to.

        Returns:
            (B, Lq, D).
        """
        return self.attend_projected(q, self.to_kv(kv), key_padding)

    def attend_projected(self, q: torch.Tensor, kv: torch.Tensor, key_padding: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """Attention with keys/values already projected: ``kv`` (B, Lk, 2 * heads * dim_head)."""
        b, lq, _ = q.shape
        lk = kv.shape[1]
        qh = self.to_q(q).view(b, lq, self.heads, self.dim_head).transpose(1, 2)
        k, v = kv.chunk(2, dim=-1)
        kh = k.reshape(b, lk, self.heads, self.dim_head).transpose(1, 2)
        vh = v.reshape(b, lk, self.heads, self.dim_head).transpose(1, 2)
        mask = None if key_padding is None else ~key_padding[:, None, None, :]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, lq, self.heads * self.dim_head))


class GeneHead(nn.Module):
    """Linear(dim, hidden) -> ReLU -> LayerNorm(hidden) -> Linear(hidden, n_genes) -> ReLU (log1p expression >= 0).

    ``output="linear"`` (spfm option) drops the final ReLU: a gene whose pre-activation is <= 0 at every spot gets
    no gradient through the ReLU again and stays predicted flat (11-19 of 50 genes on HER2ST).
    """

    def __init__(self, dim: int, hidden: int, n_genes: int, output: str = "relu") -> None:
        super().__init__()
        if output not in ("relu", "linear"):
            raise ValueError(f"output must be 'relu' or 'linear', got {output!r}")
        layers = [nn.Linear(dim, hidden), nn.ReLU(), nn.LayerNorm(hidden), nn.Linear(hidden, n_genes)]
        self.net = nn.Sequential(*layers, *([nn.ReLU()] if output == "relu" else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sinusoidal_offsets(offsets: torch.Tensor, n_freq: int, max_wavelength_um: float,
                       min_wavelength_um: float) -> torch.Tensor:
    """Sin/cos features of 2-D offsets at geometrically spaced wavelengths.

    Args:
        offsets: (..., 2) offsets (dx, dy) in micrometres.
        n_freq: wavelengths per axis.
        max_wavelength_um, min_wavelength_um: the range of wavelengths (longest first).

    Returns:
        (..., 4 * n_freq): [sin(2 pi dx / w), cos(...), sin(2 pi dy / w), cos(...)] over the wavelengths.
    """
    w = torch.logspace(math.log10(max_wavelength_um), math.log10(min_wavelength_um), n_freq,
                       device=offsets.device, dtype=offsets.dtype)
    angles = 2 * math.pi * offsets[..., None] / w  # (..., 2, n_freq)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class HisToSGEModel(nn.Module):
    """Patch features (+ positions) -> log1p-normalised expression of ``n_genes`` genes.

    Args:
        dim: the image feature size D (the transformer width, as published: dim = feature dim).
        n_genes: G, genes predicted.
        attention: ``"chunk"`` (published) or ``"knn"`` (spfm); see the module docstring.
        heads, dim_head, mlp_dim: the transformer block (published: 4, 64, 1024).
        hidden: gene head width (published: 2048 for D = 1024; default 2 * dim).
        n_positions: size of the x and y embedding tables (published: 512).
        positions: chunk attention only: ``"array"`` (published: the x/y array-coordinate embeddings are added to
            the feature) or ``"none"`` (an spfm option, off by default: no absolute position enters; absolute array
            embeddings learnt on some slides do not transfer to another slide's lattice, see the benchmark).
        n_freq, max_wavelength_um, min_wavelength_um: the knn variant's offset encoding.
        dropout: in attention and MLP (published: 0).
        output: the gene head's last activation, ``"relu"`` (published) or ``"linear"`` (spfm option).
    """

    def __init__(self, dim: int, n_genes: int, *, attention: str = "chunk", heads: int = 4, dim_head: int = 64,
                 mlp_dim: int = 1024, hidden: int | None = None, n_positions: int = 512, n_freq: int = 16,
                 max_wavelength_um: float = 2000.0, min_wavelength_um: float = 20.0, dropout: float = 0.0,
                 positions: str = "array", output: str = "relu") -> None:
        super().__init__()
        if attention not in ("chunk", "knn"):
            raise ValueError(f"attention must be 'chunk' or 'knn', got {attention!r}")
        if positions not in ("array", "none"):
            raise ValueError(f"positions must be 'array' or 'none', got {positions!r}")
        self.attention_mode = attention
        self.positions = positions
        self.dim, self.n_genes, self.n_positions = dim, n_genes, n_positions
        self.n_freq, self.max_wavelength_um, self.min_wavelength_um = n_freq, max_wavelength_um, min_wavelength_um
        if attention == "chunk" and positions == "array":
            self.x_embed = nn.Embedding(n_positions, dim)
            self.y_embed = nn.Embedding(n_positions, dim)
        elif attention == "knn":
            # offsets -> key/value space (added after the key/value projection of the pre-normed neighbour, so
            # that projection runs once per spot, not once per (query, neighbour) pair); zero-initialised so
            # training starts from "no position"
            self.pos_proj = nn.Linear(4 * n_freq, 2 * heads * dim_head)
            nn.init.zeros_(self.pos_proj.weight)
            nn.init.zeros_(self.pos_proj.bias)
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, dropout)
        self.ff = FeedForward(dim, mlp_dim, dropout)
        self.gene_head = GeneHead(dim, hidden or 2 * dim, n_genes, output)

    def _lookup(self, table: nn.Embedding, coord: torch.Tensor) -> torch.Tensor:
        """Embedding rows at (possibly fractional) coordinates: integer ones exactly as published; half-integer
        ones (positions between measured spots, e.g. row + 0.5 of a denser lattice) linearly interpolated."""
        lo = coord.floor()
        t = (coord - lo).unsqueeze(-1).to(table.weight.dtype)
        lo = lo.long().clamp(0, self.n_positions - 1)
        hi = (lo + 1).clamp(max=self.n_positions - 1)
        return (1 - t) * table(lo) + t * table(hi)

    def forward_chunks(self, features: torch.Tensor, array_xy: torch.Tensor,
                       padding: torch.Tensor | None = None) -> torch.Tensor:
        """The published model on a batch of chunks.

        Args:
            features: (B, L, D) patch features of B chunks of up to L spots.
            array_xy: (B, L, 2) array (column, row) coordinates, >= 0 and < n_positions.
            padding: (B, L) bool, True at padded slots of chunks shorter than L.

        Returns:
            (B, L, G) predicted log1p expression.
        """
        x = features
        if self.positions == "array":
            x = x + self._lookup(self.x_embed, array_xy[..., 0]) + self._lookup(self.y_embed, array_xy[..., 1])
        h = self.norm(x)
        x = x + self.attn(h, h, padding)
        x = x + self.ff(x)
        return self.gene_head(x)

    def forward_knn(self, features: torch.Tensor, coords_um: torch.Tensor, neighbours: torch.Tensor,
                    query: torch.Tensor | None = None) -> torch.Tensor:
        """spfm's variant: each query spot attends to itself and its neighbours.

        Args:
            features: (N, D) patch features of every spot that can serve as context.
            coords_um: (N, 2) spot centres in micrometres.
            neighbours: (Q, k) indices into the N spots of each query's neighbours (self excluded).
            query: (Q,) indices of the query spots (default: all N, then Q = N).

        Returns:
            (Q, G) predicted log1p expression.
        """
        if query is None:
            query = torch.arange(features.shape[0], device=features.device)
        ctx = torch.cat([query[:, None], neighbours], dim=1)  # (Q, 1 + k), self first
        offsets = coords_um[ctx] - coords_um[query][:, None, :]  # (Q, 1 + k, 2) um
        pe = self.pos_proj(sinusoidal_offsets(offsets, self.n_freq, self.max_wavelength_um, self.min_wavelength_um))
        normed = self.norm(features)
        used, local = torch.unique(ctx, return_inverse=True)  # project each context spot once
        kv = self.attn.to_kv(normed[used])[local] + pe  # (Q, 1 + k, 2 * inner)
        x = features[query][:, None, :]  # (Q, 1, D)
        x = x + self.attn.attend_projected(normed[query][:, None, :], kv)
        x = x + self.ff(x)
        return self.gene_head(x[:, 0])
