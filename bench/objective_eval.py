"""Fixed Σ + L_simple against learned Σ + L_hybrid (Improved DDPM) on the demo data, measured.

    nice python bench/objective_eval.py --steps 1200 --work runs/objective_eval --out bench/results/objective_eval.json

(BENCHMARKS.md, "Objectives", gives the side-by-side commands that made its table.)

Both arms train configs/demo.yaml for the same number of steps on shards 0-3 of data/demo/ (the same
seed, data order, model and optimizer; only the objective differs), holding out shard 4. Each arm
is trained by `ddpm-train` in a subprocess, one after the other (a finished run is not retrained:
the same command resumes, and exits at once when done). Then, from each run's EMA weights:
  bpd     `pipeline.diffusion.vlb.bpd_terms` (all T terms, improved-diffusion's conventions,
          x_0 clipped) on --num-bpd held-out images, with per-image noise; the fixed-Σ model is also
          scored with the other fixed variance (same weights: bpd depends on Σ, L_simple does not);
  samples --num-samples images with DDPM respaced to 50 steps and DDIM 50 steps (grids written
          beside --out), and, when the evaluation code (pipeline.eval) is present, their FID against
          --num-ref training images (Inception features; below 2,048 images FID is biased, so
          compare the arms with each other, not with published numbers).
Results go to --out as JSON and are printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.ckpt.rundir import open_ema  # noqa: E402
from pipeline.data.decode import decode_image  # noqa: E402
from pipeline.data.tario import read_shard  # noqa: E402
from pipeline.diffusion import Objective, bpd_terms  # noqa: E402
from pipeline.diffusion.sampling import sample_images  # noqa: E402
from pipeline.factory import build_diffusion  # noqa: E402

TRAIN_SHARDS = "data/demo/fashion-mnist-{000000..000003}.tar"
HELD_OUT_SHARD = "data/demo/fashion-mnist-000004.tar"
ARMS = {
    "fixed Σ + L_simple": [],  # the default objective: eps, fixed_large, simple
    "learned Σ + L_hybrid": ["diffusion.variance=learned_range", "diffusion.loss=hybrid"],
}


def dir_name(arm: str) -> str:
    """The run directory (and --only name) of an arm."""
    return "fixed_simple" if not ARMS[arm] else "learned_hybrid"


def shard_images(pattern: str, num: int, size: int, channels: int) -> np.ndarray:
    """uint8 (N, C, H, W): the first `num` images of the shards, in shard order."""
    from pipeline.data.urls import resolve_urls

    out = []
    for url in resolve_urls(str(REPO / pattern) if not pattern.startswith("/") else pattern):
        shard = read_shard(url)
        for _key, ext, offset, length, _fields in shard.samples:
            if ext is None:
                continue
            out.append(decode_image(bytes(shard.data[offset:offset + length]), ext, size, channels))
            if len(out) == num:
                break
        shard.close()
        if len(out) == num:
            break
    return np.stack(out).transpose(0, 3, 1, 2)


def train(run_dir: Path, steps: int, extra: list[str], log_path: Path) -> float:
    """Train (or finish) the arm; returns wall seconds of this call."""
    cmd = [sys.executable, "-m", "pipeline.cli.train", str(REPO / "configs/demo.yaml"), f"run_dir={run_dir}",
           f"data.urls={REPO / TRAIN_SHARDS}", f"train.max_steps={steps}", "log.sample_every_steps=0",
           f"ckpt.every_steps={max(steps // 4, 1)}", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log_path, "a") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"training failed (exit {rc}); see {log_path}")
    return time.perf_counter() - start


def per_image_noise(indices: list[int], seed: int):
    """noise_fn(t, shape) with image i's noise from its own generator keyed by (seed, i, t)."""
    def fn(t: int, shape):
        return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(
            (seed * 1_000_003 + i) * 1009 + t)) for i in indices])
    return fn


