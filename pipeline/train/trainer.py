"""The training loop (`ddpm-train`, `pipeline.cli.train`).

One optimizer step = grad_accum_steps micro batches on every rank; global batch =
micro_batch_size x grad_accum_steps x world_size. Timesteps, noise and flips of step s on rank r
come from a generator seeded by (seed, s, r, micro), so a resumed run draws the same numbers.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.ckpt import checkpointer as ckpt_io
from pipeline.dist import preempt
from pipeline.ckpt import zero
from pipeline.ckpt.checkpointer import CheckpointError, Checkpointer
from pipeline.config import Config, ConfigError, flatten, from_dict, to_dict, to_yaml
from pipeline.data import build_loader, resolve_urls, to_model_input
from pipeline.factory import build_diffusion, build_model, count_flops_per_image, lr_factor
from pipeline.monitor import Monitor, Throughput
from pipeline.train.step import MicroBatch, optimizer_step
from pipeline.dist.runtime import Runtime, build_runtime, derive_seed, rng_state, seed_everything, set_rng_state
from pipeline.models.unet import UNet

log = logging.getLogger("pipeline.train")

# Changing these under an existing run would make its checkpoints meaningless.
# Keeps the per-step dropout seed apart from the (seed, step, rank, micro) data/noise seeds.
DROPOUT_STREAM = 1 << 20

# train.deepspeed changes the checkpoint format (the optimizer state lives in the engine's files).
BREAKING_KEYS = ("model.", "diffusion.", "data.image_size", "data.channels", "train.deepspeed")


def check_run_config(run_dir: Path, cfg: Config, is_main: bool) -> None:
    """Save the resolved config on the first start; on a resume, refuse changes that break it."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            # Atomic: another rank may read it at any moment and must never see half a file.
            ckpt_io.write_text_atomic(saved_path, to_yaml(cfg))
        return
    try:
        saved = flatten(to_dict(from_dict(yaml.safe_load(saved_path.read_text()) or {}, str(saved_path))))
    except yaml.YAMLError as e:
        raise ConfigError(f"{saved_path}: not valid YAML ({str(e).splitlines()[0]}); fix or remove it") from None
    new = flatten(to_dict(cfg))
    changed = {k: (saved[k], new[k]) for k in new if saved.get(k) != new[k]}
    breaking = [k for k in changed if k.startswith(BREAKING_KEYS)]
    if breaking:
        what = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in breaking)
        raise ConfigError(f"run_dir '{run_dir}' was started with a different {what}; these cannot change "
                          f"on resume (use a new run_dir)")
    for k, (old, value) in changed.items():
        log.info("config change on resume: %s %r -> %r", k, old, value)


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


