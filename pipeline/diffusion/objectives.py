"""The training objective: what the model predicts, how the loss is weighted, and how the model's
output becomes eps / x_0 / the mean and variance of p(x_{t-1} | x_t).

One `Objective` (built from the `diffusion.*` config keys) is used by the loss, both samplers,
bits/dim, export and sample, so a model trained for v with a learned variance is read as such
everywhere. Tensors in, tensors out; the schedule comes from a `Diffusion` passed in.

Parameterisations, with a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t), x_t = a_t x_0 + s_t eps:
  eps: the model predicts eps;          x_0 = (x_t - s_t eps) / a_t
  x0:  the model predicts x_0;          eps = (x_t - a_t x_0) / s_t
  v:   the model predicts v = a_t eps - s_t x_0 (Salimans and Ho 2022);
       x_0 = a_t x_t - s_t v,  eps = s_t x_t + a_t v  (finite at zero terminal SNR, a_t = 0).
Variance (Nichol and Dhariwal 2021, improved-diffusion's ModelVarType):
  fixed_large: sigma_t^2 = beta_t (index 0 borrows beta-tilde at index 1 for the bound's decoder term)
  fixed_small: sigma_t^2 = beta-tilde_t (the clipped log, index 0 borrowing index 1)
  learned_range: the model outputs 2C channels, the last C a value v in [-1, 1];
       log sigma_t^2 = f log beta_t + (1 - f) log beta-tilde_t (clipped), f = (v + 1) / 2.
Losses (per sample, then averaged over the batch):
  simple: mean ||target - prediction||^2, optionally min-SNR-gamma weighted;
  hybrid: simple + hybrid_lambda * T * L_t(stop-gradient on the mean), with L_t in bits/dim, i.e.
          improved-diffusion's L_simple + lambda L_vlb with L_vlb estimated by T L_t;
  vlb:    T * L_t (improved-diffusion's RESCALED_KL), gradients to the mean and the variance.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.diffusion.vlb import mean_flat, vb_term_bpd


class Prediction(str, enum.Enum):
    EPS = "eps"
    X0 = "x0"
    V = "v"


class Variance(str, enum.Enum):
    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"
    LEARNED_RANGE = "learned_range"


class Loss(str, enum.Enum):
    SIMPLE = "simple"
    HYBRID = "hybrid"
    VLB = "vlb"


def _enum(cls, value, key: str):
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(m.value for m in cls)
        raise ValueError(f"{key}: unknown value {value!r}; use one of {valid}") from None


@dataclass
class MeanVariance:
    """p(x_{t-1} | x_t) as the model gives it, and the predictions it came from."""

    mean: Tensor
    """(B, C, H, W)."""
    variance: Tensor
    """(B, 1, 1, 1) for a fixed variance, (B, C, H, W) for a learned one."""
    log_variance: Tensor
    """log of `variance`, same shape (for the bound's KL and decoder terms)."""
    x0: Tensor
    """(B, C, H, W) the x_0 prediction (clamped to [-1, 1] when asked)."""


@dataclass
class LossTerms:
    loss: Tensor
    """0-dim: what backward runs on (importance weights applied, mean over the batch)."""
    per_sample: Optional[Tensor]
    """(B,) detached per-sample loss before importance weights (what a loss-aware timestep sampler
    learns from); None on the default path, which computes the batch mean directly."""


@dataclass(frozen=True)
class Objective:
    prediction: Prediction = Prediction.EPS
    variance: Variance = Variance.FIXED_LARGE
    loss: Loss = Loss.SIMPLE
    hybrid_lambda: float = 0.001
    snr_gamma: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "prediction", _enum(Prediction, self.prediction, "diffusion.prediction"))
        object.__setattr__(self, "variance", _enum(Variance, self.variance, "diffusion.variance"))
        object.__setattr__(self, "loss", _enum(Loss, self.loss, "diffusion.loss"))

    @classmethod
    def from_config(cls, d) -> "Objective":
        """From the `diffusion` config section (checked by config.validate)."""
        return cls(d.prediction, d.variance, d.loss, d.hybrid_lambda, d.snr_gamma)

    @property
    def learned_variance(self) -> bool:
        return self.variance is Variance.LEARNED_RANGE

    @property
    def is_default(self) -> bool:
        """The paper's DDPM loss (eps, fixed variance, unweighted MSE): computed with exactly the ops
        the pre-objective code used, so its weights stay bit-identical."""
        return (self.prediction is Prediction.EPS and not self.learned_variance
                and self.loss is Loss.SIMPLE and self.snr_gamma == 0)

    def out_channels(self, data_channels: int) -> int:
        """Channels the model must output for images of `data_channels` channels."""
        return 2 * data_channels if self.learned_variance else data_channels

    # ----------------------------------------------------------------------- conversions

    def split(self, model_out: Tensor, channels: int) -> Tuple[Tensor, Optional[Tensor]]:
        """(prediction, v in [-1, 1] or None) from the model output (B, C or 2C, H, W)."""
        want = self.out_channels(channels)
        if model_out.shape[1] != want:
            raise ValueError(f"model output has {model_out.shape[1]} channels, expected {want} for "
                             f"diffusion.variance={self.variance.value} and {channels}-channel images")
        if not self.learned_variance:
            return model_out, None
        return model_out[:, :channels], model_out[:, channels:]

    def target(self, diffusion, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the prediction is regressed on: eps, x_0 or v = a_t eps - s_t x_0."""
        if self.prediction is Prediction.EPS:
            return noise
        if self.prediction is Prediction.X0:
            return x0
        a = diffusion._extract(diffusion.sqrt_alphas_cumprod, t, x0)
        s = diffusion._extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * noise - s * x0

    def to_x0(self, diffusion, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        if self.prediction is Prediction.EPS:
            return diffusion.predict_x0(x_t, t, pred)
        if self.prediction is Prediction.X0:
            return pred
        a = diffusion._extract(diffusion.sqrt_alphas_cumprod, t, x_t)
        s = diffusion._extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_t)
        return a * x_t - s * pred

    def to_eps(self, diffusion, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        if self.prediction is Prediction.EPS:
            return pred
        a = diffusion._extract(diffusion.sqrt_alphas_cumprod, t, x_t)
        s = diffusion._extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction is Prediction.V:
            return s * x_t + a * pred
        return (x_t - a * pred) / s

    def eps_x0(self, diffusion, model_out: Tensor, x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """(eps, x_0) predictions, unclamped (DDIM's inputs)."""
        pred, _ = self.split(model_out, x_t.shape[1])
        if self.prediction is Prediction.EPS:  # today's ops, in today's order
            return pred, diffusion.predict_x0(x_t, t, pred)
        return self.to_eps(diffusion, x_t, t, pred), self.to_x0(diffusion, x_t, t, pred)

    def fixed_variance_table(self, diffusion) -> Tensor:
        """(T,) sigma_t^2 of a fixed variance, index 0 as improved-diffusion sets it (beta-tilde at
        index 1: the zero posterior variance would make the decoder term infinite)."""
        pv = diffusion.posterior_variance
        if self.variance is Variance.FIXED_LARGE:
            return torch.cat([pv[1:2], diffusion.betas[1:]])
        if self.variance is Variance.FIXED_SMALL:
            return torch.cat([pv[1:2], pv[1:]])
        raise ValueError("a learned variance has no fixed table")

    def log_variance(self, diffusion, x_t: Tensor, t: Tensor, var_values: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(variance, log variance) of p(x_{t-1} | x_t)."""
        if not self.learned_variance:
            table = self.fixed_variance_table(diffusion)
            var = diffusion._extract(table, t, x_t)
            return var, diffusion._extract(torch.log(table), t, x_t)
        min_log = diffusion._extract(diffusion.posterior_log_variance_clipped, t, x_t)
        max_log = diffusion._extract(torch.log(diffusion.betas), t, x_t)
        frac = (var_values + 1) / 2  # v in [-1, 1] spans [beta-tilde_t, beta_t]
        log_var = frac * max_log + (1 - frac) * min_log
        return torch.exp(log_var), log_var

    def p_mean_variance(self, diffusion, model_out: Tensor, x_t: Tensor, t: Tensor,
                        clip_denoised: bool = False) -> MeanVariance:
        """p(x_{t-1} | x_t): mean = posterior mean at the x_0 prediction (clamped to [-1, 1] when
        `clip_denoised`), variance from diffusion.variance."""
        pred, var_values = self.split(model_out, x_t.shape[1])
        var, log_var = self.log_variance(diffusion, x_t, t, var_values)
        if self.prediction is Prediction.EPS and not clip_denoised:
            # The DDPM paper's form, the pre-objective sampler's exact ops.
            x0 = diffusion.predict_x0(x_t, t, pred)
            mean = diffusion._extract(diffusion.sqrt_recip_alphas, t, x_t) * (
                x_t - diffusion._extract(diffusion.eps_coef, t, x_t) * pred)
        else:
            x0 = self.to_x0(diffusion, x_t, t, pred)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            mean, _ = diffusion.posterior(x0, x_t, t)
        return MeanVariance(mean=mean, variance=var, log_variance=log_var, x0=x0)

    # ----------------------------------------------------------------------- the loss

    def snr_weight(self, diffusion, t: Tensor) -> Tensor:
        """(B,) float64 min-SNR-gamma weight (Hang et al. 2023) of this parameterisation's MSE.

        The paper weights the x_0-space error by min(SNR_t, gamma); since ||eps err||^2 = SNR ||x_0 err||^2
        and ||v err||^2 = (SNR + 1) ||x_0 err||^2, the same weight is min(SNR, gamma) / SNR for eps
        (written min(1, gamma / SNR): 1, not 0/0, at SNR = 0), min(SNR, gamma) for x0 and
        min(SNR, gamma) / (SNR + 1) for v.
        """
        abar = diffusion.alphas_cumprod[t]
        snr = abar / (1.0 - abar)  # 0 at a zero-terminal-SNR last step; abar < 1 always
        gamma = float(self.snr_gamma)
        if gamma <= 0:
            return torch.ones_like(snr)  # off
        if self.prediction is Prediction.EPS:
            return torch.clamp(gamma / snr, max=1.0)  # gamma / 0 = inf -> 1
        clipped = torch.clamp(snr, max=gamma)
        return clipped if self.prediction is Prediction.X0 else clipped / (snr + 1.0)

    def loss_terms(self, diffusion, model, x0: Tensor, t: Tensor, noise: Tensor) -> dict:
        """Per-sample parts of the loss, float32 (B,): 'mse' (weighted when snr_gamma > 0),
        'vb' (L_t in bits/dim; with hybrid the mean is detached) and 'loss'."""
        x_t = diffusion.q_sample(x0, t, noise)
        out = model(x_t, t).float()
        pred, var_values = self.split(out, x0.shape[1])
        terms = {}
        if self.loss is not Loss.VLB:
            mse = mean_flat((self.target(diffusion, x0.float(), t, noise.float()) - pred) ** 2)
            if self.snr_gamma > 0:
                mse = mse * self.snr_weight(diffusion, t).float()
            terms["mse"] = mse
        if self.loss is not Loss.SIMPLE:
            x0f, x_tf = x0.float(), x_t.float()
            mean_out = pred.detach() if self.loss is Loss.HYBRID else pred
            frozen = torch.cat([mean_out, var_values], dim=1) if var_values is not None else mean_out
            p = self.p_mean_variance(diffusion, frozen, x_tf, t, clip_denoised=False)
            vb = vb_term_bpd(diffusion, x0f, x_tf, t, p.mean, p.log_variance)
            scale = diffusion.num_timesteps * (self.hybrid_lambda if self.loss is Loss.HYBRID else 1.0)
            terms["vb"] = vb
            terms["loss"] = terms.get("mse", 0.0) + scale * vb
        else:
            terms["loss"] = terms["mse"]
        return terms

    def compute_loss(self, diffusion, model, x0: Tensor, t: Tensor, noise: Tensor,
                     weights: Optional[Tensor] = None, per_sample: bool = False) -> LossTerms:
        """The training loss of one micro batch. `weights` (B,): importance weights of the timestep
        sampler (None: uniform). `per_sample`: also return the (B,) losses a loss-aware sampler needs."""
        if self.is_default and weights is None and not per_sample:
            # The pre-objective code's exact ops: one MSE over every element, in float32.
            x_t = diffusion.q_sample(x0, t, noise)  # (B, C, H, W)
            pred = model(x_t, t)  # (B, C, H, W)
            return LossTerms(F.mse_loss(pred.float(), noise.float()), None)
        losses = self.loss_terms(diffusion, model, x0, t, noise)["loss"]  # (B,)
        weighted = losses * weights.to(losses.dtype) if weights is not None else losses
        return LossTerms(weighted.mean(), losses.detach())
