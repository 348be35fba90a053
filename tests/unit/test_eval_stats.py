"""FID and KID statistics against closed forms and independent float64 computations."""
import numpy as np
import pytest

from pipeline.eval import stats


def _features(seed, n=300, d=32, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(123).normal(size=(d, d)) / np.sqrt(d)  # correlated, one distribution
    return (rng.normal(size=(n, d)) @ mix * scale + shift).astype(np.float32)


def test_fid_of_a_set_against_itself_is_zero():
    f = _features(0)
    s = stats.feature_stats(f)
    assert abs(stats.fid(s, s)) < 1e-6


def test_fid_of_singular_covariances_against_itself_is_zero():
    # Fewer rows than dimensions, as with a small evaluation set of 2048-d features: sqrtm of the
    # singular S^2 leaves about sqrt(machine eps) per null direction, so zero relative to Tr(S).
    f = _features(1, n=20, d=64)
    s = stats.feature_stats(f)
    assert abs(stats.fid(s, s)) < 1e-6 * np.trace(s.sigma)


def test_fid_matches_closed_form_for_diagonal_gaussians():
    # For diagonal covariances sqrtm is elementwise: FID = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 3, size=16), rng.uniform(0.1, 3, size=16)
    a = stats.FeatureStats(mu1, np.diag(v1), 100)
    b = stats.FeatureStats(mu2, np.diag(v2), 100)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert stats.fid(a, b) == pytest.approx(expected, rel=1e-10)


def test_fid_matches_independent_eigendecomposition():
    # Tr sqrtm(S1 S2) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix:
    # computed with eigh only, no scipy.linalg.sqrtm.
    fa, fb = _features(3), _features(4, shift=0.3, scale=1.2)
    mu_a, mu_b = fa.astype(np.float64).mean(0), fb.astype(np.float64).mean(0)
    ca = np.cov(fa.astype(np.float64), rowvar=False)
    cb = np.cov(fb.astype(np.float64), rowvar=False)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ cb @ root_a)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    got = stats.fid(stats.feature_stats(fa), stats.feature_stats(fb))
    assert got == pytest.approx(expected, rel=1e-8)
    assert got > 0.1  # the sets differ: the test would notice a FID stuck at 0


def _mmd2_by_loops(x, y):
    """Unbiased MMD^2 written out term by term (Gretton et al. 2012, eq. 3) with k = (x.y/d + 1)^3."""
    m, d = x.shape
    k = lambda u, v: (float(np.dot(u, v)) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_term_by_term_computation_on_the_same_subsets():
    fa = _features(5, n=40, d=8).astype(np.float64)
    fb = _features(6, n=30, d=8, shift=0.5).astype(np.float64)
    mean, std, m = stats.kid(fa, fb, subsets=5, subset_size=12, seed=7)
    assert m == 12
    rng = np.random.RandomState(7)  # torch-fidelity's draw: first set's subset, then the second's
    mmds = []
    for _ in range(5):
        ia = rng.choice(len(fa), 12, replace=False)
        ib = rng.choice(len(fb), 12, replace=False)
        mmds.append(_mmd2_by_loops(fa[ia], fb[ib]))
    assert mean == pytest.approx(np.mean(mmds), rel=1e-10)
    assert std == pytest.approx(np.std(mmds), rel=1e-10)
    assert mean > 0


def test_kid_subset_size_is_capped_by_the_smaller_set():
    fa, fb = _features(8, n=25, d=8), _features(9, n=30, d=8)
    _, _, m = stats.kid(fa, fb, subsets=2)
    assert m == 25


def test_kid_is_unbiased_for_one_distribution():
    # Independent pairs of sets from one distribution: the unbiased estimate averages to 0 within
    # its standard error, while the biased V-statistic (diagonals kept) stays clearly above 0, so
    # the check can tell the two apart.
    unbiased, biased = [], []
    for s in range(40):
        x, y = _features(1000 + 2 * s, n=50, d=8), _features(1001 + 2 * s, n=50, d=8)
        unbiased.append(stats.kid(x, y, subsets=1)[0])
        xd, yd = x.astype(np.float64), y.astype(np.float64)
        k = lambda u, v: (u @ v.T / 8 + 1.0) ** 3
        biased.append(k(xd, xd).mean() + k(yd, yd).mean() - 2 * k(xd, yd).mean())
    stderr = np.std(unbiased, ddof=1) / np.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * stderr
    assert np.mean(biased) > 3 * stderr + abs(np.mean(unbiased))
