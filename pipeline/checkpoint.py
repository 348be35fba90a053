"""Atomic checkpoints: a directory per save, complete or invisible.

Layout (CONTRACT.md):
    RUN_DIR/checkpoints/step-NNNNNNNN/   model.safetensors, ema.safetensors, optimizer.pt,
                                         train_state.json, rank-00000.pt ..., MANIFEST.json (last)
    RUN_DIR/checkpoints/latest           the name of the newest complete checkpoint

A save writes into `.tmp-step-NNNNNNNN/`, every rank adds its own file (RNG and data position),
rank 0 writes MANIFEST.json (file sizes) and renames the directory into place, then replaces
`latest`. A kill at any moment leaves either the previous checkpoint or the new one. Loading never
runs code from a file: weights are safetensors and the rest is `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("pipeline.checkpoint")

MANIFEST = "MANIFEST.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """No checkpoint could be loaded although some exist (a user-facing, one-line message)."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _state_to_cpu(sd: dict) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone to plain contiguous CPU tensors.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


class Checkpointer:
    """Saves and finds checkpoints under `run_dir/checkpoints`. Every rank calls `save`."""

    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, world_size: int,
                 barrier: Callable[[], None]):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, *, weights: dict[str, dict[str, torch.Tensor]], objects: dict[str, Any],
             train_state: dict, rank_state: dict) -> Path:
        """Write one complete checkpoint for `step`.

        weights: name -> state dict of tensors, saved as `name.safetensors` by rank 0.
        objects: name -> picklable state of plain types/tensors (optimizer...), `name.pt` by rank 0.
        train_state: JSON-able dict (step, images_seen, ...), by rank 0.
        rank_state: this rank's RNG and data position, by every rank.
        """
        final = self.dir / step_name(step)
        tmp = self.dir / f".tmp-{step_name(step)}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save that was killed
            tmp.mkdir()
        self.barrier()
        torch.save(rank_state, tmp / rank_file(self.rank))
        _fsync_file(tmp / rank_file(self.rank))
        if self.rank == 0:
            for name, sd in weights.items():
                save_file(_state_to_cpu(sd), tmp / f"{name}.safetensors")
            for name, obj in objects.items():
                torch.save(obj, tmp / f"{name}.pt")
            (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
        self.barrier()
        if self.rank == 0:
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            for p in files:
                _fsync_file(p)
            manifest = {"step": step, "world_size": self.world_size,
                        "files": {p.name: p.stat().st_size for p in files}}
            _write_atomic_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            if final.exists():  # the same step saved again (e.g. a final save after a resume)
                old = self.dir / f".old-{step_name(step)}"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                shutil.rmtree(old)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            _write_atomic_text(self.dir / LATEST, final.name + "\n")
            self._rotate(keep=final.name)
        self.barrier()
        return final

    def _rotate(self, keep: str) -> None:
        complete = [p for p in self.complete_checkpoints() if p.name != keep]
        for old in complete[: max(0, len(complete) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- finding and loading --------------------------------------------------------------------

    def all_checkpoints(self) -> list[Path]:
        """Checkpoint directories, oldest first (complete or not)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("step-*") if p.is_dir())

    def complete_checkpoints(self) -> list[Path]:
        return [p for p in self.all_checkpoints() if verify(p) is None]

    def candidates(self) -> list[Path]:
        """Where to resume from, best first: the one `latest` names, then the others newest first."""
        found = list(reversed(self.all_checkpoints()))
        latest = self.dir / LATEST
        if latest.is_file():
            named = self.dir / latest.read_text().strip()
            if named in found:
                found.remove(named)
                found.insert(0, named)
        return found


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint directory is complete, else why not (one line)."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable MANIFEST.json ({e})"
    for name, size in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"missing file {name}"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def read_weights(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(ckpt / f"{name}.safetensors")


def read_object(ckpt: Path, name: str) -> Any:
    # weights_only=True: a checkpoint can carry tensors and plain containers, never code.
    return torch.load(ckpt / name, map_location="cpu", weights_only=True)


def read_train_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "train_state.json").read_text())


def newest_loadable(checkpointer: Checkpointer, load: Callable[[Path], None]) -> Path | None:
    """Call `load(ckpt)` on the best candidate that verifies and loads; fall back to older ones.

    Returns None when there are no checkpoints at all; raises CheckpointError when some exist
    but none loads (never a silent start from scratch).
    """
    tried = []
    for ckpt in checkpointer.candidates():
        problem = verify(ckpt)
        if problem is None:
            try:
                load(ckpt)
                return ckpt
            except Exception as e:  # noqa: BLE001 - any failure means "try the previous one"
                problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("checkpoint %s is not usable: %s; trying an older one", ckpt, problem)
        tried.append(f"{ckpt.name} ({problem})")
    if tried:
        raise CheckpointError(f"{checkpointer.dir}: checkpoints exist but none can be loaded: "
                              + "; ".join(tried) + ". Move them aside to start from scratch.")
    return None
