"""Timestep samplers (`diffusion.timestep_sampler`): which t each training sample gets.

uniform            t ~ U{0..T-1}, drawn exactly as the pre-objective code drew it.
loss_second_moment improved-diffusion's LossSecondMomentResampler (Nichol and Dhariwal 2021, sec. 3.3):
                   p_t proportional to sqrt(E[L_t^2]) over the last `history_per_term` losses seen at t,
                   mixed with `uniform_prob` of the uniform distribution; uniform until every t has a full
                   history. Each loss is multiplied by the importance weight 1 / (T p_t), so the
                   objective's expectation is unchanged and only its variance drops.

The loss history is training state: `state_dict()` / `load_state_dict()` go into the checkpoint.
Every rank must draw from the same weights, so every rank calls `update(ts, losses)` with the same
all-gathered values in the same order (the Trainer gathers them); the update is deterministic, so the
histories stay identical without ever being communicated. Each rank still draws its own t with its own
generator (different samples, same distribution).
"""
from __future__ import annotations

import enum
from typing import Optional, Tuple, Union

import torch
from torch import Tensor


class TimestepSamplerKind(str, enum.Enum):
    UNIFORM = "uniform"
    LOSS_SECOND_MOMENT = "loss_second_moment"


class UniformSampler:
    """t ~ U{0..T-1}; importance weights None (all 1)."""

    loss_aware = False

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def weights(self) -> Tensor:
        return torch.ones(self.num_timesteps, dtype=torch.float64)

    def sample(self, diffusion, batch_size: int, device: Union[str, torch.device],
               generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Optional[Tensor]]:
        # The same call, and so the same draws, as before timestep samplers existed.
        return diffusion.sample_timesteps(batch_size, device, generator=generator), None

    def update(self, ts: Tensor, losses: Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossSecondMomentSampler:
    """Importance sampling of t by the root mean square of recent per-t losses (see module doc)."""

    loss_aware = True

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        if history_per_term < 1 or not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"need history_per_term >= 1 and uniform_prob in [0, 1], got "
                             f"{history_per_term}, {uniform_prob}")
        self.num_timesteps = num_timesteps
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64)  # (T, H)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.int64)  # (T,) entries filled, <= H

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> Tensor:
        """(T,) float64 sampling probabilities (sum 1 once warmed up; all ones before)."""
        if not self.warmed_up():
            return torch.ones(self.num_timesteps, dtype=torch.float64)
        w = self.loss_history.pow(2).mean(dim=-1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, diffusion, batch_size: int, device: Union[str, torch.device],
               generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """(t int64 (B,), importance weights 1 / (T p_t) float32 (B,)) on `device`."""
        p = self.weights()
        p = p / p.sum()
        dev = generator.device if generator is not None else torch.device(device)
        t = torch.multinomial(p.to(dev), batch_size, replacement=True, generator=generator).to(device)
        w = (1.0 / (self.num_timesteps * p.to(t.device)[t])).float()
        return t, w

    def update(self, ts: Tensor, losses: Tensor) -> None:
        """Record losses (float, detached) seen at timesteps ts: the same values, in the same order, on
        every rank. A full history drops its oldest entry."""
        H = self.history_per_term
        for t, loss in zip(ts.tolist(), losses.double().tolist()):
            n = int(self.loss_counts[t])
            if n == H:
                self.loss_history[t, :-1] = self.loss_history[t, 1:].clone()
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, n] = loss
                self.loss_counts[t] = n + 1

    def digest(self) -> Tensor:
        """(2,) float64 fingerprint of the state, to check cheaply that ranks agree."""
        flat = torch.cat([self.loss_history.flatten(), self.loss_counts.double()])
        return torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()])

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone(),
                "history_per_term": self.history_per_term, "uniform_prob": self.uniform_prob}

    def load_state_dict(self, state: dict) -> None:
        history = torch.as_tensor(state["loss_history"], dtype=torch.float64)
        if tuple(history.shape) != (self.num_timesteps, self.history_per_term):
            raise ValueError(f"timestep sampler state has shape {tuple(history.shape)}, this run needs "
                             f"({self.num_timesteps}, {self.history_per_term})")
        self.loss_history = history.clone()
        self.loss_counts = torch.as_tensor(state["loss_counts"], dtype=torch.int64).clone()


def build_timestep_sampler(kind: Union[str, TimestepSamplerKind], num_timesteps: int):
    kind = TimestepSamplerKind(kind)
    if kind is TimestepSamplerKind.UNIFORM:
        return UniformSampler(num_timesteps)
    return LossSecondMomentSampler(num_timesteps)
