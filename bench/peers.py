"""Peer baselines: training-step throughput of the DDPM CIFAR-10 UNet as users run it today.

Importable copy of the peers in `shared/bench/peer_baseline.py` (the script behind
`shared/notes/gpu-peer-baseline.md`; the GPU machine does not get `shared/`). The measurement
is the same as there; only the globals (device, logging, printing) became arguments and return
values. Nothing here prints or writes files.

Peers:
  - diffusers UNet2DModel with the google/ddpm-cifar10-32 config (35.7M params), the model that
    diffusers' train_unconditional.py trains; eps-objective step + AdamW + ema-pytorch update
    (`bench_diffusers`), in the five configs of the source script, the last being
    torch.compile(mode="reduce-overhead") (CUDA graphs), the strongest one-flag variant, plus the
    same without channels_last (`PEER_CONFIGS`);
  - lucidrains denoising-diffusion-pytorch GaussianDiffusion(Unet(dim=128, dim_mults=(1,2,2,2))),
    its Trainer's step (bf16 autocast) without the data loader (`bench_lucidrains`).
Also: bf16 matmul ceiling (`matmul_ceiling_tflops`) and FLOPs per image (`flops_per_image`,
torch.utils.flop_counter, forward + backward) -> MFU = img_s * flops / 1e12 / ceiling.

To reproduce the source script's numbers, call `setup_cuda_backends()` first (TF32 on,
cudnn.benchmark), use steps=40, warm=10 and give compiled configs `COMPILE_EXTRA_WARM` more
warm-up steps, as the source's main() did. Needs diffusers 0.42, ema-pytorch and
denoising-diffusion-pytorch importable (see bench/README.md).
"""
import time

import torch
import torch.nn.functional as F

__all__ = [
    "PEER_CONFIGS", "COMPILE_EXTRA_WARM", "default_device", "setup_cuda_backends",
    "matmul_ceiling_tflops", "diffusers_unet", "alphas_bar", "flops_per_image",
    "bench_diffusers", "bench_lucidrains",
]

# (name, amp, channels_last, compile_) as in the source script; compile_ is False, True
# (default torch.compile) or a torch.compile mode string.
PEER_CONFIGS = [
    ("fp32(tf32)", False, False, False),
    ("bf16", True, False, False),
    ("bf16+cl", True, True, False),
    ("bf16+cl+compile", True, True, True),
    ("bf16+cl+compile(reduce-overhead)", True, True, "reduce-overhead"),
    # Not in the source script. Stock GroupNorm drops channels_last on CUDA (pipeline.models.unet.GroupNorm),
    # so the peer may do better without it; the best-peer comparison has to include this variant.
    ("bf16+compile(reduce-overhead)", True, False, "reduce-overhead"),
]

# The source script warmed compiled configs with `warm + 5` steps.
COMPILE_EXTRA_WARM = 5


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dev_type(device):
    return torch.device(device).type


def _sync(device):
    if _dev_type(device) == "cuda":
        torch.cuda.synchronize(device)