@torch.no_grad()
def bpd(model, diffusion, objective, images: np.ndarray, batch_size: int, seed: int) -> dict:
    rows = []
    for start in range(0, len(images), batch_size):
        x0 = torch.from_numpy(images[start:start + batch_size]).float() / 127.5 - 1.0
        idx = list(range(start, start + x0.shape[0]))
        out = bpd_terms(model, diffusion, objective, x0, noise_fn=per_image_noise(idx, seed), clip_denoised=True)
        rows.append(torch.cat([out.total[:, None], out.prior[:, None], out.terms], dim=1).double().numpy())
    r = np.concatenate(rows)
    T = r.shape[1] - 2
    q = [r[:, 2 + max(1, k * T // 4):2 + (k + 1) * T // 4].sum(1).mean() for k in range(4)]
    return {"bpd": float(r[:, 0].mean()), "bpd_sem": float(r[:, 0].std(ddof=1) / np.sqrt(len(r))),
            "prior": float(r[:, 1].mean()), "decoder": float(r[:, 2].mean()),
            "kl_quarters": [float(v) for v in q], "num_images": int(len(r))}


def fid_fn(reference: np.ndarray):
    """FID against `reference` (uint8 NCHW) with pipeline.eval's Inception features, or None if the
    evaluation code or its network is not available here."""
    try:
        from pipeline.eval.features import extract_features
        from pipeline.eval.network import load_network
        from pipeline.eval.stats import feature_stats, fid
    except ImportError:
        return None
    try:
        net, _ = load_network()
    except Exception as e:  # noqa: BLE001 (a missing network file: report it, keep the other numbers)
        print(f"FID skipped: {e}", file=sys.stderr)
        return None
    ref_stats = feature_stats(extract_features(net, reference, progress=True, desc="reference"))
    return lambda images: float(fid(feature_stats(extract_features(net, images, progress=True)), ref_stats))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph, whole
    p.add_argument("--steps", type=int, default=1200, help="training steps per arm (demo config: batch 64)")
    p.add_argument("--work", type=Path, default=REPO / "runs/objective_eval", help="run directories go here")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/objective_eval.json")
    p.add_argument("--num-bpd", type=int, default=256, help="held-out images for bits/dim")
    p.add_argument("--num-samples", type=int, default=500, help="samples per arm and sampler")
    p.add_argument("--num-ref", type=int, default=1800, help="training images for the FID reference")
    p.add_argument("--sample-steps", type=int, default=50, help="respaced DDPM and DDIM steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-train", action="store_true", help="evaluate the existing runs only")
    p.add_argument("--train-only", action="store_true", help="train the arms, evaluate later")
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--no-bpd", action="store_true", help="skip bits/dim (the slow part: all T terms per image)")
    p.add_argument("--only", choices=[dir_name(n) for n in ARMS], help="train or evaluate this arm only "
                   "(two --train-only --only runs side by side use both cores)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    results = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "steps": args.steps, "sample_steps": args.sample_steps, "arms": {}}
    arms = {n: e for n, e in ARMS.items() if args.only in (None, dir_name(n))}
    for name, extra in arms.items():  # one at a time: 2 shared cores
        run_dir = args.work / dir_name(name)
        if not args.skip_train:
            results["arms"].setdefault(name, {})["train_s"] = train(run_dir, args.steps, extra,
                                                                     args.work / f"{run_dir.name}.log")
    train_json = args.out.with_suffix(".train.json")
    if args.train_only:  # merged with what another --only run wrote
        merged = json.loads(train_json.read_text()) if train_json.is_file() else results
        merged["arms"].update(results["arms"])
        train_json.write_text(json.dumps(merged, indent=1))
        return 0
    if args.skip_train and train_json.is_file():  # keep the training times
        results["arms"] = {n: a for n, a in json.loads(train_json.read_text())["arms"].items() if n in arms}

    cfg0, _, _ = open_ema(args.work / dir_name(next(iter(arms))))
    held_out = shard_images(HELD_OUT_SHARD, args.num_bpd, cfg0.data.image_size, cfg0.data.channels)
    fid_of = None if args.no_fid else fid_fn(shard_images(TRAIN_SHARDS, args.num_ref, cfg0.data.image_size,
                                                              cfg0.data.channels))
    from pipeline.monitor import make_grid, save_png

    for name in arms:
        run_dir = args.work / dir_name(name)
        cfg, model, weights = open_ema(run_dir)
        model.eval()
        diffusion = build_diffusion(cfg)
        arm = results["arms"].setdefault(name, {})
        arm.update(weights=str(weights.relative_to(args.work)), objective=vars(cfg.diffusion))
        variances = [cfg.diffusion.variance]
        if not diffusion.objective.learned_variance:  # the same weights scored with the other fixed Σ
            variances.append("fixed_small" if cfg.diffusion.variance == "fixed_large" else "fixed_large")
        for var in ([] if args.no_bpd else variances):
            objective = Objective.from_config(cfg.diffusion) if var == cfg.diffusion.variance else \
                Objective(prediction=cfg.diffusion.prediction, variance=var)
            t0 = time.perf_counter()
            arm[f"bpd[{var}]"] = bpd(model, diffusion, objective, held_out, args.batch_size, args.seed)
            arm[f"bpd[{var}]"]["seconds"] = time.perf_counter() - t0
            print(f"{name}: bpd with {var} = {arm[f'bpd[{var}]']['bpd']:.4f}", flush=True)
        for sampler in ("ddpm", "ddim"):
            t0 = time.perf_counter()
            images = sample_images(model, diffusion, args.num_samples, cfg.data.channels, cfg.data.image_size,
                                   sampler=sampler, steps=args.sample_steps, seed=args.seed,
                                   batch_size=args.batch_size)
            key = f"{sampler}{args.sample_steps}"
            arm[key] = {"seconds": time.perf_counter() - t0}
            save_png(args.out.with_name(f"{args.out.stem}-{run_dir.name}-{key}.png"), make_grid(images[:64]))
            if fid_of is not None:
                arm[key]["fid"] = fid_of(images.numpy())
                print(f"{name}: FID {key} = {arm[key]['fid']:.2f}", flush=True)
        args.out.write_text(json.dumps(results, indent=1))

    print(table(results))
    return 0


def table(results: dict) -> str:
    rows = ["| arm | bpd (own Σ) | bpd (other fixed Σ) | FID DDPM-50 | FID DDIM-50 | train s |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, arm in results["arms"].items():
        own = f"bpd[{arm['objective']['variance']}]"
        other = [k for k in arm if k.startswith("bpd[") and k != own]
        cell = lambda k: f"{arm[k]['bpd']:.3f} ± {arm[k]['bpd_sem']:.3f} ({k[4:-1]})" if k in arm else "n/a"  # noqa: E731
        fid = lambda k: f"{arm[k]['fid']:.1f}" if "fid" in arm.get(k, {}) else "n/a"  # noqa: E731
        steps = results.get("sample_steps", 50)
        rows.append(f"| {name} | {cell(own)} | {cell(other[0]) if other else '-'} | {fid(f'ddpm{steps}')} | "
                    f"{fid(f'ddim{steps}')} | {arm.get('train_s', float('nan')):.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
