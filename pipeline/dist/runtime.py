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

from pipeline.config import Config, ConfigError

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
    deepspeed_config: dict | None = None
    """The completed DeepSpeed config (dsconfig.load) when training under DeepSpeed ZeRO, else None."""

    @property
    def input_dtype(self) -> torch.dtype | None:
        """Under DeepSpeed bf16/fp16 the module itself is cast and no autocast applies: inputs must be cast
        to this dtype by the caller. None: leave inputs as they are (autocast or fp32)."""
        ds = self.deepspeed_config
        if ds is None:
            return None
        return torch.bfloat16 if ds["bf16"]["enabled"] else torch.float16 if ds["fp16"]["enabled"] else None

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one. A collective: every rank calls it at
        the same point. One all-reduce and a host sync; a single process needs neither."""
        if self.world_size == 1:
            return flag
        count = self.accelerator.reduce(torch.tensor(int(flag), device=self.device), reduction="sum")
        return int(count) > 0


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _deepspeed_plugin(ds_config: dict):
    """Accelerate's DeepSpeedPlugin for a completed config (dsconfig.load).

    Accelerate 1.15 registers the config with `transformers` (HfDeepSpeedConfig) when a plugin is
    selected, and fails with PackageNotFoundError where transformers is not installed. That hook only
    serves transformers' own ZeRO-3 model loading, which we never use (ZeRO-3 is refused), so it is
    skipped here rather than adding transformers as a dependency.
    """
    from accelerate.utils import DeepSpeedPlugin

    class _Plugin(DeepSpeedPlugin):
        def set_deepspeed_weakref(self):  # no transformers models here (see above)
            pass

    return _Plugin(hf_ds_config=ds_config)


def build_runtime(cfg: Config) -> Runtime:
    """Create the Accelerator. Mixed precision, batch arithmetic and, with train.deepspeed, the DeepSpeed
    config all come from `cfg` (one source of truth); a DeepSpeed JSON that disagrees is refused here."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs

    from pipeline.dist import dsconfig

    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU (on CPU it would silently run fp32); "
                          "use bf16 or no")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # Set by `accelerate launch --use_deepspeed` or an accelerate config with a deepspeed section:
        # a second, unchecked DeepSpeed config. The run's config selects DeepSpeed instead.
        raise ConfigError("the accelerate launch config selects DeepSpeed; launch plain processes "
                          "(configs/accelerate/deepspeed_zero2.yaml) and select it with "
                          "train.deepspeed=configs/deepspeed/zero2.json")
    ds_config, plugin, handlers = None, None, []
    if cfg.train.deepspeed:
        ds_config = dsconfig.load(cfg.train.deepspeed, cfg)  # before any process group: fail fast
        if not torch.cuda.is_available():
            # DeepSpeed picks its accelerator at import; without this it looks for CUDA. And accelerate
            # finds no backend for DeepSpeed on CPU (None: every rank thinks it is alone): gloo, explicitly.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        if "LOCAL_RANK" not in os.environ and "RANK" not in os.environ:
            # Started without a launcher (`ddpm-train ...` on one device): DeepSpeed still needs a process
            # group, and without these would go looking for MPI. A world of one on a free local port.
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        plugin = _deepspeed_plugin(ds_config)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        # We accumulate by hand (no_sync on all but the last micro batch; under DeepSpeed, its
        # gradient_accumulation_steps = train.grad_accum_steps) so the arithmetic
        # global batch = micro x accum x world lives in one place: the config, formed below.
        # (Accelerate would otherwise warn that DeepSpeed's value wins; both are the config's.)
        gradient_accumulation_steps=cfg.train.grad_accum_steps if ds_config else 1,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
    )
    world_size = accelerator.num_processes
    rt = Runtime(accelerator=accelerator, device=accelerator.device, rank=accelerator.process_index,
                 world_size=world_size, is_main=accelerator.is_main_process,
                 global_batch_size=cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size,
                 deepspeed_config=ds_config)
    if ds_config is not None and accelerator.distributed_type != DistributedType.DEEPSPEED:
        # accelerate ignores the plugin in CPU mode (ACCELERATE_USE_CPU, --cpu) and would train with DDP.
        raise ConfigError(f"train.deepspeed: accelerate started {accelerator.distributed_type.value}, not DeepSpeed "
                          f"(CPU mode ignores DeepSpeed: launch without --cpu / ACCELERATE_USE_CPU)")
    if ds_config is not None:
        dsconfig.check_world(ds_config, cfg.train.deepspeed, rt.global_batch_size, world_size)
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
