"""Images from a trained network: batches of the DDPM or DDIM sampler as uint8."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample_images(model, diffusion, num: int, channels: int, image_size: int, *, sampler: str = "ddim",
                  steps: int = 100, seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 256,
                  progress: bool = False) -> torch.Tensor:
    """`num` samples as uint8 (N, C, H, W) on the CPU; the same seed gives the same images."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, num, batch_size):
        shape = (min(batch_size, num - start), channels, image_size, image_size)
        if sampler == "ddpm":
            x = diffusion.p_sample_loop(model, shape, generator=generator, device=device, progress=progress,
                                        clip_denoised=True)
        elif sampler == "ddim":
            x = diffusion.ddim_sample_loop(model, shape, steps, generator=generator, device=device,
                                           progress=progress, clip_denoised=True)
        else:
            raise ValueError(f"unknown sampler '{sampler}' (use ddpm or ddim)")
        out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    model.train(was_training)
    return torch.cat(out)
