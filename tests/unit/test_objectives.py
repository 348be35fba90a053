"""pipeline.objectives and pipeline.timesteps against closed forms, in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.diffusion import Diffusion, linear_betas
from pipeline.diffusion.objectives import Objective
from pipeline.diffusion.timesteps import LossSecondMomentSampler, UniformSampler
from pipeline.diffusion.vlb import bpd_terms

F64 = torch.float64
T = 50
PREDICTIONS = ["eps", "x0", "v"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py


def zero_snr_betas(T):
    """Lin et al. 2024, Algorithm 1, written here from the paper: shift and scale sqrt(abar) so the
    last is 0 and the first unchanged."""
    s = np.sqrt(np.cumprod(1 - linear_betas(T, 1e-4, 0.2).numpy()))
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    abar = s**2
    return torch.from_numpy(1 - np.concatenate([abar[:1], abar[1:] / abar[:-1]]))


SCHEDULES = {"linear": lambda: linear_betas(T, 1e-4, 0.2), "zero_snr": lambda: zero_snr_betas(T)}


def batch(B=6, C=2, H=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, H, H, generator=g, dtype=F64) * 2 - 1
    noise = torch.randn(B, C, H, H, generator=g, dtype=F64)
    return x0, noise, g


def np_coefs(betas, t):
    abar = np.cumprod(1 - betas.numpy())[t.numpy()].reshape(-1, 1, 1, 1)
    return np.sqrt(abar), np.sqrt(1 - abar)


# ----------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_and_conversions_closed_form(prediction, schedule):
    """target(x0, noise) is eps, x0 or v = a eps - s x0 (numpy), and converting the exact target back
    gives x0 and eps, at every t (at zero terminal SNR too, where eps cannot be recovered from x_T)."""
    d = Diffusion(SCHEDULES[schedule]())
    obj = Objective(prediction=prediction)
    x0, noise, _ = batch(B=T)
    t = torch.arange(T)
    a, s = np_coefs(d.betas, t)
    x_t = d.q_sample(x0, t, noise)
    np.testing.assert_allclose(x_t.numpy(), a * x0.numpy() + s * noise.numpy(), rtol=1e-13, atol=1e-14)
    ref = {"eps": noise.numpy(), "x0": x0.numpy(), "v": a * noise.numpy() - s * x0.numpy()}[prediction]
    target = obj.target(d, x0, t, noise)
    np.testing.assert_allclose(target.numpy(), ref, rtol=1e-13, atol=1e-14)
    ok = slice(None) if schedule == "linear" or prediction != "eps" else slice(0, T - 1)
    torch.testing.assert_close(obj.to_x0(d, x_t, t, target)[ok], x0[ok], rtol=1e-9, atol=1e-10)
    if prediction != "x0" or schedule == "linear":
        torch.testing.assert_close(obj.to_eps(d, x_t, t, target), noise, rtol=1e-9, atol=1e-10)
    else:  # x0 -> eps divides by s_t, fine (s_t >= s_0 > 0) also at zero terminal SNR
        torch.testing.assert_close(obj.to_eps(d, x_t, t, target), noise, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_mean_is_posterior_mean_of_predicted_x0(prediction):
    d = Diffusion(linear_betas(T, 1e-4, 0.2))
    obj = Objective(prediction=prediction)
    x0, noise, g = batch()
    t = torch.randint(0, T, (6,), generator=g)
    x_t = d.q_sample(x0, t, noise)
    pred = obj.target(d, x0, t, noise) + 0.1 * torch.randn(x0.shape, generator=g, dtype=F64)
    p = obj.p_mean_variance(d, pred, x_t, t)
    betas = d.betas.numpy()
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    tn = t.numpy()
    c1 = (np.sqrt(abar_prev) * betas / (1 - abar))[tn].reshape(-1, 1, 1, 1)
    c2 = (np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar))[tn].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(p.mean.numpy(), c1 * p.x0.numpy() + c2 * x_t.numpy(), rtol=1e-10, atol=1e-12)
    # fixed_large: beta_t (index 0: beta-tilde_1); the others are checked in tests/test_vlb.py
    bt1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    ref_var = np.where(tn == 0, bt1, betas[tn]).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(p.variance.numpy(), ref_var, rtol=1e-12)


def test_learned_range_interpolates_log_variance():
    d = Diffusion(linear_betas(T, 1e-4, 0.2))
    obj = Objective(variance="learned_range", loss="hybrid")
    x0, noise, g = batch(C=1)
    t = torch.arange(1, 7)
    x_t = d.q_sample(x0, t, noise)
    for v, ref in [(-1.0, torch.log(d.posterior_variance[t])), (1.0, torch.log(d.betas[t]))]:
        out = torch.cat([noise, torch.full_like(noise, v)], dim=1)
        p = obj.p_mean_variance(d, out, x_t, t)
        torch.testing.assert_close(p.log_variance, ref.reshape(-1, 1, 1, 1).expand_as(x0), rtol=1e-12, atol=0)
    assert obj.out_channels(3) == 6 and Objective().out_channels(3) == 3
    with pytest.raises(ValueError, match="expected 2 for"):
        obj.p_mean_variance(d, noise, x_t, t)


# ----------------------------------------------------------------------------- the loss


def test_default_loss_is_the_old_mse_bit_for_bit():
    d = Diffusion(linear_betas(1000))
    x0, noise, g = batch()
    x0, noise = x0.float(), noise.float()
    t = torch.randint(0, 1000, (6,), generator=g)
    model = lambda x, t: 0.5 * x + 0.001 * t.reshape(-1, 1, 1, 1)  # noqa: E731
    old = F.mse_loss(model(d.q_sample(x0, t, noise), t).float(), noise.float())  # the pre-objective code
    for var in ["fixed_large", "fixed_small"]:
        out = Objective(variance=var).compute_loss(d, model, x0, t, noise)
        assert torch.equal(out.loss, old) and out.per_sample is None
    # The per-sample path (for a loss-aware sampler) is the same number, up to the order of the sum.
    out = Objective().compute_loss(d, model, x0, t, noise, per_sample=True)
    torch.testing.assert_close(out.loss, old, rtol=1e-6, atol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_simple_loss_and_min_snr_match_the_paper(prediction, gamma, schedule):
    """Hang et al. 2023: the min-SNR-gamma loss is min(SNR_t, gamma) ||x0 - x0_hat||^2 (x0 space); the
    unweighted loss is ||target - pred||^2. Checked with numpy from the x0-space error, for eps, x0
    and v at every t (x0_hat undefined for eps at SNR 0, where the weight must be 1 and finite)."""
    d = Diffusion(SCHEDULES[schedule]())
    obj = Objective(prediction=prediction, snr_gamma=gamma)
    x0, noise, g = batch(B=T)
    t = torch.arange(T)
    delta = 0.3 * torch.randn(x0.shape, generator=g, dtype=F64)
    model = lambda x, tt: (obj.target(d, x0, tt, noise) + delta).float()  # noqa: E731
    losses = obj.loss_terms(d, model, x0, t, noise)["loss"].double()
    a, s = np_coefs(d.betas, t)
    abar = (a**2).reshape(-1)
    snr = abar / (1 - abar)
    err = delta.numpy()
    # x0-space error of the prediction target + delta (x_t fixed): eps: -s/a delta, x0: delta, v: -s delta
    x0_err = {"eps": -(s / np.where(a > 0, a, np.nan)) * err, "x0": err, "v": -s * err}[prediction]
    x0_mse = (x0_err**2).reshape(T, -1).mean(1)
    if gamma == 0:
        ref = (err**2).reshape(T, -1).mean(1)
    else:
        with np.errstate(invalid="ignore"):
            ref = np.minimum(snr, gamma) * x0_mse
        if prediction == "eps" and schedule == "zero_snr":
            ref[-1] = (err[-1] ** 2).mean()  # weight min(1, gamma/0) = 1
    np.testing.assert_allclose(losses.numpy(), ref, rtol=2e-5, atol=1e-7)
    w = obj.snr_weight(d, t)
    assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    assert bool(torch.isfinite(losses).all())


def test_min_snr_weights_at_zero_terminal_snr():
    d = Diffusion(zero_snr_betas(T))
    assert d.alphas_cumprod[-1].item() == 0.0
    last = torch.tensor([T - 1])
    assert Objective(prediction="eps", snr_gamma=5).snr_weight(d, last).item() == 1.0
    assert Objective(prediction="x0", snr_gamma=5).snr_weight(d, last).item() == 0.0
    assert Objective(prediction="v", snr_gamma=5).snr_weight(d, last).item() == 0.0
    # v at SNR = gamma: min(SNR, gamma) / (SNR + 1) = gamma / (gamma + 1), the diffusers #8466 form
    abar = d.alphas_cumprod
    snr = abar / (1 - abar)
    k = int(torch.argmin((snr - 5).abs()))
    w = Objective(prediction="v", snr_gamma=float(snr[k])).snr_weight(d, torch.tensor([k]))
    assert w.item() == pytest.approx(snr[k].item() / (snr[k].item() + 1), rel=1e-12)


class LearnedToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.6, dtype=F64))  # the mean
        self.b = torch.nn.Parameter(torch.tensor(0.2, dtype=F64))  # the variance

    def forward(self, x, t):
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1) / T
        return torch.cat([self.a * x + 0.1 * tt, torch.tanh(self.b * x + tt - 0.5)], dim=1)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_hybrid_vb_term_equals_bpd_term(prediction):
    """The L_vlb term of the hybrid loss is bpd_terms' term at the same (x0, t, noise)."""
    d = Diffusion(linear_betas(T, 1e-4, 0.2))
    x0 = (torch.randint(0, 256, (4, 2, 4, 4), generator=torch.Generator().manual_seed(1)).to(F64) / 127.5 - 1)
    nf = lambda t, shape: torch.randn(shape, generator=torch.Generator().manual_seed(t), dtype=F64)  # noqa: E731
    model = LearnedToy()
    obj = Objective(prediction=prediction, variance="learned_range", loss="hybrid")
    # The loss runs in float32 (as training does), so bpd_terms does too here: the decoder term's
    # difference of two CDFs near 1 is not float32-stable, so a float64 reference would differ there.
    x0, model = x0.float(), model.float()
    nf32 = lambda t, shape: nf(t, shape).float()  # noqa: E731
    ref = bpd_terms(model, d, obj, x0, noise_fn=nf32, clip_denoised=False)
    for k in [0, 1, 17, T - 1]:
        t = torch.full((4,), k)
        terms = obj.loss_terms(d, model, x0, t, nf32(k, tuple(x0.shape)))
        torch.testing.assert_close(terms["vb"], ref.terms[:, k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * T * terms["vb"], rtol=1e-6, atol=0)


def test_hybrid_stops_the_gradient_of_the_mean_in_the_vb_term():
    d = Diffusion(linear_betas(T, 1e-4, 0.2))
    x0, noise, g = batch()
    t = torch.randint(1, T, (6,), generator=g)
    model = LearnedToy()
    terms = Objective(variance="learned_range", loss="hybrid").loss_terms(d, model, x0, t, noise)
    ga_mse, gb_mse = torch.autograd.grad(terms["mse"].mean(), [model.a, model.b], allow_unused=True,
                                         retain_graph=True)
    ga_vb, gb_vb = torch.autograd.grad(terms["vb"].mean(), [model.a, model.b], allow_unused=True)
    # mse trains only the mean, vb only the variance (zero, or no path at all)
    assert all(g is None or g.item() == 0.0 for g in (gb_mse, ga_vb))
    assert gb_vb.abs().item() > 0 and ga_mse.abs().item() > 0
    vlb = Objective(variance="learned_range", loss="vlb").loss_terms(d, model, x0, t, noise)
    ga, gb = torch.autograd.grad(vlb["loss"].mean(), [model.a, model.b])
    assert ga.abs().item() > 0 and gb.abs().item() > 0  # vlb trains both
    torch.testing.assert_close(vlb["loss"], T * vlb["vb"], rtol=1e-6, atol=0)


def test_importance_weights_apply_to_the_loss():
    d = Diffusion(linear_betas(T, 1e-4, 0.2))
    x0, noise, g = batch()
    t = torch.randint(0, T, (6,), generator=g)
    model = LearnedToy()
    obj = Objective(variance="learned_range", loss="hybrid")
    w = torch.rand(6, generator=g, dtype=F64).float()
    out = obj.compute_loss(d, model, x0.float(), t, noise.float(), weights=w, per_sample=True)
    torch.testing.assert_close(out.loss, (out.per_sample * w).mean())
    assert not out.per_sample.requires_grad


# ----------------------------------------------------------------------------- timestep samplers


def test_uniform_sampler_draws_as_before():
    d = Diffusion(linear_betas(T))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t, w = UniformSampler(T).sample(d, 64, "cpu", g1)
    assert w is None and torch.equal(t, torch.randint(0, T, (64,), generator=g2, dtype=torch.int64))


def test_loss_second_moment_weights_and_history():
    Tn, H = 5, 3
    s = LossSecondMomentSampler(Tn, history_per_term=H, uniform_prob=0.1)
    assert torch.equal(s.weights(), torch.ones(Tn, dtype=F64))
    losses = {t: [float(t + 1) * (k + 1) for k in range(H + 2)] for t in range(Tn)}  # H + 2 per t
    for k in range(H + 2):
        s.update(torch.arange(Tn), torch.tensor([losses[t][k] for t in range(Tn)]))
        assert s.warmed_up() == (k + 1 >= H)
    kept = np.array([losses[t][-H:] for t in range(Tn)])  # the oldest two dropped
    np.testing.assert_array_equal(s.loss_history.numpy(), kept)
    rms = np.sqrt((kept**2).mean(1))
    ref = rms / rms.sum() * 0.9 + 0.1 / Tn
    np.testing.assert_allclose(s.weights().numpy(), ref, rtol=1e-14)


def test_loss_second_moment_sampling_is_unbiased():
    """Draws follow p, and E[w(t) L(t)] = mean_t L(t) (the objective is unchanged)."""
    Tn = 8
    s = LossSecondMomentSampler(Tn, history_per_term=2, uniform_prob=0.01)
    L = torch.linspace(1, 20, Tn, dtype=F64) ** 2
    for _ in range(2):
        s.update(torch.arange(Tn), L)
    p = s.weights()
    d = Diffusion(linear_betas(Tn))
    t, w = s.sample(d, 200_000, "cpu", torch.Generator().manual_seed(0))
    freq = torch.bincount(t, minlength=Tn).double() / t.numel()
    se = (p * (1 - p) / t.numel()).sqrt()
    assert bool(((freq - p).abs() <= 5 * se).all())
    torch.testing.assert_close(w.double(), 1 / (Tn * p[t]), rtol=1e-6, atol=0)
    est = (w.double() * L[t]).mean().item()
    assert est == pytest.approx(L.mean().item(), rel=0.02)


def test_loss_second_moment_state_round_trip():
    d = Diffusion(linear_betas(T))
    a = LossSecondMomentSampler(T, history_per_term=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ts = torch.randint(0, T, (40,), generator=g)
        a.update(torch.cat([ts, torch.arange(T)]), torch.rand(40 + T, generator=g))
    b = LossSecondMomentSampler(T, history_per_term=2)
    b.load_state_dict(a.state_dict())
    ta, wa = a.sample(d, 32, "cpu", torch.Generator().manual_seed(5))
    tb, wb = b.sample(d, 32, "cpu", torch.Generator().manual_seed(5))
    assert a.warmed_up() and torch.equal(ta, tb) and torch.equal(wa, wb)
    with pytest.raises(ValueError, match="shape"):
        LossSecondMomentSampler(T + 1, history_per_term=2).load_state_dict(a.state_dict())
