"""How far a 2-D point cloud is from being reducible ("Not All Language Model Features Are
Linear"): the epsilon-mixture index (is it a mixture of a lower-dimensional piece and the rest?),
the separability index (can a rotation make its two coordinates independent?), and the PCA of a
cluster's reconstructions that both are computed on. Pure array math: no model here."""

from __future__ import annotations

import numpy as np
import torch


def cluster_pca(F: np.ndarray, W: np.ndarray, n_components: int = 5):
    """PCA of the reconstructions x_hat = F @ W (no bias), done in the rank-c span of W.

    F (n, c) are the cluster latents' activations, W (c, d) their decoder rows. With W^T = Q R
    (Q orthonormal), F @ W = (F @ R^T) @ Q^T, so F @ R^T (n, min(c, d)) has the same PC scores
    and explained variances as the (n, d) reconstructions without ever forming them.
    Returns (scores (n, k), explained variance ratio (k,), transform) where transform maps
    another (m, c) activation matrix to its (m, k) scores on the same PCs."""
    from sklearn.decomposition import PCA

    _, R = np.linalg.qr(W.astype(np.float64).T)  # (m, c)
    Y = F.astype(np.float64) @ R.T  # (n, m)
    k = int(min(n_components, Y.shape[1], len(Y)))
    pca = PCA(n_components=k, svd_solver="full").fit(Y)
    scores = pca.transform(Y)  # (n, k)
    ratio = pca.explained_variance_ratio_ if pca.explained_variance_.sum() > 0 else np.zeros(k)
    return scores, np.asarray(ratio), lambda G: pca.transform(G.astype(np.float64) @ R.T)


def standardise(x: np.ndarray) -> np.ndarray:
    """(n, 2) centred and scaled so the mean squared radius is 2 (unit RMS per coordinate)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    rms = np.sqrt((x**2).sum(1).mean() / 2)
    return x / rms if rms > 0 else x


def mixture_fraction(x: np.ndarray, a: np.ndarray, b: float, epsilon: float = 0.1) -> float:
    """P(|z| < epsilon) for z = (a.x + b) / sqrt(mean((a.x + b)^2)): the hard fraction."""
    y = x @ a + b
    z = y / np.sqrt(max((y**2).mean(), 1e-24))
    return float((np.abs(z) < epsilon).mean())


def mixture_index(
    x: np.ndarray,
    epsilon: float = 0.1,
    steps: int = 150,
    restarts: int = 8,
    lr: float = 0.1,
    seed: int = 0,
) -> float:
    """The epsilon-mixture index M_eps = max over (a, b) of P(|z| < eps), z as in mixture_fraction.

    As the paper does, gradient ascent (Adam, lr 0.1) on the soft count mean(sigmoid((eps -
    |z|) / T)); here T anneals geometrically from 1 to 0.01 (the paper's demo anneals it, its
    cluster script keeps T = 1 for 10000 steps) over `steps` steps from `restarts` seeded
    starts, all run at once. a is a unit vector (z is invariant to scaling a and b together).
    The best hard fraction seen at any step of any start is returned: each is a valid (a, b)."""
    x = torch.from_numpy(standardise(x))  # (n, 2)
    g = torch.Generator().manual_seed(int(seed))
    phi = (torch.rand(restarts, generator=g, dtype=torch.float64) * torch.pi).requires_grad_()
    b = (torch.rand(restarts, generator=g, dtype=torch.float64) * 4 - 2).requires_grad_()
    opt = torch.optim.Adam([phi, b], lr=lr)
    temps = np.geomspace(1.0, 0.01, steps)
    best = 0.0
    for T in temps:
        a = torch.stack([phi.cos(), phi.sin()], 1)  # (R, 2)
        y = a @ x.T + b[:, None]  # (R, n)
        z = y / (y.pow(2).mean(1, keepdim=True) + 1e-24).sqrt()
        best = max(best, float((z.detach().abs() < epsilon).double().mean(1).max()))
        soft = torch.sigmoid((epsilon - z.abs()) / T).mean(1)  # (R,)
        opt.zero_grad()
        (-soft.sum()).backward()
        opt.step()
    return best


def mutual_information(u: np.ndarray, v: np.ndarray, bins: int, limit: float) -> float:
    """MI (nats) of two coordinates from their 2-D histogram on [-limit, limit]^2."""
    p, _, _ = np.histogram2d(u, v, bins=bins, range=[[-limit, limit], [-limit, limit]])
    p /= p.sum()
    pu, pv = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    on = p > 0
    return float((p[on] * np.log(p[on] / (pu @ pv)[on])).sum())


def separability_index(
    x: np.ndarray, bins: int = 10, angles: int = 100, radius: float = 3.0
) -> float:
    """S = min over rotations of the mutual information of the two rotated coordinates.

    The paper's cluster-script settings: a 10 x 10 histogram and 100 angles. The angles here
    span [0, pi/2), which gives every rotation's MI (a quarter turn only swaps and negates the
    coordinates). The points are standardised and those beyond `radius` RMS dropped (the
    script's radius trimming; the demo's [-3, 3] box), and the histogram spans the largest kept
    radius, the same square at every angle."""
    x = standardise(x)
    x = x[np.sqrt((x**2).sum(1)) <= radius]
    if len(x) < 2:
        return float("nan")
    limit = float(np.sqrt((x**2).sum(1)).max()) or 1.0
    best = np.inf
    for theta in np.arange(angles) * (np.pi / 2) / angles:
        c, s = np.cos(theta), np.sin(theta)
        u, v = c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]
        best = min(best, mutual_information(u, v, bins, limit))
    return float(best)


def irreducibility(mixture: float, separability: float) -> float:
    """One ranking score, high for a truly 2-D feature: S * (1 - M)."""
    return float(separability * (1.0 - mixture))
