"""ddpm-sample: images from the EMA weights of a run directory (or of a `ddpm-export` folder).

    ddpm-sample RUN_DIR --num 64 --out grid.png [--steps 100] [--sampler ddim|ddpm] [--seed 0] [--npz x.npz]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from .monitor import make_grid, save_png


class SampleError(RuntimeError):
    """A user error (bad run dir, no checkpoint): one line, no traceback."""


@torch.no_grad()
def sample_images(model, diffusion, num: int, channels: int, image_size: int, *, sampler: str = "ddim",
                  steps: int = 100, seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 256,
                  progress: bool = False) -> torch.Tensor:
    """`num` samples as uint8 (N, C, H, W) on the CPU; the same seed gives the same images."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, num, batch_size):
        shape = (min(batch_size, num - start), channels, image_size, image_size)
        if sampler == "ddpm":
            x = diffusion.p_sample_loop(model, shape, generator=generator, device=device, progress=progress,
                                        clip_denoised=True)
        elif sampler == "ddim":
            x = diffusion.ddim_sample_loop(model, shape, steps, generator=generator, device=device,
                                           progress=progress, clip_denoised=True)
        else:
            raise SampleError(f"unknown sampler '{sampler}' (use ddpm or ddim)")
        out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    model.train(was_training)
    return torch.cat(out)


def load_ema(path: Path):
    """(cfg, EMA UNet) from a run dir (newest complete checkpoint) or an export dir (ema.safetensors)."""
    from safetensors.torch import load_file

    from .checkpoint import Checkpointer, verify
    from .config import from_dict
    from .train import build_diffusion, build_model

    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise SampleError(f"'{path}' is not a run or export directory (no config.yaml)")
    cfg = from_dict(yaml.safe_load(config_file.read_text()) or {}, str(config_file))
    if (path / "ema.safetensors").is_file():
        weights = path / "ema.safetensors"
    else:
        complete = [p for p in Checkpointer(path, 1, 0, 1, lambda: None).candidates() if verify(p) is None]
        if not complete:
            raise SampleError(f"'{path}' has no complete checkpoint yet")
        weights = complete[0] / "ema.safetensors"
    model = build_model(cfg)
    model.load_state_dict(load_file(weights))
    return cfg, model, build_diffusion(cfg), weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-sample",
                                     description="Sample images from the EMA weights of a run (newest complete "
                                                 "checkpoint) or of a ddpm-export directory.")
    parser.add_argument("run_dir", type=Path, help="run directory or export directory")
    parser.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file for the image grid")
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim",
                        help="ddim (fast, --steps) or ddpm (ancestral, all T steps); default ddim")
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    parser.add_argument("--npz", type=Path, help="also write the images as a uint8 NHWC array ('arr_0')")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        if args.num < 1:
            raise SampleError("--num must be >= 1")
        cfg, model, diffusion, weights = load_ema(args.run_dir)
        if not 1 <= args.steps <= cfg.diffusion.timesteps:
            raise SampleError(f"--steps must be in [1, {cfg.diffusion.timesteps}]")
        device = torch.device(args.device)
        model.to(device)
        images = sample_images(model, diffusion.to(device), args.num, cfg.data.channels, cfg.data.image_size,
                               sampler=args.sampler, steps=args.steps, seed=args.seed, device=device,
                               batch_size=args.batch_size, progress=True)
    except (SampleError, OSError) as e:
        print(f"ddpm-sample: error: {e}", file=sys.stderr)
        return 2
    save_png(args.out, make_grid(images))
    if args.npz:
        args.npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, images.permute(0, 2, 3, 1).numpy())
    print(f"wrote {args.num} samples from {weights} to {args.out}" + (f" and {args.npz}" if args.npz else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
