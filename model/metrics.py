"""Distances between sets of features: what ``model.evaluate`` reports about a model's samples.

The features are the judge's (``model.classifier.predict``): a Frechet distance says how far the two
sets are as Gaussians; precision and recall say which way they differ. A model whose samples are
faithful but too alike has high precision and low recall; one that covers the data but draws off it
has the opposite. Guidance trades the second for the first.
"""

from __future__ import annotations

import numpy as np
import torch


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets
    (Heusel et al. 2017). The trace of the matrix square root is taken as the sum of the square roots
    of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric, so no complex sqrtm is needed."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def knn_radii(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """(N,) the distance from each point to its k-th nearest other point of the same set."""
    if not 1 <= k < len(feats):
        raise ValueError(f"k must be in 1..{len(feats) - 1} for {len(feats)} points, got {k}")
    # k + 1: each point is its own nearest neighbour, at distance 0.
    rows = [torch.cdist(feats[i : i + chunk], feats).kthvalue(k + 1, dim=1).values for i in range(0, len(feats), chunk)]
    return torch.cat(rows)


def covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """The fraction of ``points`` that lie in at least one ball (centre, radius): the estimate of the
    centres' manifold that improved precision and recall use."""
    inside = [
        (torch.cdist(points[i : i + chunk], centres) <= radii[None, :]).any(1)  # (chunk,)
        for i in range(0, len(points), chunk)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019), k = 3 as in the paper.

    Each set's manifold is the union of balls around its points, of radius the distance to the k-th
    nearest neighbour. Precision: the share of generated points on the real manifold. Recall: the share
    of real points on the generated manifold. Both depend on the set sizes: compare equal-sized sets."""
    r = torch.from_numpy(np.asarray(real, dtype=np.float64))
    f = torch.from_numpy(np.asarray(fake, dtype=np.float64))
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"need two (N, D) feature sets of one D, got {tuple(r.shape)} and {tuple(f.shape)}")
    return covered(f, r, knn_radii(r, k)), covered(r, f, knn_radii(f, k))
