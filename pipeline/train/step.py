"""One optimizer step: the micro-batch loop, clipping, the step itself, LR schedule and EMA.

The training loop feeds it micro batches from the data stream; tests feed it fixed tensors, which is
how "2 ranks x B == 1 rank x 2B == 1 rank x B x 2 accumulation steps" is checked.

Two gradient paths, numerically the same step:
- Accelerate (one process, DDP): loss / accum_steps per micro batch, `no_sync` on all but the last
  (no all-reduce until the gradients are complete), then clip and step here.
- DeepSpeed ZeRO-1/2: the engine owns accumulation. Its `backward` already divides by its
  gradient_accumulation_steps (= train.grad_accum_steps, dsconfig), so the loss goes in unscaled;
  the accumulation boundary is set explicitly on the last micro batch, where the engine reduces,
  clips (gradient_clipping = optim.grad_clip), steps and zeroes the gradients.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class MicroBatch:
    x0: torch.Tensor
    """(B, C, H, W) clean images in [-1, 1]."""
    t: torch.Tensor
    """(B,) int64 timesteps."""
    noise: torch.Tensor
    """(B, C, H, W) the eps that q_sample adds."""


@dataclass
class StepResult:
    loss: torch.Tensor
    """Mean loss of this rank's micro batches (0-dim, detached, not yet averaged across ranks)."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping (0-dim)."""
    applied: bool
    """False when fp16 loss scaling skipped the step (LR schedule and EMA then stay as they were)."""


class _CastInputs(torch.nn.Module):
    """Calls `model(x.to(dtype), t)`: under DeepSpeed bf16/fp16 the module's weights are cast and
    Accelerate's autocast does not apply, so fp32 inputs would not match them."""

    def __init__(self, model, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x, t):
        return self.model(x.to(self.dtype), t)


def optimizer_step(acc, model, net: torch.nn.Module, optimizer, diffusion, micro_batches: Iterable[MicroBatch],
                   accum_steps: int, grad_clip: float, scheduler=None, ema=None,
                   input_dtype: torch.dtype | None = None) -> StepResult:
    """Forward and backward over `accum_steps` micro batches, then one optimizer step, then the LR
    schedule and EMA if the step was applied. `model` is what `acc.prepare` returned, `net` the
    unwrapped module (EMA source, clipping); `grad_clip` 0 disables clipping."""
    engine = getattr(acc, "deepspeed_engine_wrapped", None)
    forward = _CastInputs(model, input_dtype) if input_dtype is not None else model
    loss_sum = None
    n = 0
    for micro, mb in enumerate(micro_batches):
        last = micro == accum_steps - 1
        if engine is not None:
            # Boundary on the last micro batch only: there the engine reduces, clips, steps, zeroes.
            loss = diffusion.loss(forward, mb.x0, mb.t, mb.noise)
            engine.backward(loss, sync_gradients=last)
        else:
            with contextlib.nullcontext() if last else acc.no_sync(model):
                loss = diffusion.loss(forward, mb.x0, mb.t, mb.noise)
                acc.backward(loss / accum_steps)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        n += 1
    if n != accum_steps:
        raise ValueError(f"optimizer_step got {n} micro batches, expected accum_steps={accum_steps}")

    if engine is not None:
        raw = engine.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float(raw) if raw is not None else float("nan"))
        applied = bool(engine.engine.was_step_applied())
    else:
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(net.parameters(), max_norm).detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        applied = not (acc.scaler is not None and acc.optimizer_step_was_skipped)
    if applied:
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update()
    return StepResult(loss=loss_sum / n, grad_norm=grad_norm, applied=applied)
