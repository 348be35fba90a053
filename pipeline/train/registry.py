"""What a checkpoint holds, declared once: a registry of stateful parts.

Each part has a name, a kind (where and by whom it is stored), a getter and a setter. Saving,
loading and the "restored ..." log line are all derived from the registry, so they cannot
diverge; adding state to the checkpoint is one `register` call (the spirit of torchtitan's
`CheckpointManager(states=...)` and EDM2's `CheckpointIO(...)`).

Kinds and their files (the atomic protocol is `pipeline.ckpt.checkpointer`'s):

    TENSORS     NAME.safetensors, written by rank 0 (model and EMA weights)
    OBJECT      NAME.pt, written by rank 0 (tensors and plain containers; loaded weights_only)
    JSON        the key NAME of train_state.json, written by rank 0 (counters, schedules); the
                registry adds "world_size" itself
    RANK        the key NAME of rank-RRRRR.pt, written by every rank (RNG, data position)
    COLLECTIVE  files every rank writes into the checkpoint together (a DeepSpeed engine)

Loading reads every part before applying any, so a rank whose read fails is left as it was and
the checkpointer can fall back to an older checkpoint.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.ckpt import checkpointer as ckpt_io
from pipeline.ckpt.checkpointer import Checkpointer
from pipeline.errors import CheckpointError

log = logging.getLogger("pipeline.train")


class Kind(enum.Enum):
    TENSORS = "tensors"
    OBJECT = "object"
    JSON = "json"
    RANK = "rank"
    COLLECTIVE = "collective"


@dataclass
class RankStates:
    """What a RANK part loads: this rank's saved value when the world size is unchanged (else None),
    and a way to read every saved rank's value (for a re-deal after a change of world size)."""
    mine: Any
    every_rank: Callable[[], list[Any]]


@dataclass
class Part:
    name: str
    kind: Kind
    get: Callable[[], Any]
    """The value to save (for COLLECTIVE: a function of the temporary checkpoint directory)."""
    set: Callable[[Any], None]
    """Apply a loaded value (TENSORS/OBJECT/JSON: the value; RANK: `RankStates`; COLLECTIVE: the
    checkpoint directory)."""
    describe: Callable[[], str | None] = lambda: None
    """After a load: how the restored part reads in the log line (None: leave it out)."""
    optional: bool = False
    """A checkpoint without this part still loads (a part added after the checkpoint was written):
    `set` is not called and the part keeps its fresh state."""


@dataclass
class CheckpointRegistry:
    parts: list[Part] = field(default_factory=list)
    checks: list[Callable[[Path], None]] = field(default_factory=list)

    def register(self, name: str, kind: Kind, get: Callable[[], Any], set: Callable[[Any], None], *,
                 describe: Callable[[], str | None] | None = None, optional: bool = False) -> None:
        if any(p.name == name and p.kind is kind for p in self.parts):
            raise ValueError(f"checkpoint part {name!r} ({kind.value}) is registered twice")
        self.parts.append(Part(name, kind, get, set, describe or (lambda: name), optional))

    def check(self, fn: Callable[[Path], None]) -> None:
        """`fn(ckpt)` runs before a load and raises to refuse the checkpoint (e.g. a format mismatch)."""
        self.checks.append(fn)

    def _of(self, kind: Kind) -> list[Part]:
        return [p for p in self.parts if p.kind is kind]

    # -- saving ---------------------------------------------------------------------------------

    def save(self, checkpointer: Checkpointer, step: int) -> Path:
        """Write every part into one complete checkpoint for `step` (every rank calls this)."""
        collective = self._of(Kind.COLLECTIVE)

        def write_collective(tmp: Path) -> None:
            for part in collective:
                part.get()(tmp)

        is_writer = checkpointer.rank == 0  # shared parts: only rank 0 builds (and copies) them
        return checkpointer.save(
            step,
            weights={p.name: p.get() for p in self._of(Kind.TENSORS)} if is_writer else {},
            objects={p.name: p.get() for p in self._of(Kind.OBJECT)} if is_writer else {},
            # The saving world size decides, at load, whether each rank's own RANK parts apply.
            train_state={**{p.name: p.get() for p in self._of(Kind.JSON)}, "world_size": checkpointer.world_size}
            if is_writer else {},
            rank_state={p.name: p.get() for p in self._of(Kind.RANK)},
            collective=write_collective if collective else None)

    # -- loading --------------------------------------------------------------------------------

    def load(self, ckpt: Path, rank: int, world_size: int) -> str:
        """Load every part from `ckpt`; returns the "restored ..." text for the log line."""
        for fn in self.checks:
            fn(ckpt)
        train_state = ckpt_io.read_train_state(ckpt)
        mine_file = ckpt / ckpt_io.rank_file(rank)
        same_world = train_state.get("world_size") == world_size and mine_file.is_file()
        mine = ckpt_io.read_object(ckpt, mine_file.name) if same_world else None
        saved_world = int(train_state.get("world_size", 1))
        every_rank_cache: list[dict] = []

        def every_rank() -> list[dict]:
            if not every_rank_cache:
                every_rank_cache.extend(ckpt_io.read_object(ckpt, ckpt_io.rank_file(r)) for r in range(saved_world))
            return every_rank_cache

        # Read everything first: a failure here leaves this rank's state untouched.
        values: dict[int, Any] = {}
        for i, part in enumerate(self.parts):
            if part.kind is Kind.TENSORS:
                present = (ckpt / f"{part.name}.safetensors").is_file()
                value = ckpt_io.read_weights(ckpt, part.name) if present else None
            elif part.kind is Kind.OBJECT:
                present = (ckpt / f"{part.name}.pt").is_file()
                value = ckpt_io.read_object(ckpt, f"{part.name}.pt") if present else None
            elif part.kind is Kind.JSON:
                present = part.name in train_state
                value = train_state.get(part.name)
            elif part.kind is Kind.RANK:
                present = mine is None or part.name in mine
                name = part.name
                value = RankStates(mine[name] if mine is not None else None,
                                   lambda name=name: [r.get(name) for r in every_rank()])
                if mine is None and not all(name in r for r in every_rank()):
                    present = False
            else:
                present, value = True, ckpt
            if not present:
                if part.optional:
                    continue
                raise CheckpointError(f"{ckpt} holds no '{part.name}' ({part.kind.value}); it was "
                                              f"written by a run without this state")
            values[i] = value
        for i, value in values.items():
            self.parts[i].set(value)
        restored = [self.parts[i].describe() for i in values]
        return ", ".join(r for r in restored if r)
