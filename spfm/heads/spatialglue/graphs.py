"""SpatialGlue's graphs from the shared graph module: a spatial kNN graph and one feature kNN graph per modality.

Both are binary kNN graphs without self (k = 3 or 6 on coordinates; k = 20 with correlation distance on the
modality's PCA/LSI features), symmetrised (``A + A^T`` clipped to 1), with self loops, normalised
``D^-1/2 (A + I) D^-1/2`` and returned as (N, N) torch sparse CSR tensors (``GCNConv(normalize=True)``'s A_hat).

For very large N, where an exact 20-NN search in 30-100 dimensions is quadratic, ``feature_knn="ivf"`` uses the
shared graph module's inverted-file search (k-means cells compared by dense products, ``n_probe`` cells each:
minutes for a million spots on one core) and ``feature_knn="approx"`` pynndescent (correlation metric; its numba
compilation and graph refinement took ~5 minutes at 100k spots on two busy cores).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from torch_geometric.data import Data

from spfm.data import graphs as G
from spfm.errors import DataError

log = logging.getLogger(__name__)


def normalized(data: Data) -> torch.Tensor:
    """(N, N) CSR ``D^-1/2 (A + I) D^-1/2`` of a symmetric unweighted graph."""
    return G.to_torch_sparse(G.normalize_adjacency(data, "sym", self_loops=True), layout="csr")


def spatial_adjacency(coords: np.ndarray, k: int) -> torch.Tensor:
    """Normalised symmetric spatial kNN adjacency (N, N) over ``coords`` (N, 2)."""
    return normalized(G.knn_graph(coords, k, symmetric=True))


def _approx_knn(X: np.ndarray, k: int, seed: int) -> Data:
    torch_threads = torch.get_num_threads()
    import numba
    from pynndescent import NNDescent

    # Importing numba's OpenMP layer resets torch's thread count to all cores; put it back (an unasked second
    # thread spin-waiting on a shared two-core machine made every epoch 30x slower), and size numba's pool the same.
    threads = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, torch_threads)))
    try:
        index = NNDescent(X, n_neighbors=k + 1, metric="correlation", random_state=seed, low_memory=True)
        idx, _ = index.neighbor_graph
    finally:
        numba.set_num_threads(threads)
        torch.set_num_threads(torch_threads)
    n = X.shape[0]
    is_self = idx == np.arange(n)[:, None]
    is_self[~is_self.any(axis=1), -1] = True  # drop the farthest when the point itself was not returned
    src = idx[~is_self].reshape(-1)
    dst = np.repeat(np.arange(n), k)
    return G.make_symmetric(Data(edge_index=torch.from_numpy(np.stack([src, dst]).astype(np.int64)), num_nodes=n))


def feature_adjacency(X: np.ndarray, k: int = 20, *, method: Literal["exact", "ivf", "approx"] = "exact",
                      seed: int = 0, name: str = "features", n_probe: int = 8) -> torch.Tensor:
    """Normalised symmetric feature kNN adjacency (N, N), correlation distance, on X (N, D)."""
    if method in ("exact", "ivf"):
        try:
            data = G.feature_knn_graph(X, k, metric="correlation", symmetric=True,
                                       algorithm="ivf" if method == "ivf" else "exact", n_probe=n_probe, seed=seed)
        except DataError as exc:
            raise DataError(f"feature graph of modality {name!r}: {exc}", field=name) from None
    elif method == "approx":
        data = _approx_knn(np.asarray(X, dtype=np.float32), k, seed)
    else:
        raise DataError(f"feature_knn must be 'exact', 'ivf' or 'approx', got {method!r}", field="feature_knn")
    return normalized(data)
