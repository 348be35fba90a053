"""The training loop (`ddpm-train`, `pipeline.cli.train`): a Trainer that owns every stateful part.

One optimizer step = grad_accum_steps micro batches on every rank; global batch =
micro_batch_size x grad_accum_steps x world_size. Timesteps, noise and flips of step s on rank r
come from a generator seeded by (seed, s, r, micro), so a resumed run draws the same numbers.

What a checkpoint holds is the Trainer's `registry` (`pipeline.train.registry`): every part is
registered once in `_register_parts`, and save, load and the "restored ..." log line come from it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeline.ckpt import zero
from pipeline.ckpt.checkpointer import step_name
from pipeline.ckpt.rundir import RunDir, RunLock
from pipeline.config import Config, ConfigError, flatten, from_dict, to_dict, to_yaml
from pipeline.data import build_loader, resolve_urls, to_model_input
from pipeline.diffusion import build_timestep_sampler
from pipeline.dist import preempt
from pipeline.dist.runtime import Runtime, build_runtime, derive_seed, rng_state, seed_everything, set_rng_state
from pipeline.errors import CheckpointError, UserError
from pipeline.eval.inloop import InLoopEval
from pipeline.factory import build_diffusion, build_model, build_optimizer, count_flops_per_image
from pipeline.monitor import Monitor, Throughput
from pipeline.train.registry import CheckpointRegistry, Kind, RankStates
from pipeline.train.step import MicroBatch, optimizer_step

log = logging.getLogger("pipeline.train")

# Changing these under an existing run would make its checkpoints meaningless.
# Keeps the per-step dropout seed apart from the (seed, step, rank, micro) data/noise seeds.
DROPOUT_STREAM = 1 << 20

# train.deepspeed changes the checkpoint format (the optimizer state lives in the engine's files).
BREAKING_KEYS = ("model.", "diffusion.", "data.image_size", "data.channels", "train.deepspeed")


@dataclass
class TrainState:
    step: int = 0
    images_seen: int = 0


@dataclass
class TrainResult:
    step: int
    images_seen: int
    run_dir: Path


def check_run_config(run_dir: Path, cfg: Config, is_main: bool) -> bool:
    """Compare the config with the run's saved one and refuse changes that break a resume.

    Returns whether the config still has to be saved: on a first start it is saved now; when
    checkpoints exist but config.yaml does not, it is saved only once a checkpoint has loaded with
    this config (`save_run_config`), so a wrong command never rewrites what the run had.
    """
    from pipeline.config import read_yaml_mapping

    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        if RunDir(run_dir).checkpointer().all_checkpoints():
            return True
        if is_main:
            save_run_config(run_dir, cfg)
        return False
    saved = flatten(to_dict(from_dict(read_yaml_mapping(saved_path), str(saved_path))))
    new = flatten(to_dict(cfg))
    changed = {k: (saved[k], new[k]) for k in new if saved.get(k) != new[k]}
    breaking = [k for k in changed if k.startswith(BREAKING_KEYS)]
    if breaking:
        what = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in breaking)
        raise ConfigError(f"run_dir '{run_dir}' was started with a different {what}; these cannot change "
                          f"on resume (use a new run_dir)")
    for k, (old, value) in changed.items():
        log.info("config change on resume: %s %r -> %r", k, old, value)
    return False


def save_run_config(run_dir: Path, cfg: Config) -> None:
    from pipeline.atomic import write_text_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    # Atomic: another rank may read it at any moment and must never see half a file.
    write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))


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


def match_param_layout(optimizer) -> None:
    """Give every per-parameter optimizer state tensor its parameter's strides, after a load.

    Why: `load_state_dict` keeps the strides the state was saved with, and fused AdamW walks
    parameters, gradients and state as flat memory. State saved by an NCHW run (CPU) and loaded for
    channels_last parameters (GPU) would then be updated against the wrong entries, silently (seen
    with the CPU fused kernel; tests/integration/test_train.py). Gradients need nothing: autograd
    already gives each gradient its parameter's strides.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


