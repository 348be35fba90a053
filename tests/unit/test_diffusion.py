"""pipeline.diffusion against closed forms, in float64.

Statistical checks use fixed seeds (so they are deterministic) and tolerances of
4 standard errors plus, for the samplers, the discretisation bias of the sampler
itself (worked out by propagating the Gaussian moments exactly through each
sampler's linear update; numbers quoted where used).
"""

import math

import pytest
import torch

from pipeline.diffusion import (
    Diffusion,
    VarianceType,
    cosine_betas,
    linear_betas,
    make_betas,
)

F64 = torch.float64
T = 1000


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def diff():
    return Diffusion(linear_betas(T))


def abar_ref(betas):
    """abar_t = prod_{s<=t} (1 - beta_s), computed here in plain Python."""
    out, p = [], 1.0
    for b in betas.tolist():
        p *= 1.0 - b
        out.append(p)
    return torch.tensor(out, dtype=F64)


# ----------------------------------------------------------------------------- schedules


def test_linear_betas():
    b = linear_betas(T)
    assert b.dtype == F64 and b.shape == (T,)
    assert b[0].item() == 1e-4 and b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert bool((b[1:] > b[:-1]).all())
    assert torch.equal(make_betas("linear", T, 1e-4, 0.02), b)
    assert torch.equal(linear_betas(10, 1e-3, 0.05), torch.linspace(1e-3, 0.05, 10, dtype=F64))


def test_cosine_betas():
    b = cosine_betas(T)
    assert b.dtype == F64 and b.shape == (T,)
    assert bool((b > 0).all()) and bool((b <= 0.999).all())
    assert b[-1].item() == 0.999  # abar(T) = cos^2(pi/2) ~ 0 -> clipped
    abar = torch.cumprod(1 - b, 0)
    assert bool((abar[1:] < abar[:-1]).all())
    # Unclipped entries follow abar(t) = f(t)/f(0), f(u) = cos^2((u/T + s)/(1+s) pi/2).
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    ref = torch.tensor([fi / f[0] for fi in f[1:]], dtype=F64)
    torch.testing.assert_close(abar[:900], ref[:900], rtol=1e-12, atol=0)
    assert torch.equal(make_betas("cosine", T), b)


def test_make_betas_rejects_unknown():
    with pytest.raises(ValueError, match=r"unknown beta schedule 'quadratic'.*'linear', 'cosine'"):
        make_betas("quadratic", T)


def test_schedule_tensors(diff):
    b = linear_betas(T)
    ab = abar_ref(b)
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    for name in vars(diff):
        v = getattr(diff, name)
        if isinstance(v, torch.Tensor):
            assert v.dtype == F64 and v.shape == (T,), name
    assert diff.num_timesteps == T
    torch.testing.assert_close(diff.alphas_cumprod, ab, rtol=1e-13, atol=0)
    torch.testing.assert_close(diff.alphas_cumprod_prev, ab_prev, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        diff.posterior_variance, (1 - ab_prev) / (1 - ab) * b, rtol=1e-12, atol=0
    )
    assert diff.posterior_variance[0].item() == 0.0
    assert bool(torch.isfinite(diff.posterior_log_variance_clipped).all())


def test_extract_shape_and_dtype(diff):
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    t = torch.tensor([0, 5, 999])
    out = diff._extract(diff.betas, t, x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), diff.betas[t].float())


def test_to_moves_every_tensor(diff):
    moved = diff.to("meta")
    assert moved.num_timesteps == T and moved.device.type == "meta"
    for name, v in vars(moved).items():
        if isinstance(v, torch.Tensor):
            assert v.device.type == "meta" and v.dtype == F64, name
    assert diff.betas.device.type == "cpu"  # original untouched
    assert diff.to("cpu") is diff
    with pytest.raises(ValueError, match="Diffusion.to"):
        diff._extract(moved.betas, torch.tensor([1]), torch.zeros(1))


# ----------------------------------------------------------------------------- q(x_t | x_0)


def test_q_sample_equals_formula(diff):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 250, 998, 999])
    ab = abar_ref(linear_betas(T))[t].view(-1, 1, 1, 1)
    expected = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    torch.testing.assert_close(diff.q_sample(x0, t, noise), expected, rtol=1e-14, atol=1e-15)
    # predict_x0 inverts it.
    torch.testing.assert_close(diff.predict_x0(expected, t, noise), x0, rtol=0, atol=1e-11)
    # float32 data stays float32.
    assert diff.q_sample(x0.float(), t, noise.float()).dtype == torch.float32


