"""Atomic checkpoints: a directory per save, complete or invisible.

Layout (CONTRACT.md):
    RUN_DIR/checkpoints/step-NNNNNNNN/   model.safetensors, ema.safetensors, optimizer.pt,
                                         train_state.json, rank-00000.pt ..., MANIFEST.json (last)
    RUN_DIR/checkpoints/latest           the name of the newest complete checkpoint
    Under DeepSpeed ZeRO also   deepspeed/state/...  the engine's own checkpoint (fp32 master weights,
                                         each rank's optimizer partition), written by every rank

A save writes into `.tmp-step-NNNNNNNN/`, every rank adds its own file (RNG and data position) and
fsyncs it, rank 0 writes MANIFEST.json (size and CRC-32 of every file) and renames the directory
into place, then replaces `latest`, then rotates. A kill at any moment leaves either the previous
checkpoint or the new one. Loading never runs code from a file: weights are safetensors, the rest
is JSON or `torch.load(weights_only=True)`, and every rank resumes from the same checkpoint.

Not `accelerate.Accelerator.save_state`: in accelerate 1.15.0 it writes each file straight into the
target directory (checked in its checkpointing.py: no temporary directory, rename or checksum), so a
kill mid-save leaves a half-written directory that nothing tells from a complete one;
tests/system/test_kill.py kills saves and requires the previous checkpoint.

Saving is synchronous: the loop waits while the bytes are written, fsynced and checksummed. For the
35.7M CIFAR-10 model (572 MB with EMA and AdamW) that is about 1.3 s on an H200 host, against 0.6 s to
write and fsync as many bytes in one go; the CRC-32 read-back is about 0.3 s of it (bench/ckpt_speed.py).
A background writer would hide that, but needs a snapshot copy first and has to be joined on every
exit path (end of training, preemption stop, errors) before the process exits or the next save
starts; at a save every few thousand steps the wait is under 1% of training time.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from pipeline.atomic import fsync_dir as _fsync_dir
from pipeline.atomic import write_text_atomic
from pipeline.errors import CheckpointError

log = logging.getLogger("pipeline.checkpoint")

MANIFEST = "MANIFEST.json"
LATEST = "latest"
CORRUPT = "corrupt"  # checkpoints that failed verification, set aside (never deleted)
SUBDIR_ZERO = "deepspeed"  # a DeepSpeed engine's own files (pipeline.ckpt.zero)
BASE_FILES = ("model.safetensors", "ema.safetensors", "train_state.json")  # every checkpoint has these
_CHUNK_BYTES = 16 << 20


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes (about 4 GB/s: a few tenths of a second for a 35.7M-param run)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def _state_to_cpu(sd: dict) -> dict[str, torch.Tensor]:
    """Plain contiguous CPU tensors for safetensors, copying only where needed.

    CPU tensors are written in place (safetensors 0.8 writes from the tensor's memory); GPU ones
    cost one device-to-host copy. safetensors refuses tensors that share memory, so the second
    of two such entries is cloned.
    """
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def _why(e: Exception, where: Path) -> str:
    """An OS error as the user needs it: a full disk or a permission problem says so."""
    import errno

    code = getattr(e, "errno", None)
    text = str(e)
    if code == errno.ENOSPC or "No space left" in text or "unexpected pos" in text:
        return f"the disk holding {where} is full (free space, or lower ckpt.keep_last)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write in {where} ({e.strerror})"
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or text.splitlines()[0] if text else ''}"


def _single_process_agree(ok: bool) -> bool:
    return ok


def _single_process_share(obj: Any) -> Any:
    return obj


class Checkpointer:
    """Saves and finds checkpoints under `run_dir/checkpoints`. Every rank calls `save`.

    barrier: waits for every rank. agree(ok) -> True when `ok` is True on every rank.
    share(obj) -> rank 0's `obj`, on every rank. The defaults suit a single process.
    """

    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, world_size: int,
                 barrier: Callable[[], None], agree: Callable[[bool], bool] = _single_process_agree,
                 share: Callable[[Any], Any] = _single_process_share):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.agree = agree
        self.share = share
        self._good: set[tuple[str, int]] = set()

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, *, weights: dict[str, dict[str, torch.Tensor]], objects: dict[str, Any],
             train_state: dict, rank_state: dict, collective: Callable[[Path], None] | None = None) -> Path:
        """Write one complete checkpoint for `step`.

        weights: name -> state dict of tensors, saved as `name.safetensors` by rank 0.
        objects: name -> state of plain types/tensors (optimizer...), `name.pt` by rank 0.
        train_state: JSON-able dict (step, images_seen, ...), by rank 0.
        rank_state: this rank's RNG and data position, by every rank.
        collective(tmp_dir): called by every rank at the same point (e.g. the DeepSpeed engine's
            sharded save); what it writes under tmp_dir becomes part of the checkpoint and its MANIFEST.

        A write that fails on any rank (a full disk, a vanished directory) fails the save on every
        rank: the partial checkpoint is removed, the previous one stays the one to use, and every
        rank raises CheckpointError with the reason.
        """
        final = self.dir / step_name(step)
        tmp = self.dir / f".tmp-{step_name(step)}"
        problem = None
        if self.rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)  # left by a save that was killed
                tmp.mkdir()
            except OSError as e:
                problem = _why(e, self.dir)
        if not self.agree(problem is None):
            self._fail(tmp, step, problem)
        # Each writer fsyncs its own files, so that after the agreement they are durable on any
        # filesystem the ranks share.
        try:
            torch.save(rank_state, tmp / rank_file(self.rank))
            _fsync_file(tmp / rank_file(self.rank))
            if collective is not None:
                collective(tmp)
            if self.rank == 0:
                for name, sd in weights.items():
                    save_file(_state_to_cpu(sd), tmp / f"{name}.safetensors")
                    _fsync_file(tmp / f"{name}.safetensors")
                for name, obj in objects.items():
                    torch.save(obj, tmp / f"{name}.pt")
                    _fsync_file(tmp / f"{name}.pt")
                write_text_atomic(tmp / "train_state.json", json.dumps(train_state, indent=1))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            problem = _why(e, tmp)
        if not self.agree(problem is None):
            self._fail(tmp, step, problem)
        if self.rank == 0:
            try:
                # Subdirectories too (a DeepSpeed engine's files), named by their path inside the checkpoint.
                files = sorted(p for p in tmp.rglob("*") if p.is_file() and not p.name.startswith("."))
                required = sorted({*(f"{n}.safetensors" for n in weights), *(f"{n}.pt" for n in objects),
                                   "train_state.json", *(rank_file(r) for r in range(self.world_size))})
                manifest = {"step": step, "world_size": self.world_size,
                            "files": {p.relative_to(tmp).as_posix(): p.stat().st_size for p in files},
                            "crc32": {p.relative_to(tmp).as_posix(): file_crc32(p) for p in files},
                            # what this kind of checkpoint must hold; verify() refuses one that lacks any
                            "required": required, "required_dirs": [SUBDIR_ZERO] if collective is not None else []}
                write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
                if final.exists():  # the same step saved again (after resuming from an older one)
                    self._set_aside(final, why="replaced by a new save of the same step")
                os.rename(tmp, final)
                _fsync_dir(self.dir)
                write_text_atomic(self.dir / LATEST, final.name + "\n")
            except OSError as e:
                problem = _why(e, tmp)
        if not self.agree(problem is None):
            self._fail(tmp, step, problem)
        if self.rank == 0:
            self._rotate(saved=final)
        self.barrier()
        return final

    def _fail(self, tmp: Path, step: int, problem: str | None) -> None:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial save must not keep the disk full
        self.barrier()
        previous = self.candidates()
        keep = f"; {previous[0].name} is kept and a restart resumes from it" if previous else ""
        raise CheckpointError(f"could not write checkpoint {step_name(step)} in {self.dir}: "
                              f"{problem or 'the write failed on another rank'}{keep}")

    def _set_aside(self, ckpt: Path, why: str) -> None:
        """A checkpoint that fails verification goes to checkpoints/corrupt/ (never deleted: it may
        be the user's only copy of something); a good one being replaced is deleted."""
        if self._verified(ckpt):
            trash = self.dir / f".old-{ckpt.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(ckpt, trash)  # deleted by _rotate, after the new one is in place
            return
        aside = self.dir / CORRUPT / ckpt.name
        aside.parent.mkdir(exist_ok=True)
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"{ckpt.name}.{n}"), n + 1
        os.rename(ckpt, aside)
        log.warning("checkpoint %s fails verification (%s); moved to %s (%s)", ckpt.name,
                    verify(aside, content=True), aside, why)

    def _verified(self, ckpt: Path) -> bool:
        """verify(content=True), remembered per checkpoint while its MANIFEST is unchanged."""
        try:
            key = (ckpt.name, (ckpt / MANIFEST).stat().st_mtime_ns)
        except OSError:
            return False
        if key not in self._good:
            if verify(ckpt, content=True) is not None:
                return False
            self._good.add(key)
        return True

    def _rotate(self, saved: Path) -> None:
        """Keep `saved` and the newest keep_last - 1 verified checkpoints before it; delete the other
        verified ones before it, move every one that fails verification (CRC-32 included) aside to
        checkpoints/corrupt/ without counting it, and remove what killed saves left behind.

        Checkpoints after `saved` (left by a run that resumed from an older one) stay if they verify:
        this run replaces each when it gets there.
        """
        for p in self.all_checkpoints():
            if p != saved and not self._verified(p):
                self._set_aside(p, why="found while rotating")
        older = [p for p in self.all_checkpoints() if p.name < saved.name]
        keep = set(older[max(0, len(older) - (self.keep_last - 1)):])
        for p in older:
            if p not in keep:
                # Renamed first, so a kill while deleting leaves a hidden directory, never a
                # half-deleted checkpoint that looks like one.
                trash = self.dir / f".old-{p.name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.rename(p, trash)
        for stale in [*self.dir.glob(".tmp-*"), *self.dir.glob(".old-*")]:
            shutil.rmtree(stale, ignore_errors=True)

    # -- finding and loading --------------------------------------------------------------------

    def all_checkpoints(self) -> list[Path]:
        """Checkpoint directories, oldest first (complete or not)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("step-*") if p.is_dir())

    def candidates(self) -> list[Path]:
        """Where to resume from, best first: the one `latest` names, then the others newest first."""
        found = list(reversed(self.all_checkpoints()))
        latest = self.dir / LATEST
        try:
            named = self.dir / latest.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            named = None
        except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, not text: newest first
            log.warning("%s is unreadable (%s); using the newest checkpoint that verifies", latest,
                        getattr(e, "strerror", None) or type(e).__name__)
            named = None
        if named is not None:
            if named in found:
                found.remove(named)
                found.insert(0, named)
        return found


def verify(ckpt: Path, content: bool = False) -> str | None:
    """None if the checkpoint directory is complete, else why not (one line).

    Complete means: the MANIFEST lists every file this kind of checkpoint needs (the model, EMA,
    train state, one rank file per saving rank, the optimizer or a DeepSpeed engine's files, and
    whatever else its save declared required), every listed file has its size, and no file is
    there that the MANIFEST does not list (nothing unlisted is ever read, so nothing unlisted may
    be there). `content=True` also checks every file's CRC-32 (a file corrupted in place), which
    reads the whole checkpoint.
    """
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (the save did not finish)"
    try:
        manifest = json.loads(manifest.read_text())
        files, crcs = manifest["files"], manifest.get("crc32", {})
        world_size = int(manifest.get("world_size", 1))
        required = {*BASE_FILES, *(rank_file(r) for r in range(world_size)), *manifest.get("required", [])}
        required_dirs = set(manifest.get("required_dirs", []))
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable MANIFEST.json ({e})"
    if not any(name.startswith(SUBDIR_ZERO + "/") for name in files):
        required.add("optimizer.pt")  # without a DeepSpeed engine, the optimizer state is ours
    lacking = sorted(required - set(files)) + sorted(d + "/" for d in required_dirs
                                                     if not any(n.startswith(d + "/") for n in files))
    if lacking:
        return f"MANIFEST.json does not list {', '.join(lacking[:3])} (an interleaved or damaged save)"
    for name, size in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"missing file {name}"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, expected {size} (truncated?)"
    unlisted = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")
                      if p.is_file() and p.name != MANIFEST and p.relative_to(ckpt).as_posix() not in files)
    if unlisted:
        return f"holds {unlisted[0]}, which MANIFEST.json does not list (not written by this save)"
    if content:
        for name in files:
            if name not in crcs:
                return f"MANIFEST.json has no CRC-32 for {name}"
        for name, crc in crcs.items():
            if file_crc32(ckpt / name) != crc:
                return f"{name} is corrupted (CRC-32 differs from MANIFEST.json)"
    return None


def read_weights(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(ckpt / f"{name}.safetensors")


def read_object(ckpt: Path, name: str) -> Any:
    # weights_only=True: a checkpoint can carry tensors and plain containers, never code.
    try:
        return torch.load(ckpt / name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        raise CheckpointError(f"{name} was refused: it holds more than tensors and plain data, and loading it "
                              f"could run code ({detail[0] if detail else 'not a weights-only pickle'})") from None


def fsync_tree(path: Path) -> None:
    """fsync every file under `path` and the directories themselves (for files a library wrote)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            _fsync_file(p)
    for d in sorted({p.parent for p in path.rglob("*")} | {path}):
        _fsync_dir(d)


def read_train_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "train_state.json").read_text())


