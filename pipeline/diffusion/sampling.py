"""Images from a trained network: batches of the DDPM or DDIM sampler as uint8."""
from __future__ import annotations

from typing import Iterator

import torch


@torch.no_grad()
def sample_images(model, diffusion, num: int, channels: int, image_size: int, *, sampler: str = "ddim",
                  steps: int | None = None, seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 256,
                  progress: bool = False) -> torch.Tensor:
    """`num` samples as uint8 (N, C, H, W) on the CPU; the same seed gives the same images."""
    batches = sample_batches(model, diffusion, num, channels, image_size, sampler=sampler, steps=steps,
                             seed=seed, device=device, batch_size=batch_size, progress=progress)
    return torch.cat([((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu() for x in batches])


def sample_batches(model, diffusion, num: int, channels: int, image_size: int, *, sampler: str = "ddim",
                   steps: int | None = None, seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 256,
                   progress: bool = False) -> Iterator[torch.Tensor]:
    """The sampler's raw output, batch by batch (float, about [-1, 1]), before `sample_images`
    turns it into uint8: what the diffusers export is compared against.

    `steps`: DDIM steps (None: 100), or for DDPM the respaced step count (None: all T steps). The
    model's output is read as the diffusion's objective says (eps / x0 / v, fixed or learned variance).
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, num, batch_size):
        shape = (min(batch_size, num - start), channels, image_size, image_size)
        if sampler == "ddpm":  # (the samplers run under no_grad themselves)
            x = diffusion.p_sample_loop(model, shape, generator=generator, device=device, progress=progress,
                                        clip_denoised=True, steps=steps)
        elif sampler == "ddim":
            x = diffusion.ddim_sample_loop(model, shape, 100 if steps is None else steps, generator=generator,
                                           device=device, progress=progress, clip_denoised=True)
        else:
            raise ValueError(f"unknown sampler '{sampler}' (use ddpm or ddim)")
        yield x
    model.train(was_training)
