"""ddpm-train: the training loop and its command line.

    ddpm-train CONFIG.yaml [key.sub=value ...] [--dry-run]
    accelerate launch [flags] -m pipeline.train CONFIG.yaml [key.sub=value ...]

One optimizer step = grad_accum_steps micro batches on every rank; global batch =
micro_batch_size x grad_accum_steps x world_size. Timesteps, noise and flips of step s on rank r
come from a generator seeded by (seed, s, r, micro), so a resumed run draws the same numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt_io
from .checkpoint import CheckpointError, Checkpointer
from .config import Config, ConfigError, describe, flatten, from_dict, load_config, to_dict, to_yaml
from .data import DataError, build_loader, resolve_urls, to_model_input
from .diffusion import Diffusion, make_betas
from .monitor import Monitor, Throughput
from .runtime import Runtime, build_runtime, derive_seed, rng_state, seed_everything, set_rng_state
from .unet import UNet

log = logging.getLogger("pipeline.train")

# Changing these under an existing run would make its checkpoints meaningless.
# Keeps the per-step dropout seed apart from the (seed, step, rank, micro) data/noise seeds.
DROPOUT_STREAM = 1 << 20

BREAKING_KEYS = ("model.", "diffusion.", "data.image_size", "data.channels")


def build_model(cfg: Config) -> UNet:
    return UNet.from_config(cfg.model, image_size=cfg.data.image_size, channels=cfg.data.channels)


def build_diffusion(cfg: Config) -> Diffusion:
    d = cfg.diffusion
    return Diffusion(make_betas(d.beta_schedule, d.timesteps, d.beta_start, d.beta_end))


def lr_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warm-up, then constant."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def check_run_config(run_dir: Path, cfg: Config, is_main: bool) -> None:
    """Save the resolved config on the first start; on a resume, refuse changes that break it."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            saved_path.write_text(to_yaml(cfg))
        return
    saved = flatten(to_dict(from_dict(yaml.safe_load(saved_path.read_text()) or {}, str(saved_path))))
    new = flatten(to_dict(cfg))
    changed = {k: (saved[k], new[k]) for k in new if saved.get(k) != new[k]}
    breaking = [k for k in changed if k.startswith(BREAKING_KEYS)]
    if breaking:
        what = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in breaking)
        raise ConfigError(f"run_dir '{run_dir}' was started with a different {what}; these cannot change "
                          f"on resume (use a new run_dir)")
    for k, (old, value) in changed.items():
        log.info("config change on resume: %s %r -> %r", k, old, value)


def count_flops_per_image(cfg: Config) -> float:
    """Forward + backward FLOPs of one image, counted on the meta device (no compute, no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_model(cfg)
        x = torch.zeros(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        net(x, t).sum().backward()
    return float(counter.get_total_flops())


def matmul_peak_flops(device: torch.device) -> float | None:
    """bf16 dense matmul FLOP/s measured on this GPU now: the denominator of perf/mfu."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start)


@dataclass
class TrainResult:
    step: int
    images_seen: int
    run_dir: Path


def train(cfg: Config, dry_run: bool = False) -> TrainResult | None:
    """Train (or resume) the run in cfg.run_dir up to cfg.train.max_steps optimizer steps."""
    # Fail at start-up, not at step 50,000: shards must exist before the model is built.
    urls = resolve_urls(cfg.data.urls)
    rt = build_runtime(cfg)
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.train.seed)  # the same initial weights on every rank and every run
    net = build_model(cfg)
    n_params = sum(p.numel() for p in net.parameters())
    if dry_run:
        if rt.is_main:
            print(to_yaml(cfg), end="")
            print(f"# shards: {len(urls)} ({urls[0]} ...)")
            print(f"# model parameters: {n_params:,} ({n_params / 1e6:.2f}M)")
            print(f"# global batch: {rt.global_batch_size} = micro_batch_size {cfg.train.micro_batch_size} "
                  f"x grad_accum_steps {cfg.train.grad_accum_steps} x world_size {rt.world_size}")
            print(f"# device: {rt.device}, mixed precision: {cfg.train.mixed_precision}")
        return None
    check_run_config(run_dir, cfg, rt.is_main)
    rt.barrier()
    return _train(cfg, rt, net, urls, run_dir, n_params)


