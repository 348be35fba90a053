"""Training-step speed of our pipeline against the peers, measured side by side in one process.

    python bench/train_speed.py --out results.jsonl               # on a GPU machine: the full table
    python bench/train_speed.py --quick --out /tmp/r.jsonl        # CPU, tiny sizes (what CI runs)

Sections, each a JSON line in --out (written as soon as measured, so a cut-off run keeps what it got):
  info / ceiling   device, torch version, bf16 matmul TFLOP/s measured now (the MFU denominator)
  flops            forward+backward FLOPs per image of our UNet and of diffusers' UNet2DModel
  ours             our training step (epsilon loss on uint8 batches flipped/scaled on the device, AdamW
                   fused, grad clip, EMA every step) in eager and compiled variants, batch 128 and 512;
                   "stock-norm" rows swap our channels_last GroupNorm/upsample for ATen's (ablation)
  peer             diffusers UNet2DModel (its best variants) and lucidrains, from bench/peers.py
  match            fast path (bf16 + compile) loss over the first steps vs eager fp32, same seed
  loop             the real `pipeline.train.train` loop on JPEG shards: images/s, data wait, MFU
  profile          CUDA kernels of the timed steps only -> profile.txt, profile-shapes.txt beside --out
  norm             GroupNorm + SiLU forward and backward alone, compiled: ours, a direct variant, stock (ms)
A --deadline (seconds) skips what would not finish in time, so one device call always returns.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.loader import to_model_input  # noqa: E402
from pipeline.factory import build_diffusion, build_model, count_flops_per_image  # noqa: E402

START = time.perf_counter()
GROUPS = ("table", "profile", "loop", "ablation", "match", "norm", "extra")  # GPU run order


class Recorder:
    def __init__(self, path: Path, deadline_s: float):
        self.path, self.deadline_s = path, deadline_s
        path.parent.mkdir(parents=True, exist_ok=True)

    def left_s(self) -> float:
        return self.deadline_s - (time.perf_counter() - START)

    def log(self, **rec) -> None:
        rec["t_s"] = round(time.perf_counter() - START, 1)
        print(json.dumps(rec), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def section(self, name: str, need_s: float, fn, **tags) -> None:
        if self.left_s() < need_s:
            self.log(kind=name, skipped=f"needs ~{need_s:.0f}s, {self.left_s():.0f}s left", **tags)
            return
        torch._dynamo.reset()  # else a second batch size silently compiles a dynamic-shape graph
        try:
            self.log(kind=name, **tags, **fn())
        except Exception as e:  # noqa: BLE001 - record and go on to the next measurement
            traceback.print_exc()
            self.log(kind=name, **tags, error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def our_step_bench(cfg, batch: int, *, amp: bool, compile_mode, steps: int, warm: int, device, seed: int = 0,
                   record_losses: bool = False, stock_ops: bool = False, profiler=None,
                   channels_last: bool | None = None) -> dict:
    """Our training step as the loop runs it, without Accelerate's wrapper (one process, no DDP).

    `stock_ops`: the model uses ATen's GroupNorm and interpolate instead of our channels_last ones
    (the ablation that shows what they are worth). `profiler`: a context manager entered around the
    timed steps only (not compilation or CUDA-graph recording). `channels_last`: the memory format
    (default: channels_last on CUDA, as the loop; a CPU test sets it to check the GPU's layout path)."""
    from ema_pytorch import EMA

    from pipeline.models import unet

    unet.CHANNELS_LAST_OPS = not stock_ops
    try:
        return _our_step_bench(cfg, batch, amp=amp, compile_mode=compile_mode, steps=steps, warm=warm,
                               device=device, seed=seed, record_losses=record_losses, EMA=EMA,
                               profiler=profiler or contextlib.nullcontext(),
                               channels_last=device.type == "cuda" if channels_last is None else channels_last)
    finally:
        unet.CHANNELS_LAST_OPS = True


def _our_step_bench(cfg, batch, *, amp, compile_mode, steps, warm, device, seed, record_losses, EMA, profiler,
                    channels_last):
    torch.manual_seed(seed)
    cuda = device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = build_model(cfg).to(device, memory_format=fmt)
    ema = EMA(net, beta=0.9999, min_value=0.9999, update_after_step=0, update_every=1,
              include_online_model=False, use_foreach=True)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, fused=cuda)
    if compile_mode is None:
        model = net
    elif compile_mode == "default":
        model = torch.compile(net)
    else:
        model = torch.compile(net, mode=compile_mode)
    diffusion = build_diffusion(cfg).to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Distinct uint8 batches, resident on the device: the step, not the loader, is measured here.
    pool = [torch.randint(0, 256, (batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                          dtype=torch.uint8, generator=g).to(device) for _ in range(4)]
    gen = torch.Generator(device=device)
    losses = []

    def step(i):
        gen.manual_seed(seed * 1_000_003 + i)
        x0 = to_model_input(pool[i % len(pool)], device, random_flip=True, generator=gen).contiguous(memory_format=fmt)
        t = diffusion.sample_timesteps(batch, device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = diffusion.loss(model, x0, t, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        return loss.detach()

    if cuda:  # the peak covers warm-up: with CUDA graphs, activations are allocated while recording
        torch.cuda.reset_peak_memory_stats()
    for i in range(warm):
        out = step(i)
        if record_losses:
            losses.append(float(out))
    sync(device)
    with profiler:
        t0 = time.perf_counter()
        for i in range(warm, warm + steps):
            out = step(i)
        sync(device)
        dt = time.perf_counter() - t0
    res = dict(img_s=batch * steps / dt, step_ms=1000 * dt / steps, loss=float(out),
               params=sum(p.numel() for p in net.parameters()))
    if cuda:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if record_losses:
        res["losses"] = losses
    return res


def loop_bench(cfg_path: Path, shards: str, batch: int, steps: int, workers: int, device,
               compile_mode: str = "default") -> dict:
    """The real loop (`pipeline.train.train`), read back from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.config import load_config as load
    from pipeline.train.trainer import train

    run = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    every = max(steps // 6, 1)
    cfg = load(cfg_path, [f"run_dir={run}", f"data.urls={shards}", f"train.micro_batch_size={batch}",
                          f"train.max_steps={steps}", f"log.every_steps={every}", "log.sample_every_steps=0",
                          f"ckpt.every_steps={steps}", f"data.num_workers={workers}",
                          "optim.warmup_steps=10", f"train.compile_mode={compile_mode}"] + ([] if device.type == "cuda" else ["train.mixed_precision=no"]))
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    # Drop the first window (compilation, worker start-up); average the rest.
    def steady(tag):
        vals = [e.value for e in acc.Scalars(tag)][1:] if tag in acc.Tags()["scalars"] else []
        return sum(vals) / len(vals) if vals else None
    return dict(img_s=steady("perf/images_per_sec"), data_wait_frac=steady("perf/data_wait_frac"),
                mfu=steady("perf/mfu"), max_memory_gib=steady("perf/max_memory_gib"),
                loss_last=[e.value for e in acc.Scalars("train/loss")][-1], wall_s=wall, steps=steps)


def _group_norm_direct(norm, x):
    """The alternative formulation: one var_mean over (H*W, C/G) of the (N, H*W, G, C/G) view of
    the NHWC memory (strided reads within a group), for the micro-bench only."""
    n, c, h, w = x.shape
    g = norm.num_groups
    xg = x.permute(0, 2, 3, 1).reshape(n, h * w, g, c // g).float()
    var, mean = torch.var_mean(xg, dim=(1, 3), keepdim=True, correction=0)
    y = ((xg - mean) * torch.rsqrt(var + norm.eps)).reshape(n, h, w, c) * norm.weight + norm.bias
    return y.permute(0, 3, 1, 2)


def norm_bench(device, shapes, steps: int, warm: int = 3) -> dict:
    """GroupNorm -> SiLU, forward and backward, bf16 channels_last input, compiled, at the model's
    shapes, ms per call: ours (per-channel statistics combined per group), the direct variant
    (one strided reduction per group) and the stock op. The layout effect of the norm alone."""
    from pipeline.models import unet

    out = {}
    for n, c, h, w in shapes:
        for name, stock in (("ours", False), ("direct", False), ("stock", True)):
            torch._dynamo.reset()
            unet.CHANNELS_LAST_OPS = not stock
            try:
                norm = unet.GroupNorm(32, c, eps=1e-6).to(device)
                apply = (lambda v: _group_norm_direct(norm, v)) if name == "direct" else norm
                x = torch.randn(n, c, h, w, device=device, dtype=torch.bfloat16)
                x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
                dy = torch.randn_like(x)
                fn = torch.compile(lambda v: torch.nn.functional.silu(apply(v)).to(torch.bfloat16))
                for _ in range(warm):
                    torch.autograd.grad(fn(x), x, dy)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    torch.autograd.grad(fn(x), x, dy)
                sync(device)
                out[f"{name}_{n}x{c}x{h}x{w}_ms"] = 1000 * (time.perf_counter() - t0) / steps
            finally:
                unet.CHANNELS_LAST_OPS = True
    return out


def profile_step(cfg, batch: int, compile_mode, device, out_dir: Path) -> dict:
    """Where the CUDA time of the timed steps goes (compilation and warm-up excluded): kernels in
    profile.txt, the same with input shapes (to find what a copy is copying) in profile-shapes.txt."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True)
    res = our_step_bench(cfg, batch, amp=True, compile_mode=compile_mode, steps=5, warm=10, device=device,
                         profiler=prof)
    averages = prof.key_averages()
    (out_dir / "profile.txt").write_text(averages.table(sort_by="cuda_time_total", row_limit=45,
                                                         max_name_column_width=110))
    (out_dir / "profile-shapes.txt").write_text(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60, max_shapes_column_width=120))
    cuda_us = sum(e.self_device_time_total for e in averages)
    copy_us = sum(e.self_device_time_total for e in averages if "copy" in e.key.lower() or "clone" in e.key.lower())
    return dict(files=["profile.txt", "profile-shapes.txt"], step_ms=res["step_ms"],
                cuda_ms_per_step=cuda_us / 1000 / 5, copy_or_clone_named_frac=copy_us / max(cuda_us, 1e-9))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "train_speed.jsonl")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--deadline", type=float, default=520, help="seconds; later sections are skipped past it")
    p.add_argument("--shards", default=None, help="JPEG shards for the loop section (dir, glob or brace pattern)")
    p.add_argument("--batches", default="128,512")
    p.add_argument("--only", default=None,
                   help=f"GPU run: comma-separated groups, in this order by default: {','.join(GROUPS)}")
    args = p.parse_args(argv)
    unknown = [g for g in (args.only or "").split(",") if g and g not in GROUPS]
    if unknown:
        p.error(f"--only: unknown group(s) {', '.join(unknown)}; choose from {','.join(GROUPS)}")
    rec = Recorder(args.out, args.deadline)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    import peers

    if device.type == "cuda":
        peers.setup_cuda_backends()
    rec.log(kind="info", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            torch=torch.__version__, date=datetime.date.today().isoformat(), argv=sys.argv[1:])
    if args.quick:
        cfg = load_config(REPO / "configs/demo.yaml", ["model.channels=8", "model.channel_mult=[1,2]",
                                                         "model.attention_resolutions=[14]"])
        b_small = b_large = 4
        steps, warm, loop_cfg, loop_batch, loop_steps, workers = 2, 1, "configs/demo.yaml", 8, 6, 1
    else:
        cfg = load_config(REPO / "configs/cifar10.yaml")
        b_small, b_large = (int(b) for b in args.batches.split(","))
        steps, warm, loop_cfg, loop_batch, loop_steps = 40, 10, "configs/cifar10.yaml", b_small, 600
        workers = min(12, os.cpu_count() or 1)
    ceiling = peers.matmul_ceiling_tflops(device) if device.type == "cuda" else None
    rec.log(kind="ceiling", bf16_matmul_tflops=ceiling)
    flops = count_flops_per_image(cfg)
    rec.log(kind="flops", ours_fwd_bwd_flops_per_image=flops)

    def mfu(res):
        if ceiling and res.get("img_s"):
            res["mfu"] = res["img_s"] * flops / (ceiling * 1e12)
        return res

    def ours(batch, name, amp, mode, stock_ops=False):
        compile_warm = 5 if mode else 0
        rec.section("ours", 15 if mode is None else 90, lambda: mfu(our_step_bench(
            cfg, batch, amp=amp, compile_mode=mode, steps=steps, warm=warm + compile_warm, device=device,
            stock_ops=stock_ops)), cfg=name + (" stock-norm" if stock_ops else ""), batch=batch)

    def peer(batch, name):
        amp, cl, comp = next((a, c, k) for n, a, c, k in peers.PEER_CONFIGS if n == name)
        rec.section("peer", 90 if comp else 20, lambda: mfu(peers.bench_diffusers(
            batch, amp, cl, comp, steps=steps, warm=warm + (peers.COMPILE_EXTRA_WARM if comp else 0), device=device)),
            peer="diffusers", cfg=name, batch=batch)

    def match():
        n, mode = (3, None) if args.quick else (8, "default")
        ref = our_step_bench(cfg, b_small, amp=False, compile_mode=None, steps=1, warm=n, device=device,
                             record_losses=True)["losses"]
        fast = our_step_bench(cfg, b_small, amp=True, compile_mode=mode, steps=1, warm=n, device=device,
                              record_losses=True)["losses"]
        return dict(eager_fp32=ref, fast_bf16=fast, max_rel_diff=max(abs(a - b) / abs(a) for a, b in zip(ref, fast)))

    shards = args.shards or str(REPO / "data/demo")
    loop_mode = "default" if args.quick else "reduce-overhead"
    if args.quick:
        ours(b_small, "eager-fp32", False, None)
        ours(b_small, "eager-bf16", True, None)
        ours(b_small, "eager-bf16", True, None, stock_ops=True)
        rec.section("profile", 15, lambda: profile_step(cfg, b_small, None, device, args.out.parent))
        rec.section("norm", 30, lambda: norm_bench(device, [(2, 64, 8, 8)], steps=2))
        rec.section("match", 15, match)
        rec.section("loop", 20, lambda: mfu(loop_bench(REPO / loop_cfg, shards, loop_batch, loop_steps, workers,
                                                       device)), batch=loop_batch, shards=shards)
    else:
        ro = "bf16+cl+compile(reduce-overhead)"

        def table():  # the acceptance numbers: ours vs the best peer variants, same process
            for b in (b_small, b_large):
                ours(b, ro, True, "reduce-overhead")
                peer(b, ro)
                peer(b, "bf16+compile(reduce-overhead)")  # stock GroupNorm may favour NCHW

        def extra():  # the other variants, for the full picture
            for b in (b_small, b_large):
                ours(b, "bf16+cl+compile", True, "default")
                peer(b, "bf16+cl+compile")
            for b in (b_small, b_large):
                ours(b, "bf16+cl eager", True, None)
                peer(b, "bf16")
                rec.section("peer", 30, lambda: mfu(peers.bench_lucidrains(b, steps=steps, warm=warm, device=device)),
                            peer="lucidrains", cfg="bf16-autocast", batch=b)

        groups = {
            "table": table,
            "profile": lambda: rec.section("profile", 75, lambda: profile_step(
                cfg, b_large, "reduce-overhead", device, args.out.parent), batch=b_large),
            "loop": lambda: rec.section("loop", 150, lambda: mfu(loop_bench(
                REPO / loop_cfg, shards, loop_batch, loop_steps, workers, device, compile_mode=loop_mode)),
                batch=loop_batch, shards=shards, compile_mode=loop_mode),
            "ablation": lambda: ours(b_large, ro, True, "reduce-overhead", stock_ops=True),
            "match": lambda: rec.section("match", 90, match),
            "norm": lambda: rec.section("norm", 40, lambda: norm_bench(
                device, [(b_large, 128, 32, 32), (b_large, 256, 16, 16)], steps=20)),
            "extra": extra,
        }
        assert tuple(groups) == GROUPS
        # Most important first: a cut-off run still answers "how do we compare with the best peer?".
        for g in args.only.split(",") if args.only else GROUPS:
            groups[g]()
    rec.log(kind="done", elapsed_s=round(time.perf_counter() - START, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
