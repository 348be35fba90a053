"""DDPM and DDIM samplers, at full and respaced steps, with the exact predictor of Gaussian data
expressed as eps, x0 or v, give back the data's mean and standard deviation.

Data x0 ~ N(MU, diag(SD^2)). With a_t = sqrt(abar_t), the exact predictors are
  x0*(x_t)  = MU + a_t SD^2 (x_t - a_t MU) / (abar_t SD^2 + 1 - abar_t),
  eps*(x_t) = sqrt(1 - abar_t) (x_t - a_t MU) / (abar_t SD^2 + 1 - abar_t),
  v*        = a_t eps* - sqrt(1 - abar_t) x0*.
Every sampler step is then affine in x_t plus Gaussian noise, so the law of its output is Gaussian
with moments computed exactly below (`exact_moments`, a scalar recursion written from the update
formulas, independent of pipeline.diffusion). The samples must match those moments to within 4.5
standard errors, and the exact moments are within the stated discretisation bias of (MU, SD).
"""
import math

import numpy as np
import pytest
import torch

from pipeline.diffusion import Diffusion, linear_betas, rescale_zero_terminal_snr
from pipeline.diffusion.objectives import Objective

F64 = torch.float64
T = 1000
MU = torch.tensor([0.3, -0.6, 1.2, 0.8], dtype=F64)
SD = torch.tensor([0.5, 0.5, 0.3, 0.8], dtype=F64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py


def oracle(prediction, betas):
    abar = torch.cumprod(1 - betas, 0)  # the original schedule: the model sees original steps

    def model(x, t):  # x: (B, 4) float64, t: (B,) original indices
        ab = abar[t].view(-1, 1)
        den = ab * SD**2 + 1 - ab
        x0 = MU + ab.sqrt() * SD**2 * (x - ab.sqrt() * MU) / den
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * MU) / den
        return {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]

    return model


def exact_moments(abar_kept, sampler, variance):
    """(mean, std) per dim of the sampler's output, x_T ~ N(0, I), over the kept steps' abar."""
    mu, sd = MU.numpy(), SD.numpy()
    ab_all = np.asarray(abar_kept, dtype=np.float64)
    m, v = np.zeros(4), np.ones(4)
    for i in range(len(ab_all) - 1, -1, -1):
        ab = ab_all[i]
        ab_prev = ab_all[i - 1] if i > 0 else 1.0
        k = np.sqrt(ab) * sd**2 / (ab * sd**2 + 1 - ab)  # x0* = k x + c
        c = mu - k * np.sqrt(ab) * mu
        if sampler == "ddpm":
            beta = 1 - ab / ab_prev
            c1, c2 = np.sqrt(ab_prev) * beta / (1 - ab), np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
            A, b = c1 * k + c2, c1 * c
            s2 = 0.0 if i == 0 else (beta if variance == "fixed_large" else beta * (1 - ab_prev) / (1 - ab))
        else:  # DDIM, eta = 0: x' = sqrt(ab_prev) x0* + sqrt(1 - ab_prev) eps*, eps* = (x - sqrt(ab) x0*) / sqrt(1 - ab)
            ke, ce = (1 - np.sqrt(ab) * k) / np.sqrt(1 - ab), -np.sqrt(ab) * c / np.sqrt(1 - ab)
            A, b = np.sqrt(ab_prev) * k + np.sqrt(1 - ab_prev) * ke, np.sqrt(ab_prev) * c + np.sqrt(1 - ab_prev) * ce
            s2 = 0.0
        m, v = A * m + b, A * A * v + s2
    return m, np.sqrt(v)


def run(prediction, sampler, steps, variance="fixed_large", betas=None, n=20_000, seed=0):
    betas = linear_betas(T) if betas is None else betas
    d = Diffusion(betas, Objective(prediction=prediction, variance=variance))
    g = torch.Generator().manual_seed(seed)
    model = oracle(prediction, betas)
    if sampler == "ddpm":
        x = d.p_sample_loop(model, (n, 4), g, steps=steps, dtype=F64)
    else:
        x = d.ddim_sample_loop(model, (n, 4), steps, g, dtype=F64)
    keep = d.ddim_timesteps(steps).numpy()
    return x, exact_moments(d.alphas_cumprod.numpy()[keep], sampler, variance)


