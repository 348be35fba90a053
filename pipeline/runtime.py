"""Everything that talks to the environment: the Accelerator, devices, seeds and per-rank RNG.

Only this module reads the process environment (RANK, SLURM_*, ...) or `torch.distributed`;
the rest of the package asks it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .config import Config, ConfigError

log = logging.getLogger("pipeline")


@dataclass
class Runtime:
    """What the loop needs to know about where it runs."""

    accelerator: "object"
    device: torch.device
    rank: int
    world_size: int
    is_main: bool
    global_batch_size: int
    """micro_batch_size x grad_accum_steps x world_size: the one place this product is formed."""

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def build_runtime(cfg: Config) -> Runtime:
    """Create the Accelerator. Mixed precision comes from the config (one source of truth)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU (on CPU it would silently run fp32); "
                          "use bf16 or no")
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        # We accumulate by hand (no_sync on all but the last micro batch) so the arithmetic
        # global batch = micro x accum x world lives in one place: the loop.
        gradient_accumulation_steps=1,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
    )
    world_size = accelerator.num_processes
    rt = Runtime(accelerator=accelerator, device=accelerator.device, rank=accelerator.process_index,
                 world_size=world_size, is_main=accelerator.is_main_process,
                 global_batch_size=cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size)
    setup_logging(rt.is_main)
    if accelerator.device.type == "cuda":
        # TF32 for any fp32 matmuls/convs left outside autocast; cuDNN picks the fastest conv kernels.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return rt


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, ...), stable across runs and platforms."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This rank's global RNG states, in types that `torch.load(weights_only=True)` accepts."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
