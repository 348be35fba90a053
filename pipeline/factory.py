"""What a config builds: the model, the diffusion process, the optimizer and its LR schedule.

Train, sample, export, eval and bench all build through here, so a run directory's config means
the same network everywhere. Nothing here imports the training loop or the data stack.
"""
from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.diffusion import Diffusion, make_betas
from pipeline.models.unet import UNet


def build_model(cfg: Config) -> UNet:
    return UNet.from_config(cfg.model, image_size=cfg.data.image_size, channels=cfg.data.channels)


def build_diffusion(cfg: Config) -> Diffusion:
    d = cfg.diffusion
    return Diffusion(make_betas(d.beta_schedule, d.timesteps, d.beta_start, d.beta_end))


def lr_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warm-up, then constant."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def build_optimizer(cfg: Config, params, device: torch.device):
    """(AdamW, its LR schedule). Fused AdamW on CUDA only (the CPU kernel is slower here)."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                  weight_decay=o.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, o.warmup_steps))
    return optimizer, scheduler


def count_flops_per_image(cfg: Config) -> float:
    """Forward + backward FLOPs of one image, counted on the meta device (no compute, no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_model(cfg)
        x = torch.zeros(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        net(x, t).sum().backward()
    return float(counter.get_total_flops())