def test_q_sample_moments(diff):
    # N samples of x_t for a fixed x0: mean and variance within 4 standard errors:
    # se(mean) = sqrt(1-abar)/sqrt(N), se(var) = (1-abar) sqrt(2/(N-1)); N=200k -> 0.9% of var.
    n = 200_000
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([0.3, -0.6, 1.2, 0.8], dtype=F64)
    ab = abar_ref(linear_betas(T))
    for ti in (0, 100, 500, 999):
        t = torch.full((n,), ti)
        xt = diff.q_sample(x0.expand(n, 4), t, torch.randn(n, 4, generator=g, dtype=F64))
        var = 1 - ab[ti]
        torch.testing.assert_close(
            xt.mean(0), ab[ti].sqrt() * x0, rtol=0, atol=4 * math.sqrt(var / n)
        )
        torch.testing.assert_close(
            xt.var(0), var.expand(4), rtol=4 * math.sqrt(2 / (n - 1)), atol=0
        )


# ----------------------------------------------------------------------------- posterior


def test_posterior_matches_design_closed_form(diff):
    b = linear_betas(T)
    ab = abar_ref(b)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    xt = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 500, 999])
    mean, var = diff.posterior(x0, xt, t)
    assert var.shape == (4, 1, 1, 1)
    for i, ti in enumerate(t.tolist()):
        a_t, beta = 1 - b[ti].item(), b[ti].item()
        abar, abar_prev = ab[ti].item(), (ab[ti - 1].item() if ti > 0 else 1.0)
        c1 = math.sqrt(abar_prev) * beta / (1 - abar)
        c2 = math.sqrt(a_t) * (1 - abar_prev) / (1 - abar)
        torch.testing.assert_close(mean[i], c1 * x0[i] + c2 * xt[i], rtol=1e-12, atol=1e-14)
        assert var[i].item() == pytest.approx((1 - abar_prev) / (1 - abar) * beta, rel=1e-12, abs=0)
    # t=0 (the first noising step): the posterior is a point mass at x0.
    # (1e-12: 1 - (1 - beta_1) is beta_1 only to ~1e-13 relative.)
    torch.testing.assert_close(mean[0], x0[0], rtol=0, atol=1e-12)


def test_posterior_is_bayes(diff):
    # q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), a product of Gaussians in x_{t-1}:
    # likelihood N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) has precision alpha_t/beta_t in x_{t-1},
    # prior N(sqrt(abar_{t-1}) x_0, 1-abar_{t-1}); precisions add, means weight by precision.
    b = linear_betas(T)
    ab = abar_ref(b)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    x0 = torch.randn(len(t), 5, generator=g, dtype=F64)
    xt = torch.randn(len(t), 5, generator=g, dtype=F64)
    alpha, beta, abar_prev = (1 - b[t]).view(-1, 1), b[t].view(-1, 1), ab[t - 1].view(-1, 1)
    precision = alpha / beta + 1 / (1 - abar_prev)
    var_bayes = 1 / precision
    mean_bayes = var_bayes * (alpha.sqrt() / beta * xt + abar_prev.sqrt() / (1 - abar_prev) * x0)
    mean, var = diff.posterior(x0, xt, t)
    torch.testing.assert_close(mean, mean_bayes, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, var_bayes, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- loss


def test_sample_timesteps_uniform(diff):
    g = torch.Generator().manual_seed(4)
    t = Diffusion(linear_betas(10)).sample_timesteps(100_000, "cpu", g)
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == 9
    counts = torch.bincount(t, minlength=10).double()
    # Each count ~ Binomial(1e5, 0.1): sd = 94.9; allow 4 sd.
    assert bool(((counts - 10_000).abs() < 4 * 94.9).all())
    t2 = diff.sample_timesteps(8, "cpu", torch.Generator().manual_seed(4))
    assert torch.equal(t2, diff.sample_timesteps(8, "cpu", torch.Generator().manual_seed(4)))


def test_loss_oracle_is_zero(diff):
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    noise = torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 3, 100, 500, 900, 999])
    assert diff.loss(lambda x, tt: noise, x0, t=t, noise=noise).item() == 0.0

    # Oracle that recovers the noise from x_t (closure over x0), with t and noise drawn inside.
    seen = {}

    def oracle(x, tt):
        seen["t"] = tt
        ab = diff.alphas_cumprod[tt].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    loss = diff.loss(oracle, x0, generator=torch.Generator().manual_seed(6))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() < 1e-20
    assert seen["t"].dtype == torch.int64 and seen["t"].shape == (6,)


