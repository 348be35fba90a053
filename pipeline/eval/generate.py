"""Generated images for evaluation: sample i is a function of (seed, i) only.

Uses the package's samplers with an `IndexedNoise` as their noise source, so a rank that takes
indices r, r + W, ... produces exactly the rows a single process would have produced there, in any
batch size, up to the floating-point rounding of the model's batched kernels (none on the CPU
kernels checked in tests/unit/test_eval_spread.py).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipeline.eval.noise import SAMPLING, IndexedNoise

SAMPLERS = ("ddim", "ddpm")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model output in [-1, 1] -> uint8, as ddpm-sample quantises it."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def generate(model, diffusion, indices: Sequence[int], *, channels: int, image_size: int,
             sampler: str = "ddim", steps: int = 100, seed: int = 0, batch_size: int = 64,
             device: torch.device | str = "cpu", progress: bool = False) -> np.ndarray:
    """uint8 (len(indices), C, H, W) samples, sample k drawn from the noise of ``indices[k]``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (use ddim or ddpm)")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    diffusion = diffusion.to(device)
    indices = [int(i) for i in indices]
    out = np.empty((len(indices), channels, image_size, image_size), dtype=np.uint8)
    bar = _bar(len(indices), progress)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        shape = (len(chunk), channels, image_size, image_size)
        noise = IndexedNoise(seed, chunk, stream=SAMPLING, device=device)
        if sampler == "ddpm":
            x = diffusion.p_sample_loop(model, shape, device=device, clip_denoised=True, noise_fn=noise)
        else:
            x = diffusion.ddim_sample_loop(model, shape, steps, device=device, clip_denoised=True,
                                           noise_fn=noise)
        out[start:start + len(chunk)] = to_uint8(x).cpu().numpy()
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return out


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="img")
