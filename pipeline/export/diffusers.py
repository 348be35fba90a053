"""The diffusers format: a folder `diffusers.DDPMPipeline.from_pretrained` (and `DDIMPipeline`) load.

    OUT_DIR/model_index.json                                  DDPMPipeline = UNet2DModel + DDPMScheduler
    OUT_DIR/unet/config.json                                  the UNet2DModel that is our UNet
    OUT_DIR/unet/diffusion_pytorch_model.safetensors          the EMA weights under diffusers' names
    OUT_DIR/scheduler/scheduler_config.json                   betas, variance, prediction, clipping

Written without importing diffusers (it is an optional extra, not a training dependency). Our UNet
is Ho et al.'s, which is what diffusers' `UNet2DModel` was written to hold (`google/ddpm-cifar10-32`):
the same layers in the same order, so the mapping below renames tensors and splits our fused q/k/v
projection; nothing is re-initialised or approximated. The settings that make it the same function:

- `freq_shift=1`, `flip_sin_to_cos=False`: our sinusoidal embedding, [sin | cos] with frequencies
  exp(-log(10000) i / (half - 1));
- `downsample_padding=1`: our stride-2 conv pads 1 on every side (diffusers' 0 pads like TF's SAME);
- `norm_eps=1e-6`, `attention_head_dim=None` (one head of width C, scale C**-0.5).

What `UNet2DModel` cannot express is refused with one line (`ExportError`): one `norm_num_groups`
for every GroupNorm (our narrow models, below 128 channels, use C // 4 groups, which varies with the
width), a first level wider than `model.channels` (diffusers' `conv_in` writes
`block_out_channels[0]`), and objectives its schedulers do not have.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError

# The version this writer was tested against (tests/test_export_diffusers.py): recorded in the JSON
# files as diffusers itself records the version that wrote them.
DIFFUSERS_VERSION = "0.42.1"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"

# Our diffusion.prediction / diffusion.variance -> diffusers' prediction_type / variance_type.
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large",
                  "learned_range": "learned_range"}


class ExportError(UserError):
    """A run diffusers cannot hold (its UNet or its objective): one line that says why."""


# ----------------------------------------------------------------------------- objective

def objective(cfg) -> tuple[str, str]:
    """(prediction, variance) of the run in our names (the config's diffusion.prediction and
    diffusion.variance; a config saved before those keys existed reads their defaults, eps and
    fixed_large, which is what the sampler then did)."""
    return cfg.diffusion.prediction, cfg.diffusion.variance


# ----------------------------------------------------------------------------- UNet2DModel

def group_counts(model: torch.nn.Module) -> list[int]:
    """The distinct GroupNorm group counts of `model`, sorted."""
    return sorted({m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)})


def unet_config(cfg, model: torch.nn.Module) -> dict[str, Any]:
    """The `UNet2DModel` config (unet/config.json) for our UNet `model` built from `cfg`; raises
    `ExportError` for a UNet that `UNet2DModel` cannot express."""
    m = cfg.model
    mult = [int(x) for x in m.channel_mult]
    if mult[0] != 1:
        raise ExportError(f"model.channel_mult={mult} starts at {mult[0]}: diffusers' UNet2DModel "
                          f"runs its first level at the width of conv_in, so it needs "
                          f"model.channel_mult[0] = 1 (or export with --format native)")
    groups = group_counts(model)
    if len(groups) != 1:
        raise ExportError(f"model.channels={m.channels} is too narrow for diffusers' UNet2DModel: our "
                          f"GroupNorms use {', '.join(map(str, groups))} groups (C // 4 below 128 "
                          f"channels) where UNet2DModel has one norm_num_groups; train with "
                          f"model.channels >= 128, a multiple of 32, or export with --format native")
    sizes = [cfg.data.image_size // 2 ** i for i in range(len(mult))]
    attn = [size in set(m.attention_resolutions) for size in sizes]
    out_channels = model.conv_out.out_channels  # 2C for a learned variance
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.data.image_size,
        "in_channels": cfg.data.channels,
        "out_channels": out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [m.channels * k for k in mult],
        "layers_per_block": m.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": m.dropout,
        "act_fn": "silu",
        "attention_head_dim": None,
        "norm_num_groups": groups[0],
        "attn_norm_num_groups": None,
        "norm_eps": model.norm_out.eps,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None,
    }


_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
             "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_TOP = {"temb_dense0": "time_embedding.linear_1", "temb_dense1": "time_embedding.linear_2",
        "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out",
        "mid_block1": "mid_block.resnets.0", "mid_attn": "mid_block.attentions.0",
        "mid_block2": "mid_block.resnets.1"}
_LEVEL = re.compile(r"^(down|up)\.(\d+)\.(blocks|attns|downsample|upsample)\.(.*)$")


def _rename(key: str) -> str | list[str]:
    """Our state-dict key -> diffusers' (a list of three for the fused q/k/v projection)."""
    match = _LEVEL.match(key)
    if match:
        side, level, part, rest = match.groups()
        prefix = f"{side}_blocks.{level}."
        if part in ("downsample", "upsample"):  # rest = conv.weight / conv.bias
            return f"{prefix}{part}rs.0.{rest}"
        index, rest = rest.split(".", 1)
        kind = "resnets" if part == "blocks" else "attentions"
        return _inner(f"{prefix}{kind}.{index}.", rest, kind == "attentions")
    top, rest = key.split(".", 1)
    if top not in _TOP:
        raise KeyError(key)
    return _inner(_TOP[top] + ".", rest, top == "mid_attn") if top.startswith("mid") \
        else f"{_TOP[top]}.{rest}"