def check(x, exact, bias_std):
    n = x.shape[0]
    m, s = exact
    assert bool(torch.isfinite(x).all())
    se_mean, se_std = s / math.sqrt(n), 1 / math.sqrt(2 * n)
    np.testing.assert_array_less(np.abs(x.mean(0).numpy() - m), 4.5 * se_mean)
    np.testing.assert_array_less(np.abs(x.std(0).numpy() / s - 1), 4.5 * se_std)
    # ... and the exact law is the data's, up to the sampler's own discretisation bias
    np.testing.assert_array_less(np.abs(m - MU.numpy()), 0.005)
    np.testing.assert_array_less(np.abs(s / SD.numpy() - 1), bias_std)


# Respaced (50 of 1000 steps): exact propagation gives std bias +1.0..+7.6% for DDPM with
# sigma^2 = beta, -8.5..-16% with beta-tilde, -4.1..-8.5% for DDIM (mean bias <= 0.004): large steps
# with a fixed variance are biased for Gaussian data; the tolerances below are those biases + margin.
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler, variance, bias_std", [
    ("ddpm", "fixed_large", 0.08), ("ddpm", "fixed_small", 0.165), ("ddim", "fixed_large", 0.09)])
def test_respaced_50_steps(prediction, sampler, variance, bias_std):
    x, exact = run(prediction, sampler, 50, variance)
    check(x, exact, bias_std)


# Full T = 1000 steps: std bias +0.04..+0.31% (DDPM, beta), -0.53..-1.25% (DDPM, beta-tilde),
# -0.2..-0.5% (DDIM); 3 x 3 runs of 1000 steps x 20k x 4 float64 values.
@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler, variance, bias_std", [
    ("ddpm", "fixed_large", 0.004), ("ddpm", "fixed_small", 0.013), ("ddim", "fixed_large", 0.006)])
def test_full_steps(prediction, sampler, variance, bias_std):
    x, exact = run(prediction, sampler, T, variance)
    check(x, exact, bias_std)


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_zero_terminal_snr(prediction, sampler):
    """At abar_T = 0 (x_T is pure noise) x0 and v predictions sample as well; biases as above."""
    betas = rescale_zero_terminal_snr(linear_betas(T))
    assert betas[-1].item() == 1.0
    x, exact = run(prediction, sampler, 50, "fixed_large", betas=betas)
    check(x, exact, 0.09)


def test_parameterisations_give_the_same_samples():
    """The same exact predictor in three parameterisations is one sampler: same draws, same samples."""
    xs = [run(p, "ddpm", 50, n=2000, seed=3)[0] for p in ["eps", "x0", "v"]]
    torch.testing.assert_close(xs[1], xs[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(xs[2], xs[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("steps", [T, 50])
def test_learned_range_ends_are_the_fixed_variances(steps):
    """v = +1 is sigma^2 = beta (fixed_large) and v = -1 is beta-tilde (fixed_small), at the respaced
    steps too: the respaced process's own beta and beta-tilde (improved-diffusion's respace.py)."""
    betas = linear_betas(T)
    eps = oracle("eps", betas)
    for v, fixed in [(1.0, "fixed_large"), (-1.0, "fixed_small")]:
        learned = lambda x, t: torch.cat([eps(x, t), torch.full_like(x, v)], dim=1)  # noqa: E731
        d_l = Diffusion(betas, Objective(variance="learned_range", loss="hybrid"))
        d_f = Diffusion(betas, Objective(variance=fixed))
        a = d_l.p_sample_loop(learned, (500, 4), torch.Generator().manual_seed(4), steps=steps, dtype=F64)
        b = d_f.p_sample_loop(eps, (500, 4), torch.Generator().manual_seed(4), steps=steps, dtype=F64)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_respaced_process_keeps_the_marginals():
    d = Diffusion(linear_betas(T))
    keep = d.ddim_timesteps(50)
    sub = d.respaced(keep)
    assert sub.num_timesteps == len(keep) == 50 and torch.equal(sub.timestep_map, keep)
    torch.testing.assert_close(sub.alphas_cumprod, d.alphas_cumprod[keep], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="learns its variance"):
        Diffusion(linear_betas(T), Objective(variance="learned_range", loss="hybrid")).p_sample_loop(
            lambda x, t: x, (1, 1), variance="beta")
