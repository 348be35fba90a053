"""pipeline.vlb (the bound in bits/dim) against closed forms, an independent float64 computation in
numpy, and improved-diffusion's formulas transcribed below (with their source), on the same inputs."""
import math

import numpy as np
import pytest
import torch

from pipeline.diffusion import Diffusion, linear_betas
from pipeline.diffusion.objectives import Objective
from pipeline.diffusion.vlb import (bpd_terms, discretized_gaussian_log_likelihood, normal_kl, prior_bpd,
                          vb_term_bpd)

F64 = torch.float64
T = 20  # a short schedule keeps the per-t loops fast; the linear schedule's ends as in the paper


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py


def make_diffusion(T=T):
    return Diffusion(linear_betas(T, 1e-4, 0.2))


def images(B=3, C=2, H=4, W=4, seed=0):
    """uint8-valued images in [-1, 1], including both edge bins."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, (B, C, H, W), generator=g)
    k[0, 0, 0, 0], k[0, 0, 0, 1] = 0, 255
    return (k.to(F64) / 127.5 - 1.0)


def noise_fn(seed=1):
    def fn(t, shape):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + t), dtype=F64)
    return fn


class ToyModel:
    """A fixed, smooth, non-trivial function of (x_t, t); 2C channels when the variance is learned."""

    def __init__(self, learned: bool):
        self.learned = learned

    def __call__(self, x, t):
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1) / T
        pred = 0.7 * x + 0.2 * torch.sin(3 * x) - 0.1 * tt
        if not self.learned:
            return pred
        return torch.cat([pred, torch.tanh(0.5 * x + tt - 0.3)], dim=1)


# ----------------------------------------------------------------------------- closed forms


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    """The bins tile the line (x_k + 1/255 = x_{k+1} - 1/255), so the 256 probabilities sum to 1."""
    x = (torch.arange(256, dtype=F64) / 127.5 - 1.0)
    for mean, log_scale in [(0.0, math.log(0.1)), (0.9, math.log(0.02)), (-0.3, math.log(0.5))]:
        lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_close_to_exact_gaussian_integral():
    """The tanh approximation of Phi is within ~2e-4 of the exact normal CDF (scipy), so the bin
    probabilities agree with the exact integral to that order."""
    from scipy.stats import norm

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (400,), generator=g).to(F64) / 127.5 - 1.0
    mean = (x + 0.05 * torch.randn(400, generator=g, dtype=F64)).clamp(-1.2, 1.2)
    log_scale = torch.full_like(x, math.log(0.03))
    lp = discretized_gaussian_log_likelihood(x, mean, log_scale).exp().numpy()
    xn, mn, s = x.numpy(), mean.numpy(), 0.03
    hi = np.where(xn > 0.999, 1.0, norm.cdf((xn + 1 / 255 - mn) / s))
    lo = np.where(xn < -0.999, 0.0, norm.cdf((xn - 1 / 255 - mn) / s))
    np.testing.assert_allclose(lp, hi - lo, atol=5e-4)


def test_prior_closed_form():
    d, x0 = make_diffusion(), images()
    abar = d.alphas_cumprod[-1].item()
    ref = 0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * x0**2)
    torch.testing.assert_close(prior_bpd(d, x0), ref.mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_exact_noise_oracle_gives_closed_form_kl(variance):
    """A model that returns the very noise q_sample used has mean = the true posterior mean, so for
    t > 0 the KL is that of two Gaussians with equal means: 0 for fixed_small (same variance),
    0.5 (-1 + log(beta/bt) + bt/beta) / ln 2 per dim for fixed_large."""
    d, x0, nf = make_diffusion(), images(), noise_fn()
    oracle = lambda x_t, t: nf(int(t[0]), tuple(x_t.shape))  # noqa: E731
    out = bpd_terms(oracle, d, Objective(variance=variance), x0, noise_fn=nf, clip_denoised=False)
    kl = out.terms[:, 1:]
    if variance == "fixed_small":
        assert kl.abs().max().item() < 1e-12
    else:
        beta, bt = d.betas[1:], d.posterior_variance[1:]
        ref = 0.5 * (-1 + torch.log(beta / bt) + bt / beta) / math.log(2)
        torch.testing.assert_close(kl, ref.expand_as(kl), rtol=1e-10, atol=1e-13)
    assert out.terms.shape == (3, T) and out.prior.shape == (3,)
    torch.testing.assert_close(out.total, out.prior + out.terms.sum(1), rtol=0, atol=0)


# ----------------------------------------------------------------------------- independent float64


def numpy_bpd(model, betas, x0, nf, variance, clip, prediction="eps"):
    """The bound from the DDPM formulas, written again in numpy from the betas (no Diffusion class)."""
    betas = betas.numpy()
    Tn = len(betas)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    bt = betas * (1 - abar_prev) / (1 - abar)  # beta-tilde
    bt_log = np.log(np.concatenate([[bt[1]], bt[1:]]))
    x = x0.numpy()

    def cdf(v):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    def kl(m1, lv1, m2, lv2):
        return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 / np.exp(lv2))

    terms = np.zeros((x.shape[0], Tn))
    for t in range(Tn - 1, -1, -1):
        eps = nf(t, tuple(x.shape)).numpy()
        xt = np.sqrt(abar[t]) * x + np.sqrt(1 - abar[t]) * eps
        out = model(torch.from_numpy(xt), torch.full((x.shape[0],), t, dtype=torch.int64)).numpy()
        C = x.shape[1]
        pred = out[:, :C]
        if prediction == "eps":
            x0_hat = (xt - np.sqrt(1 - abar[t]) * pred) / np.sqrt(abar[t])
        elif prediction == "x0":
            x0_hat = pred
        else:
            x0_hat = np.sqrt(abar[t]) * xt - np.sqrt(1 - abar[t]) * pred
        if clip:
            x0_hat = np.clip(x0_hat, -1, 1)
        c1 = np.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t])
        c2 = np.sqrt(alphas[t]) * (1 - abar_prev[t]) / (1 - abar[t])
        mean = c1 * x0_hat + c2 * xt
        if variance == "fixed_small":
            lv = np.full_like(x, bt_log[t])
        elif variance == "fixed_large":
            lv = np.full_like(x, np.log(bt[1] if t == 0 else betas[t]))
        else:
            f = (out[:, C:] + 1) / 2
            lv = f * np.log(betas[t]) + (1 - f) * bt_log[t]
        if t == 0:
            s = np.exp(-0.5 * lv)
            hi = np.where(x > 0.999, 1.0, cdf(s * (x - mean + 1 / 255)))
            lo = np.where(x < -0.999, 0.0, cdf(s * (x - mean - 1 / 255)))
            term = -np.log(np.maximum(hi - lo, 1e-12))
        else:
            true_mean = c1 * x + c2 * xt
            term = kl(true_mean, bt_log[t], mean, lv)
        terms[:, t] = term.reshape(x.shape[0], -1).mean(1) / np.log(2)
    prior = kl(np.sqrt(abar[-1]) * x, np.log(1 - abar[-1]), 0.0, 0.0).reshape(x.shape[0], -1).mean(1) / np.log(2)
    return prior, terms


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", [False, True])
def test_bpd_terms_match_independent_numpy(variance, prediction, clip):
    d, x0, nf = make_diffusion(), images(), noise_fn()
    model = ToyModel(variance == "learned_range")
    out = bpd_terms(model, d, Objective(prediction=prediction, variance=variance, loss="vlb"), x0,
                    noise_fn=nf, clip_denoised=clip)
    prior, terms = numpy_bpd(model, d.betas, x0, nf, variance, clip, prediction)
    np.testing.assert_allclose(out.prior.numpy(), prior, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.terms.numpy(), terms, rtol=1e-9, atol=1e-11)
    assert bool(torch.isfinite(out.total).all())


# ----------------------------------------------------------------------------- improved-diffusion


# Transcribed from openai/improved-diffusion (commit 1bc7bbb), improved_diffusion/losses.py
# `discretized_gaussian_log_likelihood` and gaussian_diffusion.py `_vb_terms_bpd` / `p_mean_variance`
# (LEARNED_RANGE branch, EPSILON mean type), with numpy arrays in place of its class attributes.
def iddpm_discretized_gaussian_log_likelihood(x, *, means, log_scales):
    def approx_standard_normal_cdf(x):
        return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def iddpm_vb_terms_bpd(betas, model_output, x_start, x_t, t, clip_denoised):
    betas = betas.numpy()
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
    sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
    sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1)

    def ex(arr):  # _extract_into_tensor, kept in float64 here
        return torch.from_numpy(arr)[t].reshape(-1, 1, 1, 1)

    true_mean = ex(posterior_mean_coef1) * x_start + ex(posterior_mean_coef2) * x_t
    true_log_variance_clipped = ex(posterior_log_variance_clipped)
    C = x_t.shape[1]
    model_output, model_var_values = torch.split(model_output, C, dim=1)
    min_log = ex(posterior_log_variance_clipped)
    max_log = ex(np.log(betas))
    frac = (model_var_values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    pred_xstart = ex(sqrt_recip_alphas_cumprod) * x_t - ex(sqrt_recipm1_alphas_cumprod) * model_output
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    model_mean = ex(posterior_mean_coef1) * pred_xstart + ex(posterior_mean_coef2) * x_t
    kl = 0.5 * (-1.0 + model_log_variance - true_log_variance_clipped
                + torch.exp(true_log_variance_clipped - model_log_variance)
                + ((true_mean - model_mean) ** 2) * torch.exp(-model_log_variance))
    kl = kl.mean(dim=(1, 2, 3)) / np.log(2.0)
    decoder_nll = -iddpm_discretized_gaussian_log_likelihood(
        x_start, means=model_mean, log_scales=0.5 * model_log_variance)
    decoder_nll = decoder_nll.mean(dim=(1, 2, 3)) / np.log(2.0)
    return torch.where((t == 0), decoder_nll, kl)


@pytest.mark.parametrize("clip", [False, True])
def test_vb_terms_match_improved_diffusion(clip):
    d, x0, nf = make_diffusion(), images(B=4), noise_fn(seed=5)
    model = ToyModel(learned=True)
    obj = Objective(variance="learned_range", loss="hybrid")
    for t_val in [0, 1, 7, T - 1]:
        t = torch.full((4,), t_val, dtype=torch.int64)
        t[1] = (t_val + 3) % T  # a batch with mixed timesteps
        x_t = d.q_sample(x0, t, nf(t_val, tuple(x0.shape)))
        out = model(x_t, t)
        p = obj.p_mean_variance(d, out, x_t, t, clip_denoised=clip)
        ours = vb_term_bpd(d, x0, x_t, t, p.mean, p.log_variance)
        ref = iddpm_vb_terms_bpd(d.betas, out, x0, x_t, t, clip)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_discretized_likelihood_matches_improved_diffusion():
    g = torch.Generator().manual_seed(9)
    x = images(B=2, C=3, H=8, W=8, seed=9)
    means = x + 0.1 * torch.randn(x.shape, generator=g, dtype=F64)
    log_scales = -3 + torch.rand(x.shape, generator=g, dtype=F64)
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, means, log_scales),
                               iddpm_discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales),
                               rtol=0, atol=0)


def test_noise_fn_keys_the_noise():
    """Each term uses noise_fn(t, shape): the same image gives the same terms in any batch."""
    d = make_diffusion()
    x0 = images(B=4)
    per_sample = lambda t, shape: torch.stack([  # noqa: E731
        torch.randn(shape[1:], generator=torch.Generator().manual_seed(1000 * i + t), dtype=F64)
        for i in range(shape[0])])
    model, obj = ToyModel(False), Objective()
    full = bpd_terms(model, d, obj, x0, noise_fn=per_sample)
    first = bpd_terms(model, d, obj, x0[:2], noise_fn=per_sample)
    torch.testing.assert_close(first.terms, full.terms[:2], rtol=0, atol=0)


def test_objective_none_means_the_diffusions_own():
    obj = Objective(prediction="v", variance="learned_range", loss="hybrid")
    d = Diffusion(linear_betas(T, 1e-4, 0.2), obj)
    x0, nf, model = images(B=2), noise_fn(), ToyModel(learned=True)
    a = bpd_terms(model, d, None, x0, noise_fn=nf)
    b = bpd_terms(model, d, obj, x0, noise_fn=nf)
    assert torch.equal(a.total, b.total)


# ----------------------------------------------------------------------------- the bound is tight


def test_exact_reverse_process_on_gaussian_data_gives_the_datas_discretised_nll():
    """For data x_0 ~ N(mu, s^2) (discretised to the 256 bins), every x_{t-1}, x_t is jointly Gaussian,
    so the true reverse step q(x_{t-1} | x_t) is Gaussian: mean from E[eps | x_t], variance
    v_{t-1} beta_t / v_t with v_t = abar_t s^2 + 1 - abar_t (between beta-tilde, s = 0, and beta, s = 1).
    A learned-range model that outputs exactly these makes p = q, and the bound is tight: its total
    bits/dim equals the data's own discretised NLL, -log2 P(bin) averaged over the same pixels.
    With a fixed variance the same mean gives a looser bound, above that NLL."""
    from scipy.stats import norm

    mu, s, n_t = 0.1, 0.25, 200
    d = Diffusion(linear_betas(n_t, 5e-4, 0.1))
    g = torch.Generator().manual_seed(0)
    k = ((mu + s * torch.randn(32, 1, 32, 32, generator=g, dtype=F64) + 1) * 127.5).round().clamp(0, 255)
    x0 = k / 127.5 - 1.0
    bins = np.arange(256) / 127.5 - 1.0
    hi = np.where(bins > 0.999, 1.0, norm.cdf((bins + 1 / 255 - mu) / s))
    lo = np.where(bins < -0.999, 0.0, norm.cdf((bins - 1 / 255 - mu) / s))
    nll = -np.log2((hi - lo)[k.long().numpy()]).reshape(32, -1).mean(1)  # per image, bits/dim

    abar, betas = d.alphas_cumprod.to(F64), d.betas.to(F64)
    var_t = abar * s**2 + 1 - abar
    var_prev = torch.cat([torch.tensor([s**2], dtype=F64), var_t[:-1]])
    lo_log, hi_log = d.posterior_log_variance_clipped.to(F64), torch.log(betas)
    frac = (torch.log(var_prev * betas / var_t) - lo_log) / (hi_log - lo_log)

    def eps_oracle(x_t, t):  # E[eps | x_t]
        a = abar[t].reshape(-1, 1, 1, 1)
        return torch.sqrt(1 - a) * (x_t - torch.sqrt(a) * mu) / (a * s**2 + 1 - a)

    def exact(x_t, t):
        eps = eps_oracle(x_t, t)
        return torch.cat([eps, (2 * frac[t] - 1).reshape(-1, 1, 1, 1).expand_as(eps)], dim=1)

    nf = noise_fn(seed=7)
    tight = bpd_terms(exact, d, Objective(variance="learned_range", loss="hybrid"), x0, noise_fn=nf,
                      clip_denoised=False).total.numpy()
    gap = tight - nll
    std_err = gap.std(ddof=1) / np.sqrt(len(gap))
    assert abs(gap.mean()) < 0.02 and abs(gap.mean()) < 4 * std_err + 1e-3, (tight.mean(), nll.mean(), std_err)
    loose = bpd_terms(eps_oracle, d, Objective(variance="fixed_large"), x0, noise_fn=nf,
                      clip_denoised=False).total.numpy()
    assert (loose - nll).mean() > 10 * std_err, (loose.mean(), nll.mean())
