"""Bits/dim of held-out images, spread over ranks, and its breakdown.

The terms come from `pipeline.diffusion.vlb.bpd_terms` (improved-diffusion's `calc_bpd_loop`: all
T terms per image, fresh noise per term, data in [-1, 1], bins of width 2/255): for each image,
the prior KL(q(x_T | x_0) || N(0, I)), the decoder NLL (``terms[:, 0]``) and the KL terms
``terms[:, t]`` for t = 1..T-1, in bits per dimension; ``total`` is their sum. Image i's noise comes
from its own generator (`pipeline.eval.noise`, stream BPD), so the numbers do not depend on how the
images are split over ranks or batches.

The report gives the mean over images of the total, the prior, the decoder and the KL terms summed
per timestep quarter (t in [qT/4, (q+1)T/4), t >= 1), which add up to the total, plus the mean
of every term, so a plot of L_t over t can be drawn from the JSON.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.eval.noise import BPD, IndexedNoise

# (x0 (B, C, H, W) in [-1, 1], noise_fn) -> object with prior (B,), terms (B, T), total (B,) in bits/dim;
# noise_fn(t, shape) is `pipeline.diffusion.vlb.NoiseFn`: the eps of term t for the whole batch.
BpdFn = Callable[[torch.Tensor, Callable], object]


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1], as the trainer scales its data."""
    return torch.as_tensor(images).float() / 127.5 - 1.0


def bpd_rows(bpd_fn: BpdFn, images: np.ndarray, indices: Sequence[int], *, seed: int,
             batch_size: int = 64, device: torch.device | str = "cpu",
             progress: bool = False) -> np.ndarray:
    """float64 (len(indices), T + 2): per image [total, prior, terms_0..terms_{T-1}]."""
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc="bits/dim", unit="img")
    for start in range(0, len(indices), batch_size):
        chunk = [int(i) for i in indices[start:start + batch_size]]
        x0 = to_model_range(images[start:start + len(chunk)]).to(device)
        noise = IndexedNoise(seed, chunk, stream=BPD, device=device)
        with torch.no_grad():
            # Each image's generator yields its terms' eps in the order bpd_terms asks for them
            # (t = T-1 down to 0), so t itself is not needed to key the draw.
            out = bpd_fn(x0, lambda t, shape: noise(shape))
        rows.append(torch.cat([out.total[:, None], out.prior[:, None], out.terms], dim=1)
                    .double().cpu().numpy())
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return np.concatenate(rows) if rows else np.empty((0, 0))


def bpd_report(rows: np.ndarray) -> dict:
    """The numbers of the result JSON from all images' rows (see `bpd_rows`)."""
    total, prior, terms = rows[:, 0], rows[:, 1], rows[:, 2:]
    num_timesteps = terms.shape[1]
    quarter = np.arange(num_timesteps) * 4 // num_timesteps  # (T,) in 0..3
    kl = terms.copy()
    kl[:, 0] = 0.0  # the decoder is reported on its own
    report = {
        "bpd": float(total.mean()),
        "bpd_std_err": float(total.std(ddof=1) / np.sqrt(len(total))) if len(total) > 1 else None,
        "prior": float(prior.mean()),
        "decoder": float(terms[:, 0].mean()),
    }
    for q in range(4):
        report[f"kl_q{q}"] = float(kl[:, quarter == q].sum(axis=1).mean())
    report["terms_mean"] = terms.mean(axis=0).tolist()
    return report


def make_bpd_fn(model, diffusion, cfg) -> BpdFn:
    """The bits/dim terms of a batch with this model: `pipeline.diffusion.vlb.bpd_terms`, with the
    predicted x_0 clipped to [-1, 1] as improved-diffusion's image_nll.py does by default."""
    from pipeline.diffusion.vlb import bpd_terms

    def bpd_fn(x0: torch.Tensor, noise_fn) -> object:
        return bpd_terms(model, diffusion, None, x0, noise_fn=noise_fn, clip_denoised=True)

    return bpd_fn
