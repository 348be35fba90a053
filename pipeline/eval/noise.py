"""Noise keyed to the sample index, so N samples are the same whatever the world or batch size.

Sample i draws all its noise (the initial x_T and every sampler step's z; or every bits/dim term's
eps) from its own CPU generator seeded by (seed, stream, i) alone. A batch's noise is the stack
of its samples' next draws; drawing on the CPU and copying makes it the same on any device too.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SAMPLING = 0
"""Stream of the sampler's noise (x_T and the per-step z)."""
BPD = 1
"""Stream of the bits/dim terms' noise (one eps per term)."""


def index_seed(seed: int, stream: int, index: int) -> int:
    """A 64-bit seed for sample `index`: numpy's SeedSequence hash of (seed, stream, index), so
    neighbouring indices get unrelated streams."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


class IndexedNoise:
    """``noise(shape)`` -> N(0, I) of `shape`, row b drawn from sample ``indices[b]``'s generator.

    Successive calls continue each sample's own sequence, so every sample sees the same draws in
    the same order whichever batch it is in. The step argument some callers pass is ignored: the
    draws are already in step order.
    """

    def __init__(self, seed: int, indices: Sequence[int], *, stream: int = SAMPLING,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.indices = [int(i) for i in indices]
        self.generators = [torch.Generator(device="cpu").manual_seed(index_seed(seed, stream, i))
                           for i in self.indices]
        self.device, self.dtype = torch.device(device), dtype

    def __call__(self, shape: Sequence[int], step: int | None = None) -> torch.Tensor:
        shape = tuple(shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {shape[0]} asked of {len(self.generators)} samples")
        rows = [torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)
