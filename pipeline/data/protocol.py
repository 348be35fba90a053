"""What a batch source implements: the contract between the Trainer and the data it trains on.

`pipeline.data.loader.BatchLoader` (WebDataset tar shards) implements it; a new source (an image
folder, another shard format) implements the same methods and the Trainer needs no change. The
Trainer registers `state_dict` and `resume` as the checkpoint's per-rank "data" part.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchSource(Protocol):
    """An endless iterator of one rank's uint8 batches, (micro_batch_size, C, H, W), that can say
    where it is and continue from there."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches in order; never ends (epochs follow one another inside the source). Raises
        `pipeline.errors.DataError` (one line naming the shard) when the data cannot go on."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This rank's position after the last batch handed out: plain Python values and tensors
        only (it is saved with `torch.save` and loaded with `weights_only=True`)."""
        ...

    def resumes_exactly(self, state: dict[str, Any]) -> bool:
        """Whether `state` (one rank's) was saved by this rank with the same layout (world size,
        workers), so that loading it continues with exactly the next batch."""
        ...

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from one rank's own state (exact), or from every saved rank's states (a list,
        indexed by saved rank): the unread rest of the epoch is re-dealt to this layout, so every
        sample is still seen once per epoch after a change of world size."""
        ...

    def resume(self, mine: dict[str, Any] | None, every_rank: Callable[[], list[dict[str, Any]]]) -> bool:
        """Pick between the two forms of `load_state_dict` (this is where a source decides whether
        a re-deal is needed); returns whether the resume is exact."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters logged as data/NAME (skipped samples, failed shards...); may be empty."""
        ...

    def close(self) -> None:
        """Stop any worker processes."""
        ...
