"""The variational lower bound in bits/dim: the terms that `ddpm-eval`'s bpd and the hybrid/vlb
training losses share.

Conventions follow improved-diffusion (`GaussianDiffusion._vb_terms_bpd` / `calc_bpd_loop`, commit
1bc7bbb), so our bits/dim compare with the numbers users know:
  -log p(x_0) <= L_prior + sum_{t>0} L_t + L_0, in bits per dimension, with
  L_prior = KL(q(x_T | x_0) || N(0, I)),
  L_t     = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))       for index t > 0,
  L_0     = -log p(x_0 | x_1), a Gaussian discretised to 256 bins of width 2/255 on [-1, 1]
            (the edge bins open at x < -0.999 and x > 0.999).
Index t runs 0..T-1 (index 0 is the paper's step 1). Tensors in, tensors out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import Tensor

LN2 = math.log(2.0)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (arguments broadcast)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) by the tanh approximation improved-diffusion (and Ho et al.'s code) use; kept, not
    replaced by erf, so that our bits/dim are theirs to the last digit it affects."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) per element, in nats, for data x in [-1, 1] that were uint8 values (x = k/127.5 - 1).

    P is N(means, exp(log_scales)^2) integrated over the bin [x - 1/255, x + 1/255]; the lowest bin
    extends to -inf and the highest to +inf, so the 256 probabilities sum to 1. Probabilities are
    floored at 1e-12 before the log, as improved-diffusion does.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def vb_term_bpd(diffusion, x0: Tensor, x_t: Tensor, t: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """One term of the bound in bits/dim, (B,): the decoder NLL where t == 0, else
    KL(q(x_{t-1} | x_t, x_0) || N(mean, e^log_variance)).

    `mean`, `log_variance`: the model's p(x_{t-1} | x_t) (log_variance broadcastable to x0). The true
    posterior's log-variance is the clipped one (t = 0 borrows t = 1's), as improved-diffusion does;
    at t = 0 only the decoder term is used, so the borrowed value never enters a result.
    """
    true_mean, _ = diffusion.posterior(x0, x_t, t)
    true_log_var = diffusion._extract(diffusion.posterior_log_variance_clipped, t, x_t)
    log_variance = log_variance.expand_as(x0)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_variance)) / LN2
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / LN2
    return torch.where(t == 0, decoder_nll, kl)


def prior_bpd(diffusion, x0: Tensor) -> Tensor:
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim, (B,). Depends on the schedule only, not the model."""
    t = torch.full((x0.shape[0],), diffusion.num_timesteps - 1, device=x0.device, dtype=torch.int64)
    mean = diffusion._extract(diffusion.sqrt_alphas_cumprod, t, x0) * x0
    log_var = torch.log(diffusion._extract(1.0 - diffusion.alphas_cumprod, t, x0)).expand_as(x0)
    return mean_flat(normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0))) / LN2


@dataclass
class BpdTerms:
    prior: Tensor
    """(B,) KL(q(x_T | x_0) || N(0, I)) in bits/dim."""
    terms: Tensor
    """(B, T) terms[:, 0] the decoder NLL, terms[:, t] = L_t for t > 0, in bits/dim."""
    total: Tensor
    """(B,) prior + terms.sum(1): the negative ELBO in bits/dim (an upper bound on the NLL)."""


NoiseFn = Callable[[int, Tuple[int, ...]], Tensor]


@torch.no_grad()
def bpd_terms(model, diffusion, objective, x0: Tensor, *, noise_fn: NoiseFn, clip_denoised: bool = True,
              progress: bool = False) -> BpdTerms:
    """Every term of the bound for a batch x0 (B, C, H, W) in [-1, 1], as `calc_bpd_loop` runs it.

    t runs T-1 down to 0; for each, x_t = q_sample(x0, t, noise_fn(t, x0.shape)) and one model call.
    `noise_fn` lets a caller key the noise to (sample index, t), so that the result of an image does
    not depend on the batch it sits in or on the number of ranks. `objective` turns the model output
    into p(x_{t-1} | x_t) (see objectives.Objective.p_mean_variance; None: the diffusion's own);
    `clip_denoised` clamps the predicted x_0 to [-1, 1] first (improved-diffusion's image_nll.py
    default). Computed in x0.dtype.
    """
    objective = objective if objective is not None else diffusion.objective
    B, T = x0.shape[0], diffusion.num_timesteps
    terms = x0.new_zeros(B, T)
    steps = range(T - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm  # lazy: only interactive callers want a bar

        steps = tqdm(steps, desc="bpd")
    for i in steps:
        t = torch.full((B,), i, device=x0.device, dtype=torch.int64)
        noise = noise_fn(i, tuple(x0.shape)).to(device=x0.device, dtype=x0.dtype)
        x_t = diffusion.q_sample(x0, t, noise)
        out = model(x_t, t).to(x0.dtype)
        p = objective.p_mean_variance(diffusion, out, x_t, t, clip_denoised=clip_denoised)
        terms[:, i] = vb_term_bpd(diffusion, x0, x_t, t, p.mean, p.log_variance)
    prior = prior_bpd(diffusion, x0)
    return BpdTerms(prior=prior, terms=terms, total=prior + terms.sum(dim=1))