def _inner(prefix: str, rest: str, attention: bool) -> str | list[str]:
    layer, param = rest.split(".", 1)
    if attention:
        if layer == "qkv":
            return [f"{prefix}to_{x}.{param}" for x in "qkv"]
        return prefix + {"norm": "group_norm", "proj_out": "to_out.0"}[layer] + "." + param
    return f"{prefix}{_RESBLOCK[layer]}.{param}"


def unet_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our UNet's state dict under `UNet2DModel`'s names, float32 and contiguous. The fused q/k/v
    projection (3C, C) is split into to_q, to_k, to_v in that order, as `AttnBlock` chunks it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = _rename(key)
        value = value.detach().to(torch.float32)
        if isinstance(name, list):
            for part, chunk in zip(name, value.chunk(3, dim=0)):
                out[part] = chunk.contiguous()
        else:
            out[name] = value.contiguous()
    return out


# ----------------------------------------------------------------------------- DDPMScheduler

def scheduler_config(cfg, betas: torch.Tensor) -> dict[str, Any]:
    """The `DDPMScheduler` config (scheduler/scheduler_config.json) for the run's objective and
    schedule. `betas`: the betas the run trained with, float64 (T,). A schedule diffusers builds
    under a name (`linear`, `squaredcos_cap_v2`, the same formulas as ours) is written by name;
    anything else (rescaled to zero terminal SNR, say) as `trained_betas`."""
    d = cfg.diffusion
    prediction, variance = objective(cfg)
    if prediction not in PREDICTION_TYPES:
        raise ExportError(f"diffusion.prediction={prediction!r} has no diffusers prediction_type "
                          f"(known: {', '.join(PREDICTION_TYPES)})")
    if variance not in VARIANCE_TYPES:
        raise ExportError(f"diffusion.variance={variance!r} has no diffusers variance_type "
                          f"(known: {', '.join(VARIANCE_TYPES)})")
    schedule: dict[str, Any] = {"beta_schedule": "linear", "beta_start": d.beta_start,
                                "beta_end": d.beta_end, "trained_betas": None}
    rescaled = bool(getattr(d, "rescale_zero_terminal_snr", False))
    if rescaled and prediction == "eps":
        raise ExportError("diffusion.rescale_zero_terminal_snr with diffusion.prediction=eps: at zero "
                          "terminal SNR diffusers' DDPMScheduler divides by sqrt(abar_T) = 0 to predict "
                          "x_0; only v or x0 prediction can be shared this way")
    if d.beta_schedule == "cosine" and not rescaled:
        schedule["beta_schedule"] = "squaredcos_cap_v2"
    elif d.beta_schedule != "linear" or rescaled:
        schedule["trained_betas"] = [float(b) for b in betas.tolist()]
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(betas.numel()),
        **schedule,
        "variance_type": VARIANCE_TYPES[variance],
        "prediction_type": PREDICTION_TYPES[prediction],
        # ddpm-sample clips the predicted x_0 to [-1, 1] (the images' range), as DDPM's code does
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def model_index() -> dict[str, Any]:
    return {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


# ----------------------------------------------------------------------------- the folder

def write(out_dir: Path, cfg, model: torch.nn.Module, ema: dict[str, torch.Tensor],
          betas: torch.Tensor, metadata: dict[str, str] | None = None) -> list[Path]:
    """Write the diffusers folder for the EMA weights `ema` of our UNet `model` (its structure
    only: it may live on the meta device). Everything is checked before the first file is written.
    Each file is replaced atomically; model_index.json goes last, since it makes a pipeline of the
    folder. Returns the files written."""
    from safetensors.torch import save_file

    from pipeline.atomic import write_text_atomic

    unet = unet_config(cfg, model)
    scheduler = scheduler_config(cfg, betas)
    weights = unet_state_dict(ema)
    files = []
    for sub in ("unet", "scheduler"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    final = out_dir / "unet" / UNET_WEIGHTS
    tmp = final.with_name(f".{final.name}.tmp")
    save_file(weights, tmp, metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, final)
    files.append(final)
    for path, obj in ((out_dir / "unet" / "config.json", unet),
                      (out_dir / "scheduler" / "scheduler_config.json", scheduler),
                      (out_dir / "model_index.json", model_index())):
        write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
        files.append(path)
    return files


def export(run_dir: Path, out_dir: Path, card_samples: int = 16) -> Path:
    """Write the diffusers folder and its model card for the checkpoint `RunDir` chooses in
    `run_dir`; returns that checkpoint. Refuses before writing anything what diffusers cannot hold."""
    from pipeline.ckpt.rundir import RunDir, check_export_target, check_fits
    from pipeline.export.card import write_card
    from pipeline.factory import build_diffusion, build_model

    run = RunDir(run_dir)
    if not run.has_config():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)")
    check_export_target(run_dir, out_dir)
    cfg = run.read_config()
    with torch.device("meta"):  # the structure only: no memory, no init
        model = build_model(cfg)
    betas = build_diffusion(cfg).betas
    unet_config(cfg, model)  # refuse what diffusers cannot hold before reading any weights
    scheduler_config(cfg, betas)
    ckpt, weights = run.newest_weights(("ema",), deepspeed=bool(cfg.train.deepspeed))
    check_fits(model, weights["ema"], f"{ckpt}/ema.safetensors", run.config_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_card(out_dir, cfg, ckpt=ckpt, run_dir=Path(run_dir), fmt="diffusers", ema=weights["ema"],
               card_samples=card_samples)
    write(out_dir, cfg, model, weights["ema"], betas, metadata={"source": str(ckpt), "weights": "ema"})
    return ckpt
