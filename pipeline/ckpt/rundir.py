"""A run directory: its saved config, and the one policy for which checkpoint to use.

Train, sample, export and eval all ask a `RunDir` which checkpoint to read: the newest one that
verifies (MANIFEST sizes and CRC-32) and loads, falling back to older ones with a warning, and
never a silent start from scratch when some exist but none loads.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from pipeline.ckpt.checkpointer import Checkpointer, newest_loadable, read_weights
from pipeline.config import Config, from_dict, read_yaml_mapping
from pipeline.errors import CheckpointError, UserError

log = logging.getLogger("pipeline.checkpoint")

CONFIG = "config.yaml"
WEIGHTS = ("model", "ema")


class RunDir:
    """RUN_DIR/config.yaml and RUN_DIR/checkpoints/ (CONTRACT.md's layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def has_config(self) -> bool:
        return self.config_path.exists()

    def read_config(self) -> Config:
        if not self.config_path.exists():
            raise UserError(f"'{self.path}' is not a run or export directory (no {CONFIG})")
        return from_dict(read_yaml_mapping(self.config_path), str(self.config_path))

    def checkpointer(self, keep_last: int = 1, rank: int = 0, world_size: int = 1,
                     barrier: Callable[[], None] = lambda: None, **collectives) -> Checkpointer:
        return Checkpointer(self.path, keep_last, rank, world_size, barrier, **collectives)

    def resume(self, load: Callable[[Path], None], checkpointer: Checkpointer | None = None) -> Path | None:
        """Call `load` on the checkpoint to use (see the module docstring); None if there is none."""
        return newest_loadable(checkpointer or self.checkpointer(), load)

    def newest_weights(self, names: tuple[str, ...] = WEIGHTS, *, deepspeed: bool = False
                       ) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
        """(checkpoint, {name: fp32 state dict}) from the checkpoint to use; raises when none loads.
        `deepspeed`: whether the run's config trained with DeepSpeed (its files are read only then)."""
        weights: dict[str, dict[str, torch.Tensor]] = {}

        def load(ckpt: Path) -> None:
            weights.clear()
            weights.update(fp32_weights(ckpt, names, deepspeed=deepspeed))

        ckpt = self.resume(load)
        if ckpt is None:
            raise CheckpointError(f"'{self.path}' has no checkpoint yet")
        return ckpt, weights


def fp32_weights(ckpt: Path, names: tuple[str, ...] = WEIGHTS, *, deepspeed: bool = False
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """{name: state dict}: whole fp32 CPU tensors from one checkpoint directory.

    The one place that knows how a checkpoint stores its weights. Under DeepSpeed ZeRO the online
    weights come from the fp32 master partitions of every rank (model.safetensors holds the live
    module, bf16 under bf16); the EMA is always saved whole in fp32.
    """
    has_zero = (ckpt / "deepspeed").exists()
    if has_zero != deepspeed:
        raise CheckpointError(f"{ckpt} {'holds' if has_zero else 'lacks'} DeepSpeed files, but the run's config "
                              f"{'has no' if has_zero else 'has a'} train.deepspeed; it is not this run's checkpoint")
    out = {name: {k: v.float() if v.is_floating_point() else v for k, v in read_weights(ckpt, name).items()}
           for name in names}
    if "model" in names and deepspeed:
        from pipeline.ckpt import zero  # DeepSpeed only when a ZeRO checkpoint needs it

        out["model"] = zero.fp32_weights(ckpt)
    return out


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, config_path: Path) -> None:
    """Refuse weights that do not fit the network the config describes (one line)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise CheckpointError(f"{what} does not match the UNet of {config_path} (first differences: {diff}); "
                              f"the config and the weights come from different runs")


def open_ema(path: str | Path):
    """(cfg, EMA UNet in eval mode, where the weights came from), from a run directory (the
    checkpoint to use) or an export directory (its ema.safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pipeline.factory import build_model

    run = RunDir(path)
    cfg = run.read_config()
    model = build_model(cfg)
    export_file = run.path / "ema.safetensors"
    if export_file.is_file():
        try:
            state, source = load_file(export_file), export_file
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{export_file}: unreadable ({e}); export it again") from None
    else:
        ckpt, weights = run.newest_weights(("ema",), deepspeed=bool(cfg.train.deepspeed))
        state, source = weights["ema"], ckpt / "ema.safetensors"
    check_fits(model, state, str(source), run.config_path)
    model.load_state_dict(state)
    return cfg, model.eval().requires_grad_(False), source


LOCK = "trainer.lock"


class RunLock:
    """One trainer per run directory: an exclusive `flock` on RUN_DIR/trainer.lock, held for the life
    of the run. The kernel drops it when the process dies (SIGKILL, node failure, SLURM requeue), so
    a stale lock never blocks a restart; the file itself stays and names the last holder."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import json
        import os
        import socket
        import time

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write in run_dir '{self.path.parent}' ({e.strerror}); "
                            f"give a run_dir you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
                who = (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}")
            except ValueError:
                who = "holder unknown"
            os.close(fd)
            raise UserError(f"run_dir '{self.path.parent}' is in use by another trainer ({who}); wait for it "
                            f"to end, stop it, or use another run_dir") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
