"""ddpm-sample: images from the EMA weights of a run directory (or of a `ddpm-export` folder).

    ddpm-sample RUN_DIR --num 64 --out grid.png [--steps 100] [--sampler ddim|ddpm] [--seed 0] [--npz x.npz]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError, cli_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ddpm-sample",
                                     description="Sample images from the EMA weights of a run (newest checkpoint "
                                                 "that verifies, CRC-checked, falling back to older ones) or of a "
                                                 "ddpm-export directory.")
    parser.add_argument("run_dir", type=Path, help="run directory or export directory")
    parser.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file for the image grid")
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim",
                        help="ddim (fast, --steps) or ddpm (ancestral, all T steps); default ddim")
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    parser.add_argument("--npz", type=Path, help="also write the images as a uint8 NHWC array ('arr_0')")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default cuda if available, else cpu)")
    return parser.parse_args(argv)


def _check_writable(path: Path, option: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"{option} {path}: cannot write into {parent}")


def run(args: argparse.Namespace) -> int:
    from pipeline.ckpt.rundir import open_ema
    from pipeline.diffusion.sampling import sample_images
    from pipeline.factory import build_diffusion
    from pipeline.monitor import make_grid, save_png

    # Every option is checked before any sampling, so a typo costs nothing.
    if args.num < 1:
        raise UserError("--num must be >= 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {args.device!r} is not usable here ({str(e).splitlines()[0]})") from None
    _check_writable(args.out, "--out")
    if args.npz:
        _check_writable(args.npz, "--npz")
    cfg, model, weights = open_ema(args.run_dir)
    if not 1 <= args.steps <= cfg.diffusion.timesteps:
        raise UserError(f"--steps must be in [1, {cfg.diffusion.timesteps}]")
    model.to(device)
    images = sample_images(model, build_diffusion(cfg).to(device), args.num, cfg.data.channels,
                           cfg.data.image_size, sampler=args.sampler, steps=args.steps, seed=args.seed,
                           device=device, batch_size=args.batch_size, progress=True)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_png(args.out, make_grid(images))
        if args.npz:
            args.npz.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.npz, images.permute(0, 2, 3, 1).numpy())
    except OSError as e:
        raise UserError(f"cannot write the output: {e}") from None
    print(f"wrote {args.num} samples from {weights} to {args.out}" + (f" and {args.npz}" if args.npz else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli_main("ddpm-sample", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