def test_loss_zero_model_and_determinism(diff):
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1  # float32, like images in [-1, 1]
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    l1 = diff.loss(zero, x0, generator=torch.Generator().manual_seed(8))
    # mean of n=12288 squared N(0,1) draws: sd sqrt(2/n) = 0.0128; allow 4 sd.
    assert abs(l1.item() - 1.0) < 4 * math.sqrt(2 / x0.numel())
    l2 = diff.loss(zero, x0, generator=torch.Generator().manual_seed(8))
    l3 = diff.loss(zero, x0, generator=torch.Generator().manual_seed(9))
    assert l1.item() == l2.item() and l1.item() != l3.item()
    # Draw order is documented: t first, then noise, both from the generator.
    g = torch.Generator().manual_seed(8)
    t = torch.randint(0, T, (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert diff.loss(zero, x0, t=t, noise=noise).item() == l1.item()
    # A bf16 model output still gives a float32 loss.
    bf16 = lambda x, t: torch.zeros_like(x, dtype=torch.bfloat16)  # noqa: E731
    assert diff.loss(bf16, x0, generator=torch.Generator().manual_seed(8)).dtype == torch.float32


# ----------------------------------------------------------------------------- samplers


def test_p_sample_step_matches_design(diff):
    # One step against DESIGN.md with z drawn from an identically seeded generator.
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    model = lambda x, t: 0.5 * x + 0.1 * t.view(-1, 1, 1, 1) / T  # noqa: E731
    b, ab = linear_betas(T), abar_ref(linear_betas(T))
    for ti in (0, 1, 500, 999):
        tt = torch.full((3,), ti)
        mean = (x - b[ti] / (1 - ab[ti]).sqrt() * model(x, tt)) / (1 - b[ti]).sqrt()
        for variance, var_t in (
            ("beta", b[ti]),
            (VarianceType.BETA_TILDE, (1 - (ab[ti - 1] if ti else 1.0)) / (1 - ab[ti]) * b[ti]),
        ):
            out = diff.p_sample(model, x, ti, torch.Generator().manual_seed(11), variance)
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=F64)
            expected = mean if ti == 0 else mean + var_t.sqrt() * z  # z = 0 at the last step
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        # When the clip does not bite, the posterior-mean form gives the same step.
        small, linear = x * 1e-3, (lambda x, t: 0.5 * x)  # x0 predictions stay below 0.3
        torch.testing.assert_close(
            diff.p_sample(linear, small, ti, torch.Generator().manual_seed(12), clip_denoised=True),
            diff.p_sample(linear, small, ti, torch.Generator().manual_seed(12)),
            rtol=1e-9, atol=1e-12,
        )


def test_p_sample_loop_rejects_unknown_variance(diff):
    with pytest.raises(ValueError, match="unknown variance 'learned'"):
        diff.p_sample_loop(lambda x, t: x, (1, 1), variance="learned")


# Gaussian data x0 ~ N(mu, diag(s^2)); the exact noise predictor is
# eps*(x_t, t) = sqrt(1-abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t).
MU = torch.tensor([0.3, -0.6, 1.2, 0.8], dtype=F64)
SD = torch.tensor([0.5, 0.5, 0.3, 0.8], dtype=F64)


def gaussian_eps_model(betas):
    ab = abar_ref(betas)

    def model(x, t):  # x: (B, 4) float64, t: (B,) int64
        a = ab[t].view(-1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SD**2 + 1 - a)

    return model


def assert_moments(x, mean_tol, std_rel_tol):
    n = x.shape[0]
    assert x.dtype == F64 and x.shape == (n, 4)
    assert bool(((x.mean(0) - MU).abs() <= mean_tol).all()), (x.mean(0) - MU).tolist()
    assert bool(((x.std(0) / SD - 1).abs() <= std_rel_tol).all()), (x.std(0) / SD - 1).tolist()


@pytest.mark.parametrize(
    "variance, disc_std",
    [
        # Exact moment propagation for these MU/SD, T=1000 linear: std bias +0.04..+0.31%
        # with sigma^2=beta, -0.53..-1.25% with beta_tilde; mean bias < 4e-5 for both.
        (VarianceType.BETA, 0.005),
        ("beta_tilde", 0.015),
    ],
)
def test_ancestral_sampler_recovers_gaussian(variance, disc_std):
    n = 25_000  # 1000 steps x 100k float64 values: ~3 s on one core
    x = Diffusion(linear_betas(T)).p_sample_loop(
        gaussian_eps_model(linear_betas(T)), (n, 4), torch.Generator().manual_seed(20),
        variance=variance, dtype=F64,
    )
    # Mean: 4 se (4 SD/sqrt(n) <= 0.0203) + 0.002. Std: 4 se (4/sqrt(2n) = 1.8%) + disc_std.
    assert_moments(x, mean_tol=4 * SD / math.sqrt(n) + 0.002, std_rel_tol=4 / math.sqrt(2 * n) + disc_std)


def test_ddim_recovers_gaussian_and_converges():
    n = 100_000
    d = Diffusion(linear_betas(T))
    model = gaussian_eps_model(linear_betas(T))
    x50 = d.ddim_sample_loop(model, (n, 4), 50, torch.Generator().manual_seed(21), dtype=F64)
    x100 = d.ddim_sample_loop(model, (n, 4), 100, torch.Generator().manual_seed(21), dtype=F64)
    # DDIM (eta=0) is first-order in the step size, and with the exact eps it shrinks the spread:
    # exact moment propagation gives std bias -3.8..-8.6% at 50 steps, -1.9..-4.4% at 100 (worst
    # for the narrowest dim, SD=0.3); mean bias <= 0.006 (x_T ~ N(0,I) ignores sqrt(abar_T) MU).
    # Tolerances: mean 4 se (<= 0.0102) + 0.008; std 4 se (0.9%) + 9% (50 steps) / + 4.5% (100).
    mean_tol = 4 * SD / math.sqrt(n) + 0.008
    assert_moments(x50, mean_tol, 4 / math.sqrt(2 * n) + 0.09)
    assert_moments(x100, mean_tol, 4 / math.sqrt(2 * n) + 0.045)
    # Same x_T, so the sampling noise cancels: doubling the steps halves the std error.
    ratio = (x100.std(0) / SD - 1) / (x50.std(0) / SD - 1)
    assert bool(((ratio > 0.4) & (ratio < 0.6)).all()), ratio.tolist()


def test_ddim_timesteps(diff):
    seq = diff.ddim_timesteps(50)
    assert seq.dtype == torch.int64 and len(seq) == 50
    assert seq[0].item() == 0 and seq[-1].item() == T - 1 and bool((seq[1:] > seq[:-1]).all())
    assert diff.ddim_timesteps(1).tolist() == [T - 1]
    assert torch.equal(diff.ddim_timesteps(5000), torch.arange(T))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        diff.ddim_timesteps(0)


def test_ddim_eta0_is_deterministic_given_x_T():
    d = Diffusion(cosine_betas(100))
    model = gaussian_eps_model(cosine_betas(100))
    g1, g2 = torch.Generator().manual_seed(30), torch.Generator().manual_seed(30)
    a = d.ddim_sample_loop(model, (16, 4), 20, g1, dtype=F64)
    b = d.ddim_sample_loop(model, (16, 4), 20, g2, dtype=F64)
    assert torch.equal(a, b)
    # Only x_T was drawn from the generator.
    ref = torch.Generator().manual_seed(30)
    torch.randn((16, 4), generator=ref, dtype=F64)
    assert torch.equal(g1.get_state(), ref.get_state())


def test_ddim_eta1_all_steps_is_ancestral_beta_tilde():
    # eta=1 over every step: sigma^2 = beta_tilde and the DDIM mean is the posterior mean.
    d = Diffusion(cosine_betas(100))
    model = gaussian_eps_model(cosine_betas(100))
    a = d.ddim_sample_loop(model, (16, 4), 100, torch.Generator().manual_seed(31), eta=1.0, dtype=F64)
    b = d.p_sample_loop(model, (16, 4), torch.Generator().manual_seed(31), "beta_tilde", dtype=F64)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_clip_denoised_keeps_samples_in_range():
    d = Diffusion(linear_betas(50))
    wild = lambda x, t: -3.0 * x  # noqa: E731  (x0 predictions far outside [-1, 1])
    for out in (
        d.p_sample_loop(wild, (8, 3, 4, 4), torch.Generator().manual_seed(40), clip_denoised=True),
        d.ddim_sample_loop(wild, (8, 3, 4, 4), 10, torch.Generator().manual_seed(40), clip_denoised=True),
    ):
        assert out.dtype == torch.float32 and out.shape == (8, 3, 4, 4)
        assert float(out.abs().max()) <= 1.0
    assert float(d.p_sample_loop(wild, (8, 3, 4, 4), torch.Generator().manual_seed(40)).abs().max()) > 1.0


def test_progress_bar_runs(capsys):
    pytest.importorskip("tqdm")
    d = Diffusion(linear_betas(5))
    out = d.p_sample_loop(lambda x, t: torch.zeros_like(x), (2, 1, 2, 2), progress=True)
    assert out.shape == (2, 1, 2, 2) and not out.requires_grad