def match_param_layout(optimizer) -> None:
    """Give every per-parameter optimizer state tensor its parameter's strides, after a load.

    Why: `load_state_dict` keeps the strides the state was saved with, and fused AdamW walks
    parameters, gradients and state as flat memory. State saved by an NCHW run (CPU) and loaded for
    channels_last parameters (GPU) would then be updated against the wrong entries, silently (seen
    with the CPU fused kernel; tests/test_train.py). Gradients need nothing: autograd already gives
    each gradient its parameter's strides.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


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
            if rt.deepspeed_config is not None:
                print(f"# DeepSpeed ZeRO stage {rt.deepspeed_config['zero_optimization']['stage']} "
                      f"({cfg.train.deepspeed})")
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
    # Under DeepSpeed bf16 the engine casts `net` to bf16: the EMA stays fp32 and is updated from the
    # bf16 module weights (coerce_dtype), i.e. from the fp32 master weights rounded once. Reading the
    # masters themselves would need an all-gather of the ZeRO partitions every step.
    net.to(device, memory_format=memory_format)
    ema = EMA(net, beta=cfg.ema.decay, min_value=cfg.ema.decay,  # constant decay, no warm-up
              update_after_step=0, update_every=1, include_online_model=False, use_foreach=True,
              coerce_dtype=rt.input_dtype is not None)
    ema.ema_model.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                                  eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps))
    # CUDA graphs (reduce-overhead) measured fastest on one GPU (BENCHMARKS.md); with several
    # processes the DDP hooks split the graph, so stay with the default mode there.
    compile_mode = tc.compile_mode if tc.compile_mode != "auto" else (
        "reduce-overhead" if rt.world_size == 1 else "default")
    model = torch.compile(net, mode=compile_mode) if fast else net
    model, optimizer = acc.prepare(model, optimizer)
    engine = model if rt.deepspeed_config is not None else None  # the DeepSpeedEngine
    diffusion = build_diffusion(cfg).to(device)
    loader = build_loader(cfg.data.urls, image_size=cfg.data.image_size, channels=cfg.data.channels,
                          micro_batch_size=tc.micro_batch_size, num_workers=cfg.data.num_workers,
                          seed=tc.seed, rank=rt.rank, world_size=rt.world_size,
                          pin_memory=device.type == "cuda", max_bad_fraction=cfg.data.max_bad_fraction)

    # Resume from the newest checkpoint that every rank can load, if any (rank 0 lists them).
    from accelerate.utils import broadcast_object_list

    checkpointer = Checkpointer(run_dir, cfg.ckpt.keep_last, rt.rank, rt.world_size, rt.barrier,
                                agree=lambda ok: not rt.any_rank(not ok),
                                share=lambda obj: broadcast_object_list([obj], from_process=0)[0])
    step, images_seen = 0, 0
    saved_rng = None
    restored: list[str] = []

    def load(path: Path) -> None:
        nonlocal step, images_seen, saved_rng, restored
        # Read every file before changing anything: a rank whose read fails is left as it was.
        state = ckpt_io.read_train_state(path)
        model_sd, ema_sd = ckpt_io.read_weights(path, "model"), ckpt_io.read_weights(path, "ema")
        if (engine is not None) != zero.is_zero_checkpoint(path):
            raise CheckpointError(f"{path} was written {'without' if engine is not None else 'with'} DeepSpeed; "
                                  f"train.deepspeed cannot change within a run")
        optimizer_sd = ckpt_io.read_object(path, "optimizer.pt") if engine is None else None
        mine = path / ckpt_io.rank_file(rt.rank)
        same_world = state["world_size"] == rt.world_size and mine.is_file()
        rank_state = ckpt_io.read_object(path, mine.name) if same_world else None
        # Data position: this rank's own state resumes exactly; after a change of world size or
        # data.num_workers, every saved rank's state is needed to re-deal the epoch's unread samples.
        data_state = rank_state["data"] if rank_state is not None else None
        if data_state is None or not loader.resumes_exactly(data_state):
            data_state = [ckpt_io.read_object(path, ckpt_io.rank_file(r))["data"] for r in range(state["world_size"])]
        loader.load_state_dict(data_state)
        if engine is not None:
            zero.load_engine(engine, path)  # every rank: module, fp32 masters, its optimizer partition
        else:
            net.load_state_dict(model_sd)
            optimizer.load_state_dict(optimizer_sd)
            match_param_layout(optimizer)
        ema.ema_model.load_state_dict(ema_sd)
        ema.step.fill_(state["ema_step"])
        ema.initted.fill_(state["ema_step"] > 0)
        scheduler.load_state_dict(state["scheduler"])
        restored = ["model", f"EMA (step {state['ema_step']})", "optimizer",
                    f"LR schedule (lr {scheduler.get_last_lr()[0]:.3g})"]
        if acc.scaler is not None and "scaler" in state:
            acc.scaler.load_state_dict(state["scaler"])
            restored.append(f"fp16 loss scale {acc.scaler.get_scale():g}")
        saved_rng = None
        if rank_state is not None:
            saved_rng = rank_state["rng"]
            restored.append(f"RNG ({', '.join(saved_rng)}) and data position of all {rt.world_size} rank(s)")
        else:
            restored.append(f"data position (the epoch's unread samples re-dealt from {state['world_size']} rank(s))")
            log.warning("world size changed (%d -> %d): RNG starts afresh on each rank",
                        state["world_size"], rt.world_size)
        step, images_seen = state["step"], state["images_seen"]

    resumed = ckpt_io.newest_loadable(checkpointer, load)
    if resumed is not None:
        log.info("resumed from %s: step %d, %d images seen; restored %s",
                 resumed, step, images_seen, ", ".join(restored))
    if rt.is_main:
        log.info("model %.2fM parameters; global batch %d = %d x %d accum x %d ranks; device %s; %s; compile %s",
                 n_params / 1e6, rt.global_batch_size, tc.micro_batch_size, tc.grad_accum_steps,
                 rt.world_size, device, tc.mixed_precision, fast)

    def save() -> None:
        train_state = {"step": step, "images_seen": images_seen, "ema_step": int(ema.step),
                       "world_size": rt.world_size, "scheduler": scheduler.state_dict()}
        if acc.scaler is not None:
            train_state["scaler"] = acc.scaler.state_dict()
        # TensorBoard events up to this step go to disk before the checkpoint exists: a resume
        # from it keeps them and purges later ones (Monitor's purge_step), so no gap and no repeat.
        if monitor.writer is not None:
            monitor.writer.flush()
        # Under DeepSpeed the optimizer state (and fp32 masters) is the engine's sharded checkpoint,
        # written by every rank into the same temporary directory; model.safetensors is the live module.
        checkpointer.save(step, weights={"model": net.state_dict(), "ema": ema.ema_model.state_dict()},
                          objects={"optimizer": optimizer.state_dict()} if engine is None else {},
                          train_state=train_state, rank_state={"rng": rng_state(), "data": loader.state_dict()},
                          collective=(lambda tmp: zero.save_engine(engine, tmp)) if engine is not None else None)

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

    def micro_batches(step: int):
        """This rank's micro batches of optimizer step `step`: data from the stream, timesteps, noise and
        flips from (seed, step, rank, micro), so a resumed run draws the same numbers."""
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
            meter.add(x0.shape[0] * rt.world_size, wait)
            yield MicroBatch(x0, t, noise)

    try:
        while step < tc.max_steps:
            # One optimizer step over grad_accum_steps micro batches, fetched as the step consumes them.
            step_lr = optimizer.param_groups[0]["lr"]  # the LR this step uses, for logging
            result = optimizer_step(acc, model, net, optimizer, diffusion, micro_batches(step), accum,
                                    cfg.optim.grad_clip, scheduler=scheduler, ema=ema, input_dtype=rt.input_dtype)
            loss_sum += result.loss
            grad_norm_sum += result.grad_norm.to(device)
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
                    from pipeline.diffusion.sampling import sample_images

                    images = sample_images(ema.ema_model, diffusion, cfg.log.num_samples, cfg.data.channels,
                                           cfg.data.image_size, sampler="ddim", steps=cfg.log.sample_steps,
                                           seed=tc.seed, device=device)
                    path = monitor.samples(step, images)
                    monitor.write(f"step {step}: samples in {path}")
                meter.reset()
            if step % cfg.ckpt.every_steps == 0 or step == tc.max_steps:
                save()
                meter.reset()

            # Stop on a signal (SLURM's pre-timeout warning, SIGTERM) at a step every rank agrees on,
            # after a complete checkpoint; a finished run ends normally instead (exit 0, no requeue).
            if (step < tc.max_steps and (rt.world_size == 1 or step % tc.stop_check_steps == 0)
                    and rt.any_rank(preempt.received() is not None)):
                if step % cfg.ckpt.every_steps != 0:
                    save()
                acc.end_training()
                raise preempt.Preempted(step, preempt.received() or "a signal to another rank",
                                        checkpointer.dir / ckpt_io.step_name(step))
    finally:
        monitor.close()
    acc.end_training()
    return TrainResult(step=step, images_seen=images_seen, run_dir=run_dir)
