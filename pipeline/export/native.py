"""The native export: consolidated fp32 weights from a run's checkpoint to use.

    ddpm-export RUN_DIR OUT_DIR

writes OUT_DIR/model.safetensors and OUT_DIR/ema.safetensors (fp32, full tensors) and
OUT_DIR/config.yaml (the run's resolved config), which `ddpm-sample OUT_DIR` and
`UNet.from_config` load without DeepSpeed or Accelerate.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.atomic import write_text_atomic
from pipeline.ckpt.rundir import WEIGHTS, RunDir, check_fits
from pipeline.config import to_yaml
from pipeline.errors import UserError


def export(run_dir: Path, out_dir: Path) -> Path:
    """Write the export of `run_dir` into `out_dir`; returns the checkpoint it came from."""
    from pipeline.factory import build_model

    run = RunDir(run_dir)
    if not run.has_config():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)")
    cfg = run.read_config()
    if out_dir.resolve() == run_dir.resolve():
        raise UserError("OUT_DIR must differ from RUN_DIR")
    if (out_dir / "checkpoints").exists() or (out_dir / "config.yaml").exists() and not (out_dir / "ema.safetensors").exists():
        # Its config.yaml would be overwritten, and that run would then sample from this export.
        raise UserError(f"OUT_DIR {out_dir} is a run directory; export into a new or an export directory")
    ckpt, weights = run.newest_weights(WEIGHTS, deepspeed=bool(cfg.train.deepspeed))

    # The weights must fit the UNet the config describes: checked on the meta device (no memory).
    with torch.device("meta"):
        model = build_model(cfg)
    for name, sd in weights.items():
        check_fits(model, sd, f"{ckpt}/{name}.safetensors", run.config_path)

    # Each file replaced atomically; ema.safetensors last, since its presence marks an export.
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", to_yaml(cfg))
    for name in WEIGHTS:
        tmp = out_dir / f".{name}.safetensors.tmp"
        save_file(weights[name], tmp, metadata={"source": str(ckpt), "dtype": "float32"})
        tmp.replace(out_dir / f"{name}.safetensors")
    return ckpt
