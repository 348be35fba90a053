"""DeepSpeed ZeRO-1/2 checkpoints inside our atomic checkpoint directories.

The engine's own checkpoint (module weights, fp32 master weights and each rank's optimizer partition)
goes into CKPT/deepspeed/state/, written by every rank inside Checkpointer.save's temporary directory,
so MANIFEST.json, the rename and `latest` guarantee it is complete like every other file.

DeepSpeed loads its files with `torch.load(weights_only=False)`, which would run any code a forged
file carries. Every DeepSpeed load here goes through `weights_only_loads()`, which makes those calls
`weights_only=True` with an allow-list of the few DeepSpeed classes its checkpoints hold; a file
that needs anything else is refused with one line.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch

from pipeline.ckpt.checkpointer import fsync_tree

SUBDIR = "deepspeed"
TAG = "state"


def is_zero_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / SUBDIR / TAG).is_dir()


def save_engine(engine, ckpt_tmp: Path) -> None:
    """Every rank calls this (collective): rank 0 writes the module, each rank its optimizer partition."""
    out = Path(ckpt_tmp) / SUBDIR
    engine.save_checkpoint(str(out), tag=TAG, client_state={}, save_latest=False)
    fsync_tree(out)


@contextlib.contextmanager
def weights_only_loads():
    """Inside: every `torch.load` is weights_only=True, allowing only what DeepSpeed ZeRO-1/2
    checkpoints hold besides tensors (checked on deepspeed 0.18's files)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from pipeline.errors import CheckpointError

    real_load = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
            try:
                return real_load(*args, **kwargs)
            except pickle.UnpicklingError as e:
                where = args[0] if args else kwargs.get("f", "a DeepSpeed file")
                detail = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
                raise CheckpointError(f"{where} was refused: it holds more than DeepSpeed's own state, and "
                                      f"loading it could run code ({detail[0] if detail else 'not weights-only'})"
                                      ) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


def load_engine(engine, ckpt: Path) -> None:
    """Every rank calls this: module, fp32 master weights and optimizer partition. The LR schedule is ours
    (train_state.json), so DeepSpeed's is not loaded."""
    with weights_only_loads():
        path, _ = engine.load_checkpoint(str(Path(ckpt) / SUBDIR), tag=TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{ckpt}/{SUBDIR}/{TAG}: DeepSpeed found no checkpoint to load")


def fp32_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Whole fp32 weights rebuilt from the fp32 master partitions of every rank (no process group needed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        sd = get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt) / SUBDIR), tag=TAG)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