def _train(cfg: Config, rt: Runtime, net: UNet, urls: list[str], run_dir: Path, n_params: int) -> TrainResult:
    from ema_pytorch import EMA

    acc, device, tc = rt.accelerator, rt.device, cfg.train
    seed_everything(derive_seed(tc.seed, rt.rank))
    fast = device.type == "cuda" and tc.compile != "no" or tc.compile == "yes"
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    # Model, EMA (fp32, from the unwrapped model on its device), optimizer, LR schedule.
    net.to(device, memory_format=memory_format)
    ema = EMA(net, beta=cfg.ema.decay, min_value=cfg.ema.decay,  # constant decay, no warm-up
              update_after_step=0, update_every=1, include_online_model=False, use_foreach=True)
    ema.ema_model.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                                  eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps))
    model = torch.compile(net, mode=tc.compile_mode) if fast else net
    model, optimizer = acc.prepare(model, optimizer)
    diffusion = build_diffusion(cfg).to(device)
    loader = build_loader(urls, image_size=cfg.data.image_size, channels=cfg.data.channels,
                          micro_batch_size=tc.micro_batch_size, num_workers=cfg.data.num_workers,
                          seed=tc.seed, rank=rt.rank, world_size=rt.world_size,
                          pin_memory=device.type == "cuda")

    # Resume from the newest complete checkpoint, if any.
    checkpointer = Checkpointer(run_dir, cfg.ckpt.keep_last, rt.rank, rt.world_size, rt.barrier)
    step, images_seen = 0, 0
    saved_rng = None

    def load(path: Path) -> None:
        nonlocal step, images_seen, saved_rng
        state = ckpt_io.read_train_state(path)
        net.load_state_dict(ckpt_io.read_weights(path, "model"))
        ema.ema_model.load_state_dict(ckpt_io.read_weights(path, "ema"))
        ema.step.fill_(state["ema_step"])
        ema.initted.fill_(state["ema_step"] > 0)
        optimizer.load_state_dict(ckpt_io.read_object(path, "optimizer.pt"))
        scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and "scaler" in state:
            acc.scaler.load_state_dict(state["scaler"])
        mine = path / ckpt_io.rank_file(rt.rank)
        if state["world_size"] == rt.world_size and mine.is_file():
            rank_state = ckpt_io.read_object(path, mine.name)
            saved_rng = rank_state["rng"]
            loader.load_state_dict(rank_state["data"])
        else:
            log.warning("world size changed (%d -> %d): RNG and data position start afresh on each rank",
                        state["world_size"], rt.world_size)
        step, images_seen = state["step"], state["images_seen"]

    resumed = ckpt_io.newest_loadable(checkpointer, load)
    if resumed is not None:
        log.info("resumed from %s: step %d, %d images seen; restored model, EMA (step %d), optimizer, "
                 "LR schedule, RNG and data position", resumed, step, images_seen, int(ema.step))
    if rt.is_main:
        log.info("model %.2fM parameters; global batch %d = %d x %d accum x %d ranks; device %s; %s; compile %s",
                 n_params / 1e6, rt.global_batch_size, tc.micro_batch_size, tc.grad_accum_steps,
                 rt.world_size, device, tc.mixed_precision, fast)

    def save() -> None:
        train_state = {"step": step, "images_seen": images_seen, "ema_step": int(ema.step),
                       "world_size": rt.world_size, "scheduler": scheduler.state_dict()}
        if acc.scaler is not None:
            train_state["scaler"] = acc.scaler.state_dict()
        checkpointer.save(step, weights={"model": net.state_dict(), "ema": ema.ema_model.state_dict()},
                          objects={"optimizer": optimizer.state_dict()}, train_state=train_state,
                          rank_state={"rng": rng_state(), "data": loader.state_dict()})

    monitor = Monitor(run_dir, rt.is_main, tc.max_steps, step)
    flops_per_image = count_flops_per_image(cfg) if rt.is_main else 0.0
    peak_flops = matmul_peak_flops(device) if rt.is_main else None
    generator = torch.Generator(device=device)
    data_iter = iter(loader)
    # Restore the RNG last, so nothing done while setting up can shift it.
    if saved_rng is not None:
        set_rng_state(saved_rng)
    meter = Throughput()
    loss_sum = torch.zeros((), device=device)
    grad_norm_sum = torch.zeros((), device=device)
    steps_in_window = 0
    accum = tc.grad_accum_steps

    try:
        while step < tc.max_steps:
            # Forward and backward over grad_accum_steps micro batches; sync gradients on the last.
            for micro in range(accum):
                t0 = time.perf_counter()
                batch = next(data_iter)
                wait = time.perf_counter() - t0
                generator.manual_seed(derive_seed(tc.seed, step, rt.rank, micro))
                # Dropout draws from the global RNG: reseed it here, after the batch is fetched, so
                # nothing else that touches it (loader start-up, sampling) can shift a resumed run.
                torch.manual_seed(derive_seed(tc.seed, step, rt.rank, micro, DROPOUT_STREAM))
                x0 = to_model_input(batch, device, random_flip=cfg.data.random_flip, generator=generator)
                x0 = x0.contiguous(memory_format=memory_format)
                t = diffusion.sample_timesteps(x0.shape[0], device, generator=generator)
                noise = torch.randn(x0.shape, device=device, generator=generator).contiguous(memory_format=memory_format)
                sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(model)
                with sync:
                    loss = diffusion.loss(model, x0, t, noise)
                    acc.backward(loss / accum)
                loss_sum += loss.detach() / accum
                meter.add(x0.shape[0] * rt.world_size, wait)

            # Clip, step, and update EMA and LR only when the step was real (fp16 may skip one).
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = acc.clip_grad_norm_(net.parameters(), max_norm)
            step_lr = optimizer.param_groups[0]["lr"]  # the LR this step uses, for logging
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not (acc.scaler is not None and acc.optimizer_step_was_skipped):
                scheduler.step()
                ema.update()
            grad_norm_sum += grad_norm.detach()
            steps_in_window += 1
            step += 1
            images_seen += rt.global_batch_size

            # Log: one host sync per window, not per step.
            if step % cfg.log.every_steps == 0 or step == tc.max_steps:
                mean_loss = acc.reduce(loss_sum, reduction="mean").item() / steps_in_window
                mean_norm = grad_norm_sum.item() / steps_in_window
                images_per_sec, data_wait_frac = meter.read()
                scalars = {"train/loss": mean_loss, "train/lr": step_lr,
                           "train/grad_norm": mean_norm, "train/images_seen": images_seen,
                           "perf/images_per_sec": images_per_sec, "perf/data_wait_frac": data_wait_frac}
                if peak_flops:
                    scalars["perf/mfu"] = images_per_sec * flops_per_image / peak_flops
                if device.type == "cuda":
                    scalars["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                stats = getattr(loader, "stats", None)
                if callable(stats):
                    for k, v in stats().items():
                        scalars[f"data/{k}"] = v
                monitor.scalars(step, scalars)
                monitor.progress(step, loss=f"{mean_loss:.4f}", img_s=f"{images_per_sec:.0f}")
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {step}; lower optim.lr or use bf16")
                loss_sum.zero_()
                grad_norm_sum.zero_()
                steps_in_window = 0

            # Samples from the EMA weights, then checkpoint.
            if cfg.log.sample_every_steps and (step % cfg.log.sample_every_steps == 0 or step == tc.max_steps):
                if rt.is_main:
                    from .sample import sample_images

                    images = sample_images(ema.ema_model, diffusion, cfg.log.num_samples, cfg.data.channels,
                                           cfg.data.image_size, sampler="ddim", steps=cfg.log.sample_steps,
                                           seed=tc.seed, device=device)
                    path = monitor.samples(step, images)
                    monitor.write(f"step {step}: samples in {path}")
                meter.reset()
            if step % cfg.ckpt.every_steps == 0 or step == tc.max_steps:
                save()
                meter.reset()
    finally:
        monitor.close()
    acc.end_training()
    return TrainResult(step=step, images_seen=images_seen, run_dir=run_dir)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ddpm-train",
        description="Train (or resume) a DDPM on WebDataset shards. Re-running with the same run_dir resumes "
                    "from its newest complete checkpoint.",
        epilog="Example: ddpm-train configs/demo.yaml train.max_steps=2000 run_dir=runs/demo. "
               "Keys and defaults: ddpm-train --help-config.")
    parser.add_argument("config", nargs="?", help="YAML config file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, parameter count and global batch, then exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key with default and meaning")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after --dry-run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    if args.config is None:
        print("ddpm-train: error: give a config file, e.g. ddpm-train configs/demo.yaml", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, dry_run=args.dry_run)
    except (ConfigError, DataError, CheckpointError) as e:
        # User errors: one line, no traceback.
        print(f"ddpm-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddpm-train: interrupted; re-run the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
