"""Inception pool features of uint8 images, in batches, under no_grad, with a progress bar."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from pipeline.eval.network import FEATURE_DIM
from pipeline.eval.resize import to_network_input


@torch.no_grad()
def extract_features(net, images: torch.Tensor | np.ndarray, *, batch_size: int = 64,
                     device: torch.device | str = "cpu", progress: bool = False,
                     desc: str = "features") -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 (N, 2048). Each image's features depend on it alone (the
    network is in eval mode), so any batch size gives the same rows up to float rounding."""
    images = torch.as_tensor(images)
    out = np.empty((images.shape[0], FEATURE_DIM), dtype=np.float32)
    for start, batch in _batches(images, batch_size, progress, desc):
        x = to_network_input(batch.to(device))
        out[start:start + batch.shape[0]] = net(x).float().cpu().numpy()
    return out


def _batches(images: torch.Tensor, batch_size: int, progress: bool, desc: str) -> Iterable:
    starts = range(0, images.shape[0], batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=images.shape[0], desc=desc, unit="img")
    for start in starts:
        batch = images[start:start + batch_size]
        yield start, batch
        if bar is not None:
            bar.update(batch.shape[0])
    if bar is not None:
        bar.close()
