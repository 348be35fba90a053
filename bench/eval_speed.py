"""Evaluation throughput on this machine: samples/s (UNet + sampler), features/s (Inception), and the
time of the statistics, at tiny size on the CPU (or on a GPU with --device cuda).

    python bench/eval_speed.py                 # the demo-sized UNet (28x28 gray), 64 images
    python bench/eval_speed.py --quick         # seconds: what the test runs (no 2048x2048 sqrtm)
    python bench/eval_speed.py --config configs/cifar10.yaml --device cuda --images 1024

Rows (one table, also as JSON lines with --out):
  sampling     ddim with --ddim-steps, and ddpm (all T steps) unless --quick: generated images per s
  features     Inception pool features of uint8 images: resize to 299, network forward, images per s
  fid_stats    mean/cov of 2048-d features and the 2048x2048 sqrtm: seconds per FID (independent of N
               except for the covariance's N x 2048^2 cost)
  kid_stats    100 subsets of min(1000, N) rows: seconds per KID
The model's weights are random (speed does not depend on them); threads: torch's default unless
OMP_NUM_THREADS is set.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.eval import stats  # noqa: E402
from pipeline.eval.features import extract_features  # noqa: E402
from pipeline.eval.generate import generate  # noqa: E402
from pipeline.eval.network import load_network  # noqa: E402
from pipeline.factory import build_diffusion, build_model  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph, whole
    p.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    p.add_argument("--images", type=int, default=64, help="images per timed row (default 64)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="8 images, 5 DDIM steps, no ddpm row, no sqrtm")
    p.add_argument("--out", type=Path, help="also write the rows as JSON lines")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.ddim_steps = 8, 5
    cfg = load_config(args.config, [])
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    diffusion = build_diffusion(cfg).to(device)
    n, c, s = args.images, cfg.data.channels, cfg.data.image_size
    rows = [{"kind": "info", "config": Path(args.config).name, "image": f"{s}x{s}x{c}", "device": str(device),
             "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or
             platform.machine(), "images": n}]

    def sample(sampler, steps):
        return generate(model, diffusion, range(n), channels=c, image_size=s, sampler=sampler, steps=steps,
                        batch_size=args.batch_size, device=device)

    sample("ddim", 2)  # warm-up (allocator, kernels)
    images, dt = timed(lambda: sample("ddim", args.ddim_steps))
    rows.append({"kind": "sampling", "what": f"ddim {args.ddim_steps} steps", "per_s": n / dt, "seconds": dt})
    if not args.quick:
        _, dt = timed(lambda: sample("ddpm", None))
        rows.append({"kind": "sampling", "what": f"ddpm {cfg.diffusion.timesteps} steps", "per_s": n / dt,
                     "seconds": dt})

    net, _ = load_network(device=device)
    extract_features(net, images[:2], device=device)  # warm-up
    feats, dt = timed(lambda: extract_features(net, images, batch_size=args.batch_size, device=device))
    rows.append({"kind": "features", "what": f"inception {s}->299, batch {args.batch_size}", "per_s": n / dt,
                 "seconds": dt})

    rng = np.random.default_rng(0)
    fake = feats.astype(np.float64)[rng.integers(0, n, size=max(n, 64))] + rng.normal(size=(max(n, 64), 2048))
    if not args.quick:
        a, b = stats.feature_stats(fake), stats.feature_stats(fake[::-1] + 0.1)
        _, dt = timed(lambda: stats.fid(a, b))
        rows.append({"kind": "fid_stats", "what": "2048x2048 sqrtm", "per_s": None, "seconds": dt})
    _, dt = timed(lambda: stats.kid(fake, fake + 0.1))
    rows.append({"kind": "kid_stats", "what": f"100 subsets of {min(1000, len(fake))}", "per_s": None,
                 "seconds": dt})

    info = rows[0]
    print(f"# {info['config']} ({info['image']}), {info['device']}, {info['threads']} threads, torch {info['torch']}")
    print(f"{'row':<10} {'what':<34} {'per s':>9} {'seconds':>9}")
    for r in rows[1:]:
        rate = f"{r['per_s']:.2f}" if r["per_s"] is not None else "-"
        print(f"{r['kind']:<10} {r['what']:<34} {rate:>9} {r['seconds']:>9.2f}")
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
