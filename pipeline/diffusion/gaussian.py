"""Gaussian diffusion (DDPM, Ho et al. 2020) as pure tensor math.

Tensors in, tensors out: no I/O, no logging, no device placement beyond what the
caller asks for. Schedules are kept in float64; each gathered coefficient is cast
to the dtype of the tensor it multiplies.

Notation. The timestep index ``t`` runs 0..T-1; index ``t`` is the paper's step
``t+1`` (so ``t=0`` uses beta_1, the first noising step, and ``alphas_cumprod[t]``
is abar_{t+1}). ``alphas_cumprod_prev[0] = 1`` stands for abar_0 (no noise).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from pipeline.diffusion.objectives import Objective, Variance

# model(x_t, t) -> the objective's prediction (eps, x0 or v; 2C channels with a learned variance);
# t is int64 (B,).
EpsModel = Callable[[Tensor, Tensor], Tensor]
# noise_fn(shape) -> N(0, I) of that shape; replaces `generator` in the samplers when given.
NoiseFn = Callable[[Tuple[int, ...]], Tensor]


class BetaSchedule(str, enum.Enum):
    """Noise schedule beta_1..beta_T."""

    LINEAR = "linear"  # Ho et al. 2020: linear from beta_start to beta_end
    COSINE = "cosine"  # Nichol & Dhariwal 2021: abar_t follows a squared cosine


class VarianceType(str, enum.Enum):
    """A fixed reverse-process variance sigma_t^2 for the ancestral sampler, overriding the objective's."""

    BETA = "beta"  # sigma_t^2 = beta_t (upper bound; exact for x_0 ~ N(0, I)); = diffusion.variance fixed_large
    BETA_TILDE = "beta_tilde"  # sigma_t^2 = beta_tilde_t (lower bound; exact for a point mass); = fixed_small


_FIXED = {VarianceType.BETA: Variance.FIXED_LARGE, VarianceType.BETA_TILDE: Variance.FIXED_SMALL}


def _parse_enum(enum_cls, value, what: str):
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"unknown {what} {value!r}; expected one of: {valid}") from None


# --------------------------------------------------------------------------- schedules


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear schedule beta_1..beta_T from ``beta_start`` to ``beta_end`` (DDPM). float64, (T,)."""
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"linear betas need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
        )
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Improved DDPM, Nichol & Dhariwal 2021). float64, (T,).

    abar(u) = f(u) / f(0) with f(u) = cos^2((u/T + s) / (1 + s) * pi/2), and
    beta_t = min(1 - abar(t) / abar(t-1), max_beta); the clip avoids the singularity at u = T.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta}")
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps  # (T+1,) in [0, 1]
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]  # (T+1,), abar[0] = 1
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def make_betas(
    schedule: Union[str, BetaSchedule],
    timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Tensor:
    """Build betas by schedule name; ``beta_start``/``beta_end`` apply to 'linear' only."""
    kind = _parse_enum(BetaSchedule, schedule, "beta schedule")
    if kind is BetaSchedule.LINEAR:
        return linear_betas(timesteps, beta_start, beta_end)
    return cosine_betas(timesteps)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose last abar is exactly 0 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Algorithm 1): sqrt(abar) is shifted so its last value is 0 and scaled so its
    first is unchanged. The last beta becomes 1: x_T is pure noise, as the sampler assumes.
    Predicting eps is then undefined at the last step (x_0 = (x_T - eps) / 0); use v (or x0)."""
    s = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0).sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * s0 / (s0 - s_last)
    abar = s**2
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


# --------------------------------------------------------------------------- diffusion


