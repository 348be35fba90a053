"""Our bits/dim against improved-diffusion's own `calc_bpd_loop`, on the same checkpoint, images
and noise.

    python bench/iddpm_bpd_check.py runs/demo --iddpm PATH --data runs/fmnist-test --num 16

PATH is a checkout of https://github.com/openai/improved-diffusion (commit 1bc7bbb checked here)
holding `improved_diffusion/`; only its gaussian_diffusion.py, losses.py and nn.py are imported
(torch and numpy). Both implementations get the run's EMA UNet, its betas and the same images in
[-1, 1]; both draw one `randn_like` per term, t = T-1 down to 0, from the global generator after
`torch.manual_seed(seed)`, so they see the same noise and may differ only by rounding. Prints the
largest differences of the per-image totals and of every term (improved-diffusion's `vb` columns run
t = T-1 .. 0, so they are flipped before comparing) and writes them to --out as JSON.
Fixed variances only (improved-diffusion's FIXED_SMALL / FIXED_LARGE / LEARNED_RANGE with EPSILON
map to ours; the other parameterisations have no counterpart there).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.ckpt.rundir import open_ema  # noqa: E402
from pipeline.diffusion.vlb import bpd_terms  # noqa: E402
from pipeline.eval.images import read_shard_images, shard_list  # noqa: E402
from pipeline.factory import build_diffusion  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph, whole
    p.add_argument("run_dir", type=Path, help="run or export directory (EMA weights)")
    p.add_argument("--iddpm", type=Path, required=True, help="improved-diffusion checkout (holds improved_diffusion/)")
    p.add_argument("--data", required=True, help="held-out shards (anything data.urls accepts)")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.iddpm))
    from improved_diffusion import gaussian_diffusion as gd

    cfg, model, weights = open_ema(args.run_dir)
    diffusion = build_diffusion(cfg)
    objective = diffusion.objective
    if objective.prediction != "eps":
        raise SystemExit(f"diffusion.prediction={objective.prediction}: improved-diffusion's bpd compares for eps only")
    var_type = {"fixed_small": gd.ModelVarType.FIXED_SMALL, "fixed_large": gd.ModelVarType.FIXED_LARGE,
                "learned_range": gd.ModelVarType.LEARNED_RANGE}[objective.variance]
    theirs = gd.GaussianDiffusion(betas=diffusion.betas.double().numpy(), model_mean_type=gd.ModelMeanType.EPSILON,
                                  model_var_type=var_type, loss_type=gd.LossType.MSE)
    shards, _, _ = shard_list([args.data])
    x0 = torch.from_numpy(read_shard_images(shards, args.num, image_size=cfg.data.image_size,
                                            channels=cfg.data.channels)).float() / 127.5 - 1.0

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    ours = bpd_terms(model, diffusion, None, x0, noise_fn=lambda t, shape: torch.randn(shape), clip_denoised=True,
                     progress=True)
    ours_s = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = theirs.calc_bpd_loop(model, x0, clip_denoised=True)
    ref_s = time.perf_counter() - t0
    ref_terms = ref["vb"].flip(1)  # their column j is t = T-1-j

    result = {
        "weights": str(weights), "num_images": args.num, "seed": args.seed, "variance": objective.variance,
        "ours_bpd": float(ours.total.mean()), "iddpm_bpd": float(ref["total_bpd"].mean()),
        "max_abs_diff_total": float((ours.total - ref["total_bpd"]).abs().max()),
        "max_abs_diff_prior": float((ours.prior - ref["prior_bpd"]).abs().max()),
        "max_abs_diff_term": float((ours.terms - ref_terms).abs().max()),
        "max_rel_diff_term": float(((ours.terms - ref_terms).abs() / ref_terms.abs().clamp(min=1e-12)).max()),
        "ours_s": round(ours_s, 1), "iddpm_s": round(ref_s, 1),
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
