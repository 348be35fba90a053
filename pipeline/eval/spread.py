"""Sharing work over ranks: which sample indices a rank takes, and gathering results in index order.

Rank r of W takes the indices r, r + W, r + 2W, ... of 0..N-1. Results travel as Python objects
(numpy arrays) through accelerate's `gather_object` / `broadcast_object_list`, which use the
process group the runtime set up (gloo on CPU, NCCL on GPUs); one process needs none of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks, and the two collectives the evaluation needs."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, n: int) -> np.ndarray:
        """This rank's share of 0..n-1 (int64, increasing)."""
        return np.arange(self.rank, n, self.world_size, dtype=np.int64)

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank (a collective)."""
        if self.world_size == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a collective)."""
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def gather_rows(self, rows: np.ndarray, n: int) -> np.ndarray:
        """Stack every rank's rows (this rank's are those of `indices(n)`) into index order 0..n-1."""
        parts = self.gather(np.ascontiguousarray(rows))
        out = np.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
        for rank, part in enumerate(parts):
            out[rank::self.world_size] = part
        return out


def ranks_of(state) -> Ranks:
    """Ranks from an accelerate `PartialState`/`Accelerator` (anything with process_index and
    num_processes)."""
    return Ranks(rank=int(state.process_index), world_size=int(state.num_processes))