def setup_cuda_backends():
    """The backend flags the source script set before measuring (TF32 on, cudnn.benchmark)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def matmul_ceiling_tflops(device=None, n=8192):
    """Dense bf16 n x n matmul throughput in TFLOP/s (3 warm-up, 10 timed); None off CUDA."""
    device = device or default_device()
    if _dev_type(device) != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    dt = (time.perf_counter() - t) / 10
    return 2 * n**3 / dt / 1e12


def diffusers_unet():
    """diffusers UNet2DModel with the google/ddpm-cifar10-32 config (35.75M params)."""
    from diffusers import UNet2DModel
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
        mid_block_scale_factor=1, dropout=0.1,
    )


def alphas_bar(T=1000):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def flops_per_image(model_fn=None, image_size=32, channels=3, device=None, batch=8, timesteps=1000):
    """Forward + backward FLOPs per image counted by torch.utils.flop_counter.

    model_fn() returns a module called as model(x, t) (x: [B, C, H, W], t: int64 [B]); its
    output is a tensor or an object with `.sample` (diffusers). Default: `diffusers_unet`.
    """
    from torch.utils.flop_counter import FlopCounterMode
    device = device or default_device()
    model = (model_fn or diffusers_unet)().to(device)
    x = torch.randn(batch, channels, image_size, image_size, device=device)
    t = torch.randint(0, timesteps, (batch,), device=device)
    with FlopCounterMode(display=False) as fc:
        out = model(x, t)
        out = getattr(out, "sample", out)
        out.sum().backward()
    return fc.get_total_flops() / batch


def _time_steps(step, batch, steps, warm, device, params):
    """`warm` untimed calls of `step()`, then `steps` timed ones.

    peak_gib covers the warm-up too: with CUDA graphs the activations are allocated while the graphs
    are recorded, and replays allocate nothing, so a peak taken over the timed steps alone would
    show only the weights and optimizer state.
    Returns dict(img_s, step_ms, loss (of the last step), peak_gib (None off CUDA), params)."""
    dt_ = _dev_type(device)
    if dt_ == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warm):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if dt_ == "cuda" else None
    return dict(img_s=batch * steps / dt, step_ms=1000 * dt / steps, loss=float(loss),
                peak_gib=mem, params=params)


def bench_diffusers(batch, amp, channels_last, compile_, steps=40, warm=10, device=None):
    """Time `steps` training steps of the diffusers DDPM UNet after `warm` untimed ones.

    Step: x_t from random x0 in [-1, 1], t ~ U{0..999}, eps-MSE (bf16 autocast if amp), AdamW
    (fused on CUDA), grad-norm clip 1.0, EMA(beta=0.9999) update every step.
    Returns dict(img_s, step_ms, loss, peak_gib (None off CUDA), params).
    """
    from ema_pytorch import EMA
    device = device or default_device()
    dt_ = _dev_type(device)
    torch.manual_seed(0)
    model = diffusers_unet().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, beta=0.9999, update_after_step=0, update_every=1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=(dt_ == "cuda"))
    if compile_:
        fwd = torch.compile(model, mode=compile_) if isinstance(compile_, str) else torch.compile(model)
    else:
        fwd = model
    ab = alphas_bar().to(device)
    x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        eps = torch.randn_like(x0)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with torch.autocast(dt_, dtype=torch.bfloat16, enabled=amp):
            pred = fwd(xt, t).sample
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update()
        return loss

    return _time_steps(step, batch, steps, warm, device, params=sum(p.numel() for p in model.parameters()))


def bench_lucidrains(batch, steps=40, warm=10, device=None):
    """Time `steps` training steps of lucidrains GaussianDiffusion(Unet(128, (1,2,2,2))).

    Step as its Trainer does it without the loader: x0 in [0, 1], bf16 autocast, Adam(2e-4,
    betas (0.9, 0.99)), grad-norm clip 1.0, EMA update every step.
    Returns dict(img_s, step_ms, loss, peak_gib (None off CUDA; the source script did not record
    it), params (of the Unet)).
    """
    from denoising_diffusion_pytorch import Unet, GaussianDiffusion
    from ema_pytorch import EMA
    device = device or default_device()
    dt_ = _dev_type(device)
    torch.manual_seed(0)
    unet = Unet(dim=128, dim_mults=(1, 2, 2, 2), flash_attn=True)
    diff = GaussianDiffusion(unet, image_size=32, timesteps=1000, objective="pred_noise").to(device)
    ema = EMA(diff, beta=0.9999, update_every=1, update_after_step=0)
    opt = torch.optim.Adam(diff.parameters(), lr=2e-4, betas=(0.9, 0.99))
    x0 = torch.rand(batch, 3, 32, 32, device=device)  # trainer feeds [0,1]

    def step():
        with torch.autocast(dt_, dtype=torch.bfloat16):
            loss = diff(x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diff.parameters(), 1.0)
        opt.step()
        ema.update()
        return loss

    return _time_steps(step, batch, steps, warm, device, params=sum(p.numel() for p in unet.parameters()))
