"""ddpm-export: consolidated fp32 weights from a run's newest complete checkpoint.

    ddpm-export RUN_DIR OUT_DIR

writes OUT_DIR/model.safetensors and OUT_DIR/ema.safetensors (fp32, full tensors) and
OUT_DIR/config.yaml (the run's resolved config), which `ddpm-sample OUT_DIR` and
`UNet.from_config` load without DeepSpeed or Accelerate.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from .checkpoint import CheckpointError, Checkpointer, newest_loadable, read_weights, write_text_atomic
from .config import ConfigError, from_dict, to_yaml

WEIGHTS = ("model", "ema")


class ExportError(RuntimeError):
    """A user error (no run dir, no checkpoint, bad output dir): one line, no traceback."""


def fp32_weights(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"model": state dict, "ema": state dict}: whole fp32 CPU tensors from one checkpoint directory.

    The one place that knows how a checkpoint stores its weights. Under DeepSpeed ZeRO the online
    weights come from the fp32 master partitions of every rank (model.safetensors holds the live module,
    bf16 under bf16); the EMA is always saved whole in fp32.
    """
    from . import zero

    out = {name: {k: v.float() if v.is_floating_point() else v for k, v in read_weights(ckpt, name).items()}
           for name in WEIGHTS}
    if zero.is_zero_checkpoint(ckpt):
        out["model"] = zero.fp32_weights(ckpt)
    return out


def export(run_dir: Path, out_dir: Path) -> Path:
    """Write the export of `run_dir` into `out_dir`; returns the checkpoint it came from."""
    from .train import build_model

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ExportError(f"'{run_dir}' is not a run directory (no config.yaml)")
    if out_dir.resolve() == run_dir.resolve():
        raise ExportError("OUT_DIR must differ from RUN_DIR")
    try:
        cfg = from_dict(yaml.safe_load(config_file.read_text()) or {}, str(config_file))
    except yaml.YAMLError as e:
        raise ExportError(f"{config_file}: not valid YAML ({str(e).splitlines()[0]})") from None

    # Newest complete checkpoint whose weights read back (a corrupted newest one falls back).
    weights: dict[str, dict[str, torch.Tensor]] = {}

    def load(ckpt: Path) -> None:
        weights.update(fp32_weights(ckpt))

    ckpt = newest_loadable(Checkpointer(run_dir, keep_last=1, rank=0, world_size=1, barrier=lambda: None), load)
    if ckpt is None:
        raise ExportError(f"'{run_dir}' has no checkpoint yet")

    # The weights must fit the UNet the config describes: checked on the meta device (no memory).
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    for name, sd in weights.items():
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if got != expected:
            diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
            raise ExportError(f"{ckpt}/{name}.safetensors does not match the UNet of {config_file} "
                              f"(first differences: {diff})")

    # Each file replaced atomically; ema.safetensors last, since its presence marks an export.
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", to_yaml(cfg))
    for name in WEIGHTS:
        final = out_dir / f"{name}.safetensors"
        tmp = out_dir / f".{name}.safetensors.tmp"
        save_file(weights[name], tmp, metadata={"source": str(ckpt), "dtype": "float32"})
        os.replace(tmp, final)
    return ckpt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ddpm-export",
        description="Write consolidated fp32 model.safetensors and ema.safetensors plus config.yaml from the "
                    "newest complete checkpoint of a run; `ddpm-sample OUT_DIR` reads the result.")
    parser.add_argument("run_dir", type=Path, help="run directory (with config.yaml and checkpoints/)")
    parser.add_argument("out_dir", type=Path, help="directory to write the export into (created if needed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        ckpt = export(args.run_dir, args.out_dir)
    except (ExportError, CheckpointError, ConfigError, OSError) as e:
        print(f"ddpm-export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} to {args.out_dir} (model.safetensors, ema.safetensors, config.yaml; fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
