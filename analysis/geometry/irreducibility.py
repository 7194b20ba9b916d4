"""How far a 2-D point cloud is from being reducible ("Not All Language Model Features Are
Linear"): the epsilon-mixture index (is it a mixture of a lower-dimensional piece and the rest?),
the separability index (can a rotation make its two coordinates independent?), and the PCA of a
cluster's reconstructions that both are computed on. Pure array math: no model here."""

from __future__ import annotations

import numpy as np
from scipy.special import expit


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
    starts, all run at once. a = (cos phi, sin phi) is a unit vector (z is invariant to scaling
    a and b together). The gradient is written out (numpy, no autograd). The best hard fraction
    seen at any step of any start is returned: each is a valid (a, b)."""
    x = standardise(x)  # (n, 2)
    n = len(x)
    rng = np.random.default_rng(seed)
    params = np.stack([rng.uniform(0, np.pi, restarts), rng.uniform(-2, 2, restarts)])  # (2, R)
    m, v = np.zeros_like(params), np.zeros_like(params)
    best = 0.0
    for t, T in enumerate(np.geomspace(1.0, 0.01, steps), 1):
        phi, b = params
        a, da = np.stack([np.cos(phi), np.sin(phi)]), np.stack([-np.sin(phi), np.cos(phi)])
        y = a.T @ x.T + b[:, None]  # (R, n)
        r = np.sqrt((y**2).mean(1, keepdims=True) + 1e-24)  # (R, 1)
        z = y / r
        best = max(best, float((np.abs(z) < epsilon).mean(1).max()))
        soft = expit((epsilon - np.abs(z)) / T)
        g = -soft * (1 - soft) / T * np.sign(z)  # (R, n) d soft / d z
        # d mean(soft) / d y_j = (g_j / r - y_j sum_i(g_i y_i) / (n r^3)) / n
        dy = (g / r - y * (g * y).sum(1, keepdims=True) / (n * r**3)) / n
        grad = np.stack([(dy * (da.T @ x.T)).sum(1), dy.sum(1)])  # (2, R)
        m = 0.9 * m + 0.1 * grad  # Adam ascent, betas (0.9, 0.999)
        v = 0.999 * v + 0.001 * grad**2
        params = params + lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return best


def mutual_information(u: np.ndarray, v: np.ndarray, bins: int, limit: float) -> np.ndarray:
    """(A,) MI (nats) of each row pair of u, v (A, n) from its 2-D histogram on [-limit, limit]^2
    (bins as numpy.histogram2d's: equal widths, the top edge closed)."""
    A = len(u)
    iu, iv = (
        np.clip(((w + limit) / (2 * limit) * bins).astype(np.int64), 0, bins - 1) for w in (u, v)
    )
    key = (np.arange(A)[:, None] * bins + iu) * bins + iv  # (A, n)
    p = np.bincount(key.ravel(), minlength=A * bins * bins).reshape(A, bins, bins).astype(float)
    p /= p.sum((1, 2), keepdims=True)
    outer = p.sum(2)[:, :, None] * p.sum(1)[:, None, :]  # (A, bins, bins) p_u p_v
    on = p > 0
    terms = np.zeros_like(p)
    terms[on] = p[on] * np.log(p[on] / outer[on])
    return terms.sum((1, 2))


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
    theta = np.arange(angles)[:, None] * (np.pi / 2) / angles  # (A, 1)
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]  # (A, n) each
    return float(mutual_information(u, v, bins, limit).min())


def irreducibility(mixture: float, separability: float) -> float:
    """One ranking score, high for a truly 2-D feature: S * (1 - M)."""
    return float(separability * (1.0 - mixture))
