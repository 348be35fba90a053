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
import yaml

from pipeline.ckpt.checkpointer import Checkpointer, newest_loadable, read_weights
from pipeline.config import Config, from_dict
from pipeline.errors import CheckpointError, ConfigError, UserError

log = logging.getLogger("pipeline.checkpoint")

CONFIG = "config.yaml"
WEIGHTS = ("model", "ema")


def read_yaml_mapping(path: Path) -> dict:
    """The mapping in a YAML file; every way it can be unreadable is one line naming the file."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; fix or remove it") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix or remove it") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


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

    def newest_weights(self, names: tuple[str, ...] = WEIGHTS) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
        """(checkpoint, {name: fp32 state dict}) from the checkpoint to use; raises when none loads."""
        weights: dict[str, dict[str, torch.Tensor]] = {}

        def load(ckpt: Path) -> None:
            weights.clear()
            weights.update(fp32_weights(ckpt, names))

        ckpt = self.resume(load)
        if ckpt is None:
            raise CheckpointError(f"'{self.path}' has no checkpoint yet")
        return ckpt, weights


def fp32_weights(ckpt: Path, names: tuple[str, ...] = WEIGHTS) -> dict[str, dict[str, torch.Tensor]]:
    """{name: state dict}: whole fp32 CPU tensors from one checkpoint directory.

    The one place that knows how a checkpoint stores its weights. Under DeepSpeed ZeRO the online
    weights come from the fp32 master partitions of every rank (model.safetensors holds the live
    module, bf16 under bf16); the EMA is always saved whole in fp32.
    """
    out = {name: {k: v.float() if v.is_floating_point() else v for k, v in read_weights(ckpt, name).items()}
           for name in names}
    if "model" in names:
        from pipeline.ckpt import zero  # DeepSpeed only when a ZeRO checkpoint needs it

        if zero.is_zero_checkpoint(ckpt):
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
        ckpt, weights = run.newest_weights(("ema",))
        state, source = weights["ema"], ckpt / "ema.safetensors"
    check_fits(model, state, str(source), run.config_path)
    model.load_state_dict(state)
    return cfg, model.eval().requires_grad_(False), source