def newest_loadable(checkpointer: Checkpointer, load: Callable[[Path], None]) -> Path | None:
    """Call `load(ckpt)` on the best candidate that verifies and loads; fall back to older ones.

    Rank 0's list of candidates is used by every rank, and a candidate counts only if it loaded
    on every rank, so all ranks resume from the same checkpoint even when a failure is local to
    one of them. Returns None when there are no checkpoints at all; raises CheckpointError when
    some exist but none loads (never a silent start from scratch).
    """
    names = checkpointer.share([p.name for p in checkpointer.candidates()])
    tried = []
    for i, name in enumerate(names):
        ckpt = checkpointer.dir / name
        problem = verify(ckpt, content=True)
        if problem is None:
            try:
                load(ckpt)
            except Exception as e:  # noqa: BLE001 - any failure means "try the previous one"
                problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if checkpointer.agree(problem is None):
            return ckpt
        problem = problem or "it did not load on another rank"
        log.warning("rank %d: checkpoint %s is not usable: %s%s", checkpointer.rank, ckpt, problem,
                    "; trying an older one" if i + 1 < len(names) else "")
        tried.append(f"{ckpt.name} ({problem})")
    if tried:
        raise CheckpointError(f"{checkpointer.dir}: checkpoints exist but none can be loaded: "
                              + "; ".join(tried) + ". Move them aside to start from scratch.")
    return None
