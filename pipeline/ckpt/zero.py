"""DeepSpeed ZeRO-1/2 checkpoints inside our atomic checkpoint directories.

The engine's own checkpoint (module weights, fp32 master weights and each rank's optimizer partition)
goes into CKPT/deepspeed/state/, written by every rank inside Checkpointer.save's temporary directory,
so MANIFEST.json, the rename and `latest` guarantee it is complete like every other file.

Note: DeepSpeed loads its files with `torch.load(weights_only=False)`; the MANIFEST's CRC-32 guards
against damaged files, not against forged ones. Load checkpoints you (or your cluster) wrote.
"""
from __future__ import annotations

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


def load_engine(engine, ckpt: Path) -> None:
    """Every rank calls this: module, fp32 master weights and optimizer partition. The LR schedule is ours
    (train_state.json), so DeepSpeed's is not loaded."""
    path, _ = engine.load_checkpoint(str(Path(ckpt) / SUBDIR), tag=TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{ckpt}/{SUBDIR}/{TAG}: DeepSpeed found no checkpoint to load")


def fp32_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Whole fp32 weights rebuilt from the fp32 master partitions of every rank (no process group needed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt) / SUBDIR), tag=TAG)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