class Diffusion:
    """Forward process q, the training loss, and DDPM / DDIM samplers for a beta schedule.

    All schedule tensors are float64 of shape (T,). Call ``to(device)`` once so that
    per-step gathers happen on the device of the data. ``objective`` says what the model predicts
    and how its output becomes a mean and variance (default: the paper's eps with sigma^2 = beta).
    """

    def __init__(self, betas: Tensor, objective: Optional[Objective] = None):
        self.objective = objective if objective is not None else Objective()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps = int(betas.shape[0])

        # Forward process: alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s.
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # Ancestral step: x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1-abar_t) eps) + sigma_t z.
        self.sqrt_recip_alphas = self.alphas.rsqrt()
        self.eps_coef = betas / self.sqrt_one_minus_alphas_cumprod

        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta_tilde at t=0 is 0; log-variance borrows t=1's value there (improved-diffusion).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: Union[str, torch.device]) -> "Diffusion":
        """A copy whose schedule tensors live on ``device`` (still float64)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(moved, name, value.to(device))
        return moved

    def _extract(self, a: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """Gather a[t] for a batch of timesteps; (B,) -> (B, 1, ..., 1) in x.dtype, broadcastable to x."""
        if t.device != a.device:
            raise ValueError(
                f"timesteps on {t.device} but schedule on {a.device}; call Diffusion.to({t.device}) once"
            )
        out = a[t].to(x.dtype)  # (B,)
        return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))

    # ----------------------------------------------------------------------- forward process

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample from q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.

        x0, noise: (B, ...); t: int64 (B,).
        """
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def sample_timesteps(
        self, batch_size: int, device: Union[str, torch.device], generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """t ~ Uniform{0, ..., T-1}, int64 (B,)."""
        return torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=device, dtype=torch.int64
        )

    def loss(
        self,
        model: EpsModel,
        x0: Tensor,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """The objective's training loss (default: the "simple" E ||eps - eps_theta(x_t, t)||^2, mean over
        all elements), a scalar computed in float32 whatever the model's output dtype.

        t ~ Uniform and noise ~ N(0, I) are drawn with ``generator`` (t first) when not given.
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.objective.compute_loss(self, model, x0, t, noise).loss

    def posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0).

        mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
        variance = beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t, shaped (B, 1, ..., 1).
        """
        mean = (
            self._extract(self.posterior_mean_coef1, t, xt) * x0
            + self._extract(self.posterior_mean_coef2, t, xt) * xt
        )
        return mean, self._extract(self.posterior_variance, t, xt)

    def predict_x0(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert q_sample: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        )

    # ----------------------------------------------------------------------- samplers

    def p_sample(
        self,
        model: EpsModel,
        xt: Tensor,
        t: int,
        generator: Optional[torch.Generator] = None,
        variance: Optional[Union[str, VarianceType]] = None,
        clip_denoised: bool = False,
        noise_fn: Optional[NoiseFn] = None,
    ) -> Tensor:
        """One ancestral step: sample x_{t-1} ~ p(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I).

        mu_theta is the posterior mean at the objective's x_0 prediction (for eps and no clipping in
        the paper's form 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta)); with
        ``clip_denoised`` the x_0 prediction is clipped to [-1, 1] first. sigma_t^2 is the objective's
        (``variance`` overrides a fixed one). No noise at t = 0. z comes from ``noise_fn(shape)``
        when given, else from ``generator``.
        """
        objective = self._sampling_objective(variance)
        tt = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.int64)  # (B,)
        out = model(xt, tt).to(xt.dtype)  # (B, C or 2C, H, W)
        p = objective.p_mean_variance(self, out, xt, tt, clip_denoised=clip_denoised)
        if t == 0:
            return p.mean  # z = 0 at the last step
        z = _noise(noise_fn, xt.shape, generator, xt.device, xt.dtype)
        std = p.variance.sqrt() if not objective.learned_variance else torch.exp(0.5 * p.log_variance)
        return p.mean + std * z

    def _sampling_objective(self, variance: Optional[Union[str, VarianceType]]) -> Objective:
        if variance is None:
            return self.objective
        kind = _parse_enum(VarianceType, variance, "variance")
        if self.objective.learned_variance:
            raise ValueError("this model learns its variance; do not pass a fixed variance to the sampler")
        return dataclasses.replace(self.objective, variance=_FIXED[kind])

    def respaced(self, timesteps: Tensor) -> "Diffusion":
        """The process restricted to the increasing steps ``timesteps`` (improved-diffusion's
        SpacedDiffusion): betas 1 - abar_k / abar_prev over the kept steps, so that q(x_k | x_0) is
        unchanged there; a learned variance interpolates between the respaced beta and beta-tilde.
        ``timestep_map`` (K,) gives the original index of each respaced step, for the model."""
        keep = torch.as_tensor(timesteps, dtype=torch.int64).to(self.device)
        abar = self.alphas_cumprod[keep]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        sub = Diffusion((1.0 - abar / abar_prev).cpu(), self.objective).to(self.device)
        sub.timestep_map = keep
        return sub

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: EpsModel,
        shape: Tuple[int, ...],
        generator: Optional[torch.Generator] = None,
        variance: Optional[Union[str, VarianceType]] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        clip_denoised: bool = False,
        dtype: torch.dtype = torch.float32,
        steps: Optional[int] = None,
        noise_fn: Optional[NoiseFn] = None,
    ) -> Tensor:
        """Ancestral sampling (DDPM Algorithm 2): x_T ~ N(0, I), then ``p_sample`` steps.

        ``steps`` K < T samples the respaced process over ``ddim_timesteps(K)`` (see ``respaced``);
        None or T runs all T steps. Noise is drawn with ``generator`` (on ``device``; default: the
        schedule's device), or, when given, by ``noise_fn(shape)`` (x_T first, then one z per step,
        in step order). Returns x_0 of ``shape`` and ``dtype``.
        """
        self._sampling_objective(variance)  # fail before the first model call
        device = torch.device(device) if device is not None else self.device
        diff = self.to(device)  # once, not per step
        if steps is not None and steps != self.num_timesteps:
            diff = diff.respaced(diff.ddim_timesteps(steps))
            timestep_map, inner = diff.timestep_map, model
            model = lambda x, t: inner(x, timestep_map[t])  # noqa: E731  (the model knows original steps)
        x = _noise(noise_fn, shape, generator, device, dtype)  # x_T
        for t in _progress(range(diff.num_timesteps - 1, -1, -1), progress, "ddpm"):
            x = diff.p_sample(model, x, t, generator, variance, clip_denoised, noise_fn)
        return x

    def ddim_timesteps(self, steps: int) -> Tensor:
        """Evenly spaced, increasing subsequence of {0, ..., T-1} with both ends (T-1 only if steps=1)."""
        if steps < 1:
            raise ValueError(f"DDIM steps must be >= 1, got {steps}")
        return torch.linspace(self.num_timesteps - 1, 0, steps, dtype=torch.float64).round().long().unique()

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model: EpsModel,
        shape: Tuple[int, ...],
        steps: int,
        generator: Optional[torch.Generator] = None,
        eta: float = 0.0,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        clip_denoised: bool = False,
        dtype: torch.dtype = torch.float32,
        noise_fn: Optional[NoiseFn] = None,
    ) -> Tensor:
        """DDIM sampling (Song et al. 2020) over ``ddim_timesteps(steps)``.

        The kept steps' abar define the respaced process, so this is DDIM on it. From t to the previous
        kept step s (abar_s = 1 past the end), with (eps, x_0') the objective's predictions:
          sigma = eta sqrt((1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s)),
          x_s = sqrt(abar_s) x_0' + sqrt(1 - abar_s - sigma^2) eps + sigma z.
        eta = 0 is deterministic given x_T; eta = 1 with steps = T is ancestral sampling with beta_tilde.
        A learned variance is not used (DDIM's sigma is set by eta). Noise (x_T, then z per step when
        eta > 0) comes from ``noise_fn(shape)`` when given, else from ``generator``.
        """
        device = torch.device(device) if device is not None else self.device
        diff = self.to(device)
        seq = diff.ddim_timesteps(steps).tolist()  # increasing ints
        x = _noise(noise_fn, shape, generator, device, dtype)  # x_T
        for i in _progress(range(len(seq) - 1, -1, -1), progress, "ddim"):
            tt = torch.full((shape[0],), seq[i], device=device, dtype=torch.int64)  # (B,)
            abar_t = diff.alphas_cumprod[seq[i]]
            abar_s = diff.alphas_cumprod[seq[i - 1]] if i > 0 else abar_t.new_ones(())
            eps, x0 = diff.objective.eps_x0(diff, model(x, tt).to(dtype), x, tt)  # (B, C, H, W) each
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
                eps = (x - abar_t.sqrt().to(dtype) * x0) / (1 - abar_t).sqrt().to(dtype)
            sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).sqrt()
            x = abar_s.sqrt().to(dtype) * x0 + (1 - abar_s - sigma**2).clamp(min=0).sqrt().to(dtype) * eps
            if i > 0 and eta > 0:
                z = _noise(noise_fn, shape, generator, device, dtype)
                x = x + sigma.to(dtype) * z
        return x


def _noise(noise_fn: Optional[NoiseFn], shape, generator, device, dtype) -> Tensor:
    """N(0, I) of `shape`: from `noise_fn` (e.g. per-sample generators, pipeline.eval.noise) or
    `generator` (the default path, unchanged)."""
    if noise_fn is None:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return noise_fn(tuple(shape)).to(device=device, dtype=dtype)


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm  # lazy: only the sampling CLI wants a bar

    return tqdm(it, desc=desc)