class Trainer:
    """Built once per process; owns the runtime, the net and its compiled form, the optimizer and
    LR schedule, the EMA, the loader, the monitor and the train state. `run()` is the loop."""

    def __init__(self, cfg: Config, rt: Runtime | None = None):
        from ema_pytorch import EMA

        self.cfg, tc = cfg, cfg.train
        self.rt = rt = rt or build_runtime(cfg)
        self.run_dir = Path(cfg.run_dir)
        self.state = TrainState()
        device = self.device = rt.device
        seed_everything(tc.seed)  # the same initial weights on every rank and every run
        self.net = net = build_model(cfg)
        self.n_params = sum(p.numel() for p in net.parameters())
        seed_everything(derive_seed(tc.seed, rt.rank))
        self.compiled = device.type == "cuda" and tc.compile != "no" or tc.compile == "yes"
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

        # EMA (fp32, from the unwrapped model on its device). Under DeepSpeed bf16 the engine casts
        # `net` to bf16: the EMA stays fp32 and is updated from the bf16 module weights (coerce_dtype),
        # i.e. from the fp32 master weights rounded once; reading the masters themselves would need an
        # all-gather of the ZeRO partitions every step.
        net.to(device, memory_format=self.memory_format)
        self.ema = EMA(net, beta=cfg.ema.decay, min_value=cfg.ema.decay,  # constant decay, no warm-up
                       update_after_step=0, update_every=1, include_online_model=False, use_foreach=True,
                       coerce_dtype=rt.input_dtype is not None)
        self.ema.ema_model.eval().requires_grad_(False)
        self.optimizer, self.scheduler = build_optimizer(cfg, net.parameters(), device)
        # CUDA graphs (reduce-overhead) measured fastest on one GPU (BENCHMARKS.md); with several
        # processes the DDP hooks split the graph, so stay with the default mode there.
        compile_mode = tc.compile_mode if tc.compile_mode != "auto" else (
            "reduce-overhead" if rt.world_size == 1 else "default")
        model = torch.compile(net, mode=compile_mode) if self.compiled else net
        self.model, self.optimizer = rt.accelerator.prepare(model, self.optimizer)
        self.engine = self.model if rt.deepspeed_config is not None else None  # the DeepSpeedEngine
        self.diffusion = build_diffusion(cfg).to(device)
        # Identical on every rank: each rank updates it with the same all-gathered losses.
        self.timestep_sampler = build_timestep_sampler(cfg.diffusion.timestep_sampler, self.diffusion.num_timesteps)
        self.loader = build_loader(cfg.data.urls, image_size=cfg.data.image_size, channels=cfg.data.channels,
                                   micro_batch_size=tc.micro_batch_size, num_workers=cfg.data.num_workers,
                                   seed=tc.seed, rank=rt.rank, world_size=rt.world_size,
                                   pin_memory=device.type == "cuda", max_bad_fraction=cfg.data.max_bad_fraction,
                                   stall_timeout_s=cfg.data.stall_timeout_s, index_commands=cfg.data.index_commands)
        self.monitor: Monitor | None = None
        self.after_step: list[Callable[["Trainer"], None]] = []  # extensions, called after every step
        self.after_resume: list[Callable[["Trainer"], None]] = []  # called once the checkpoint (if any) loaded
        self._saved_rng: dict | None = None
        # In-loop evaluation (eval.every_steps; 0: off, and then nothing of it is built or saved).
        self.evaluator = InLoopEval(cfg, rt, self.diffusion)
        self.registry = CheckpointRegistry()
        self._register_parts()

    # -- what a checkpoint holds ------------------------------------------------------------------

    def _register_parts(self) -> None:
        reg, st, rt = self.registry, self.state, self.rt
        acc, ema, net, scheduler = rt.accelerator, self.ema, self.net, self.scheduler
        # Under DeepSpeed, model.safetensors is the live module (for sampling and export); training
        # resumes from the engine's own files (fp32 masters and every rank's optimizer partition).
        reg.register("model", Kind.TENSORS, net.state_dict,
                     lambda sd: net.load_state_dict(sd) if self.engine is None else None)
        reg.register("ema", Kind.TENSORS, ema.ema_model.state_dict, ema.ema_model.load_state_dict, describe=None)
        if self.engine is None:
            reg.register("optimizer", Kind.OBJECT, self.optimizer.state_dict, self._load_optimizer)
        else:
            reg.register("deepspeed", Kind.COLLECTIVE, lambda: lambda tmp: zero.save_engine(self.engine, tmp),
                         lambda ckpt: zero.load_engine(self.engine, ckpt), describe=lambda: "DeepSpeed engine")
        reg.check(self._check_format)
        reg.register("step", Kind.JSON, lambda: st.step, lambda v: setattr(st, "step", int(v)), describe=None)
        reg.register("images_seen", Kind.JSON, lambda: st.images_seen,
                     lambda v: setattr(st, "images_seen", int(v)), describe=None)
        reg.register("ema_step", Kind.JSON, lambda: int(ema.step), self._load_ema_step,
                     describe=lambda: f"EMA (step {int(ema.step)})")
        reg.register("scheduler", Kind.JSON, scheduler.state_dict, scheduler.load_state_dict,
                     describe=lambda: f"LR schedule (lr {scheduler.get_last_lr()[0]:.3g})")
        if acc.scaler is not None:
            reg.register("scaler", Kind.JSON, acc.scaler.state_dict, acc.scaler.load_state_dict, optional=True,
                         describe=lambda: f"fp16 loss scale {acc.scaler.get_scale():g}")
        sampler = self.timestep_sampler
        if sampler.loss_aware:  # the same on every rank (checked at each save), so written once
            reg.register("timestep_sampler", Kind.OBJECT, sampler.state_dict, sampler.load_state_dict,
                         describe=lambda: "timestep sampler's loss history")
        if self.evaluator.enabled:  # optional: evaluation may be switched on for an existing run
            reg.register("eval", Kind.JSON, self.evaluator.state_dict, self.evaluator.load_state_dict,
                         optional=True, describe=self.evaluator.describe)
        reg.register("rng", Kind.RANK, rng_state, self._load_rng, describe=self._describe_rng)
        reg.register("data", Kind.RANK, self.loader.state_dict, self._load_data, describe=self._describe_data)

    def _check_format(self, ckpt: Path) -> None:
        if (self.engine is not None) != zero.is_zero_checkpoint(ckpt):
            raise CheckpointError(f"{ckpt} was written {'without' if self.engine is not None else 'with'} "
                                  f"DeepSpeed; train.deepspeed cannot change within a run")

    def _load_optimizer(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)
        match_param_layout(self.optimizer)

    def _load_ema_step(self, ema_step: int) -> None:
        self.ema.step.fill_(ema_step)
        self.ema.initted.fill_(ema_step > 0)

    def _load_rng(self, states: RankStates) -> None:
        # Applied at the end of set-up (run()), so nothing done while setting up can shift it.
        self._saved_rng = states.mine
        if states.mine is None:
            log.warning("world size changed (%d saved rank(s) -> %d): RNG starts afresh on each rank",
                        len(states.every_rank()), self.rt.world_size)

    def _describe_rng(self) -> str | None:
        return f"RNG ({', '.join(self._saved_rng)})" if self._saved_rng is not None else None

    def _load_data(self, states: RankStates) -> None:
        self._data_exact = self.loader.resume(states.mine, states.every_rank)
        self._data_saved_ranks = len(states.every_rank()) if not self._data_exact else self.rt.world_size

    def _describe_data(self) -> str:
        if self._data_exact:
            return f"data position of all {self.rt.world_size} rank(s)"
        return f"data position (the epoch's unread samples re-dealt from {self._data_saved_ranks} rank(s))"

    def resume(self) -> Path | None:
        """Load the checkpoint to use (rank 0 lists them, every rank loads the same one), if any."""
        from accelerate.utils import broadcast_object_list

        rt = self.rt
        self.checkpointer = RunDir(self.run_dir).checkpointer(
            self.cfg.ckpt.keep_last, rt.rank, rt.world_size, rt.barrier,
            agree=lambda ok: not rt.any_rank(not ok), share=lambda obj: broadcast_object_list([obj], from_process=0)[0])
        restored: list[str] = []
        resumed = RunDir(self.run_dir).resume(
            lambda ckpt: restored.append(self.registry.load(ckpt, rt.rank, rt.world_size)), self.checkpointer)
        if resumed is not None:
            log.info("resumed from %s: step %d, %d images seen; restored %s",
                     resumed, self.state.step, self.state.images_seen, restored[-1])
        return resumed

    def save(self) -> Path:
        # TensorBoard events up to this step go to disk before the checkpoint exists: a resume
        # from it keeps them and purges later ones (Monitor's purge_step), so no gap and no repeat.
        if self.monitor is not None and self.monitor.writer is not None:
            self.monitor.writer.flush()
        if self.timestep_sampler.loss_aware:
            self._check_sampler_agrees()
        path = self.registry.save(self.checkpointer, self.state.step)
        self.throughput.reset()
        return path

    def _check_sampler_agrees(self) -> None:
        """Rank 0 saves the loss history for all: a rank that drifted would resume differently."""
        if self.rt.world_size == 1:
            return
        digest = self.timestep_sampler.digest().to(self.device)  # (2,) float64
        gathered = self.rt.accelerator.gather(digest).view(-1, digest.numel())
        if not bool((gathered == digest).all()):
            raise RuntimeError(f"timestep sampler state differs between ranks at step {self.state.step}")

    def _update_sampler(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Every rank records every rank's (t, loss) in rank order, so all draw from the same weights."""
        acc = self.rt.accelerator
        self.timestep_sampler.update(acc.gather(t).cpu(), acc.gather(losses).cpu())

    # -- the loop ---------------------------------------------------------------------------------

    def micro_batches(self, step: int):
        """This rank's micro batches of optimizer step `step`: data from the stream, timesteps, noise
        and flips from (seed, step, rank, micro), so a resumed run draws the same numbers."""
        cfg, rt, device, fmt = self.cfg, self.rt, self.device, self.memory_format
        for micro in range(cfg.train.grad_accum_steps):
            t0 = time.perf_counter()
            batch = next(self.data_iter)
            wait = time.perf_counter() - t0
            self.generator.manual_seed(derive_seed(cfg.train.seed, step, rt.rank, micro))
            # Dropout draws from the global RNG: reseed it here, after the batch is fetched, so
            # nothing else that touches it (loader start-up, sampling) can shift a resumed run.
            torch.manual_seed(derive_seed(cfg.train.seed, step, rt.rank, micro, DROPOUT_STREAM))
            x0 = to_model_input(batch, device, random_flip=cfg.data.random_flip, generator=self.generator)
            x0 = x0.contiguous(memory_format=fmt)
            t, weights = self.timestep_sampler.sample(self.diffusion, x0.shape[0], device, generator=self.generator)
            noise = torch.randn(x0.shape, device=device, generator=self.generator).contiguous(memory_format=fmt)
            self.throughput.add(x0.shape[0] * rt.world_size, wait)
            yield MicroBatch(x0, t, noise, weights)

    def _due(self, every_steps: int) -> bool:
        step = self.state.step
        return bool(every_steps) and (step % every_steps == 0 or step == self.cfg.train.max_steps)

    def run(self) -> TrainResult:
        cfg, tc, rt, st = self.cfg, self.cfg.train, self.rt, self.state
        # Resume from the checkpoint to use, if any.
        self.resume()
        for hook in self.after_resume:
            hook(self)
        if rt.is_main:
            log.info("model %.2fM parameters; global batch %d = %d x %d accum x %d ranks; device %s; %s; "
                     "compile %s", self.n_params / 1e6, rt.global_batch_size, tc.micro_batch_size,
                     tc.grad_accum_steps, rt.world_size, self.device, tc.mixed_precision, self.compiled)
        # Monitoring, the data stream, and the RNG restored last (set-up must not shift it).
        self.monitor = Monitor(self.run_dir, rt.is_main, tc.max_steps, st.step)
        self.window = _Window(self)
        self.throughput = self.window.throughput
        self.generator = torch.Generator(device=self.device)
        self.data_iter = iter(self.loader)
        if self._saved_rng is not None:
            set_rng_state(self._saved_rng)
        try:
            while st.step < tc.max_steps:
                # One optimizer step over grad_accum_steps micro batches, fetched as the step consumes them.
                lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses, for logging
                result = optimizer_step(rt.accelerator, self.model, self.net, self.optimizer, self.diffusion,
                                        self.micro_batches(st.step), tc.grad_accum_steps, cfg.optim.grad_clip,
                                        scheduler=self.scheduler, ema=self.ema, input_dtype=rt.input_dtype,
                                        on_losses=self._update_sampler if self.timestep_sampler.loss_aware else None)
                st.step += 1
                st.images_seen += rt.global_batch_size
                # Scalars and the progress bar: one host sync per window, not per step.
                self.window.add(result, lr)
                if self._due(cfg.log.every_steps):
                    self.window.log()
                # Extensions, then samples from the EMA weights, then the checkpoint.
                for hook in self.after_step:
                    hook(self)
                # Evaluation of the EMA weights on every rank (before the checkpoint, so a checkpoint
                # at this step means this step's evaluation is done).
                if self.evaluator.maybe_run(st.step, self.ema.ema_model, self.monitor) is not None:
                    self.throughput.reset()
                if self._due(cfg.log.sample_every_steps):
                    self.sample_grid()
                if self._due(cfg.ckpt.every_steps):
                    self.save()
                # Stop on a signal (SLURM's pre-timeout warning, SIGTERM) at an agreed step.
                self.stop_if_signalled()
        finally:
            self.monitor.close()
        rt.accelerator.end_training()
        return TrainResult(step=st.step, images_seen=st.images_seen, run_dir=self.run_dir)

    def close(self) -> None:
        """Stop the loader's workers now: the Trainer's parts reference each other, so waiting for
        the garbage collector would leave the workers to interpreter exit, which waits on them."""
        self.data_iter = None
        self.loader.close()

    def sample_grid(self) -> None:
        cfg = self.cfg
        if self.rt.is_main:
            from pipeline.diffusion.sampling import sample_images

            images = sample_images(self.ema.ema_model, self.diffusion, cfg.log.num_samples, cfg.data.channels,
                                   cfg.data.image_size, sampler="ddim", steps=cfg.log.sample_steps,
                                   seed=cfg.train.seed, device=self.device)
            path = self.monitor.samples(self.state.step, images)
            self.monitor.write(f"step {self.state.step}: samples in {path}")
        self.throughput.reset()

    def stop_if_signalled(self) -> None:
        """At a step every rank agrees on, after a complete checkpoint; a finished run ends normally
        instead (exit 0, no requeue)."""
        step, tc, rt = self.state.step, self.cfg.train, self.rt
        if step < tc.max_steps and (rt.world_size == 1 or step % tc.stop_check_steps == 0) \
                and rt.any_rank(preempt.received() is not None):
            if step % self.cfg.ckpt.every_steps != 0:
                self.save()
            rt.accelerator.end_training()
            raise preempt.Preempted(step, preempt.received() or "a signal to another rank",
                                    self.checkpointer.dir / step_name(step))


class _Window:
    """Loss, grad norm and throughput summed on the device over a logging window."""

    def __init__(self, trainer: Trainer):
        self.t = trainer
        device = trainer.device
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.steps = 0
        self.lr = 0.0
        self.throughput = Throughput()
        is_main = trainer.rt.is_main
        self.flops_per_image = count_flops_per_image(trainer.cfg) if is_main else 0.0
        self.peak_flops = matmul_peak_flops(device) if is_main else None

    def add(self, result, lr: float) -> None:
        self.loss_sum += result.loss
        self.grad_norm_sum += result.grad_norm.to(self.t.device)
        self.steps += 1
        self.lr = lr

    def log(self) -> None:
        t = self.t
        step = t.state.step
        mean_loss = t.rt.accelerator.reduce(self.loss_sum, reduction="mean").item() / self.steps
        mean_norm = self.grad_norm_sum.item() / self.steps
        images_per_sec, data_wait_frac = self.throughput.read()
        scalars = {"train/loss": mean_loss, "train/lr": self.lr, "train/grad_norm": mean_norm,
                   "train/images_seen": t.state.images_seen,
                   "perf/images_per_sec": images_per_sec, "perf/data_wait_frac": data_wait_frac}
        if self.peak_flops:
            scalars["perf/mfu"] = images_per_sec * self.flops_per_image / self.peak_flops
        if t.device.type == "cuda":
            scalars["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(t.device) / 2**30
        for k, v in t.loader.stats().items():
            scalars[f"data/{k}"] = v
        t.monitor.scalars(step, scalars)
        t.monitor.progress(step, loss=f"{mean_loss:.4f}", img_s=f"{images_per_sec:.0f}")
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {step}; lower optim.lr or use bf16")
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.steps = 0


def train(cfg: Config, dry_run: bool = False) -> TrainResult | None:
    """Train (or resume) the run in cfg.run_dir up to cfg.train.max_steps optimizer steps."""
    # Fail at start-up, not at step 50,000: shards must exist before the model is built.
    urls = resolve_urls(cfg.data.urls, stall_timeout_s=cfg.data.stall_timeout_s,
                        index_commands=cfg.data.index_commands)
    rt = build_runtime(cfg)
    if dry_run:
        if rt.is_main:
            seed_everything(cfg.train.seed)
            n_params = sum(p.numel() for p in build_model(cfg).parameters())
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
    # One trainer per run directory: rank 0 takes the lock, and every rank stops if it could not,
    # before anyone writes anything.
    run_dir = Path(cfg.run_dir)
    lock, problem = RunLock(run_dir), None
    if rt.is_main:
        try:
            lock.acquire()
        except UserError as e:
            problem = e
    if rt.any_rank(problem is not None):
        raise problem or UserError(f"rank 0 could not lock run_dir '{run_dir}' (its log says why)")
    try:
        save_config_later = check_run_config(run_dir, cfg, rt.is_main)
        rt.barrier()
        trainer = Trainer(cfg, rt)
        if save_config_later:
            trainer.after_resume.append(lambda t: save_run_config(run_dir, cfg) if rt.is_main else None)
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        lock.release()
