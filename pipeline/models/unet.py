"""The DDPM noise-prediction UNet of Ho et al. 2020, in PyTorch.

This follows the original TensorFlow model (``diffusion_tf/models/unet.py`` of
hojonathanho/diffusion) layer for layer, so parameter counts match the paper:
35,746,307 for the CIFAR-10 configuration and ~113.7M for the 256x256 one.

Architecture (``ch`` = ``channels``)::

    temb = Linear(4ch) . SiLU . Linear(ch -> 4ch) . sinusoidal(t, ch)
    conv_in 3x3 -> ch
    down:   per level i: num_res_blocks x [ResBlock(ch*mult[i]) (+ AttnBlock)],
            then Downsample (3x3 conv, stride 2) except at the last level
    middle: ResBlock, AttnBlock, ResBlock
    up:     per level i (reversed): (num_res_blocks + 1) x [ResBlock on concat(h, skip)
            (+ AttnBlock)], then Upsample (nearest x2 + 3x3 conv) except at level 0
    out:    GroupNorm -> SiLU -> conv 3x3 -> out_channels

Initialisation follows the reference: every conv / linear weight uses
``variance_scaling(1, fan_avg, uniform)`` (= Xavier/Glorot uniform), biases are
zero, and the layers the reference builds with ``init_scale=0`` are zero: the
second conv of every ResBlock, the attention output projection and the final
``conv_out``. So at initialisation the model outputs exactly zero (only
``conv_out`` receives a gradient on the very first step; everything else starts
learning from the next steps, as in the reference).

Deliberate, documented differences from the reference (none changes the
parameter count):

* GroupNorm uses 32 groups, as the reference, for every width the paper uses
  (all >= 128 channels). For narrow demo models it uses the largest group count
  g <= min(32, C // 4) dividing C, i.e. at least 4 channels per group (the
  reference's narrowest ratio, 128 / 32): 16 -> 4 groups, 32 -> 8, 48 -> 12,
  64 -> 16. Simply taking the largest divisor <= 32 would give 16 channels 16
  groups of ONE channel, and a 1-channel GroupNorm exactly cancels the
  per-channel timestep shift added before ``norm2`` -- the model would then
  ignore ``t``. eps = 1e-6 as in ``tf.contrib.layers.group_norm``.
* Downsample is a 3x3 stride-2 conv with symmetric padding 1 (TF 'SAME' pads
  only bottom/right for even sizes); one fused cuDNN call, no extra pad copy.
* Attention q/k/v is one fused projection and q/k/v/proj_out are ``nn.Linear``
  layers applied on the channel dim of a (B, HW, C) view, mathematically the
  reference's 1x1 "NIN" layers (3*C*C + 3*C params for qkv). Attention itself is
  ``F.scaled_dot_product_attention`` (single head, scale C**-0.5 as reference).
* SiLU(temb) is computed once per forward and shared by every ResBlock's
  ``temb_proj`` (the reference recomputes the same value in each block).

Performance notes: forward has no data-dependent Python control flow, no
``.item()`` and no host syncs, so ``torch.compile`` traces it in one graph. It
works with channels_last inputs/weights (the attention reshapes are free views
in that layout, and GroupNorm and the upsample keep it: see ``GroupNorm``). The
sinusoidal embedding is computed in float32; under bf16 autocast the rest runs
in bf16 and the output is returned as produced (bf16) -- the loss is expected to
cast to float32.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet", "GroupNorm", "count_parameters", "timestep_embedding", "group_norm", "upsample_nearest_2x"]

GN_GROUPS = 32
GN_EPS = 1e-6
GN_MIN_GROUP_SIZE = 4  # narrow models: keep >= 4 channels per group (see module docstring)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _num_groups(channels: int, max_groups: int = GN_GROUPS, min_group_size: int = GN_MIN_GROUP_SIZE) -> int:
    """Largest group count g <= min(max_groups, channels // min_group_size) dividing ``channels``.

    32 for every width >= 128 that is a multiple of 32 (all of the paper's configs).
    """
    for g in range(min(max_groups, channels // min_group_size), 0, -1):
        if channels % g == 0:
            return g
    return 1


# Set to False to get the stock ATen GroupNorm / interpolate everywhere (the benchmark's ablation).
CHANNELS_LAST_OPS = True


def _is_channels_last(x: Tensor) -> bool:
    return CHANNELS_LAST_OPS and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps a channels_last input channels_last (same parameters, same math).

    Why: the stock op turns a channels_last UNet into layout copies. On CUDA, ATen's group_norm makes
    its input NCHW-contiguous and returns NCHW; the decomposition ``torch.compile`` uses reshapes the
    input to (N, G, C/G, H*W), which for channels_last is a copy, and also returns NCHW. Every norm is
    then followed by a conv that wants channels_last again, and its backward by a transposing copy of
    the gradient (the H200 profile in bench/results: an ATen copy kernel at 14.7% of CUDA time and
    ``clone`` in the fused norm kernels). Here everything works on the free (N, H*W, C) view of the
    NHWC memory: per-channel mean and variance over H*W (a reduction whose neighbouring outputs are
    neighbouring channels, so reads are coalesced), combined per group exactly (equal counts: group
    variance = mean of channel variances + variance of channel means), then one multiply-add per
    element. Nothing is copied and ``torch.compile`` fuses it with the following SiLU.

    Statistics are float32 (as ATen's). The output dtype is what ``F.group_norm`` gives on CUDA:
    float32 under autocast (weight float32), the input dtype when the module itself is bf16/fp16
    (DeepSpeed). Other layouts take the stock path.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (_is_channels_last(x) and self.affine):
            return super().forward(x)
        n, c, h, w = x.shape
        g = self.num_groups
        xf = x.permute(0, 2, 3, 1).reshape(n, h * w, c).float()  # a view: NHWC memory
        var_c, mean_c = torch.var_mean(xf, dim=1, keepdim=True, correction=0)  # (n, 1, c)
        mean_c, var_c = mean_c.view(n, g, c // g), var_c.view(n, g, c // g)
        mean_g = mean_c.mean(-1, keepdim=True)
        var_g = (var_c + (mean_c - mean_g).square()).mean(-1, keepdim=True)
        scale = torch.rsqrt(var_g + self.eps) * self.weight.view(g, c // g)  # (n, g, c/g)
        shift = self.bias.view(g, c // g) - mean_g * scale
        y = torch.addcmul(shift.view(n, 1, c), xf, scale.view(n, 1, c))  # one pass when eager
        return y.to(torch.promote_types(x.dtype, self.weight.dtype)).view(n, h, w, c).permute(0, 3, 1, 2)


def group_norm(channels: int) -> GroupNorm:
    """GroupNorm(32) with the small-width fallback documented in the module docstring."""
    return GroupNorm(_num_groups(channels), channels, eps=GN_EPS)


def upsample_nearest_2x(x: Tensor) -> Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")``, exactly, as a broadcast copy.

    Why: under ``torch.compile`` interpolate's backward becomes an atomic scatter-add (index_put with
    accumulate, 1.4 ms per step at batch 512 on an H200); the backward of expand + reshape is a plain
    sum over the repeated pixels. For channels_last input the copy is made in NHWC order, so the
    result is channels_last too.
    """
    n, c, h, w = x.shape
    if _is_channels_last(x):
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h, 2, w, 2, c)
        return y.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    if not CHANNELS_LAST_OPS:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal timestep embedding of the reference (tensor2tensor style), float32.

    ``t``: (B,) integer or float timesteps. Returns (B, dim) float32: [sin | cos]
    (zero-padded by one column when ``dim`` is odd).
    """
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -scale)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 (+ temb proj) -> GN -> SiLU -> Dropout -> conv3x3 (zero init); 1x1 skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv2._zero_init = True  # reference: init_scale=0.
        # reference: nin_shortcut (1x1) when the channel count changes
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        """``temb_act`` is SiLU(temb), shape (B, temb_ch)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual; output projection zero-initialised."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)  # fused q, k, v 1x1 projections
        self.proj_out = nn.Linear(ch, ch)
        self.proj_out._zero_init = True  # reference: init_scale=0.

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, HW, C): a free view when x is channels_last.
        h = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # each (B, 1, HW, C), last-dim stride 1
        h = F.scaled_dot_product_attention(q, k, v)  # scale = C ** -0.5, as the reference
        h = self.proj_out(h.squeeze(1))  # (B, HW, C)
        # back to (B, C, H, W) (channels_last strides; a view, no copy)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(upsample_nearest_2x(x))


class UNet(nn.Module):
    """DDPM UNet (Ho et al. 2020). ``forward(x, t)`` predicts the noise, shaped like ``x``.

    ``attention_resolutions`` are spatial sizes in pixels of the feature maps
    (e.g. 16 = at the 16x16 level); each must be one of the levels
    ``image_size // 2**i`` for ``i < len(channel_mult)``.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        out_channels: int | None = None,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        out_channels = in_channels if out_channels is None else out_channels
        self._validate(image_size, in_channels, out_channels, channels, channel_mult,
                       num_res_blocks, attention_resolutions, dropout)

        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout

        ch = channels
        temb_ch = 4 * ch
        num_levels = len(channel_mult)

        self.temb_dense0 = nn.Linear(ch, temb_ch)
        self.temb_dense1 = nn.Linear(temb_ch, temb_ch)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Down path; record the channel count of every skip the up path will consume.
        skip_chs = [ch]
        cur_ch, res = ch, image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(channel_mult):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            level.attns = nn.ModuleList()
            out_ch = ch * mult
            for _ in range(num_res_blocks):
                level.blocks.append(ResBlock(cur_ch, out_ch, temb_ch, dropout))
                cur_ch = out_ch
                level.attns.append(AttnBlock(cur_ch) if res in attention_resolutions else nn.Identity())
                skip_chs.append(cur_ch)
            level.downsample = Downsample(cur_ch) if i != num_levels - 1 else None
            if level.downsample is not None:
                skip_chs.append(cur_ch)
                res //= 2
            self.down.append(level)

        self.mid_block1 = ResBlock(cur_ch, cur_ch, temb_ch, dropout)
        self.mid_attn = AttnBlock(cur_ch)
        self.mid_block2 = ResBlock(cur_ch, cur_ch, temb_ch, dropout)

        # Up path, stored in execution order (deepest level first).
        self.up = nn.ModuleList()
        for i in reversed(range(num_levels)):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            level.attns = nn.ModuleList()
            out_ch = ch * channel_mult[i]
            for _ in range(num_res_blocks + 1):
                level.blocks.append(ResBlock(cur_ch + skip_chs.pop(), out_ch, temb_ch, dropout))
                cur_ch = out_ch
                level.attns.append(AttnBlock(cur_ch) if res in attention_resolutions else nn.Identity())
            level.upsample = Upsample(cur_ch) if i != 0 else None
            if level.upsample is not None:
                res *= 2
            self.up.append(level)
        assert not skip_chs and res == image_size

        self.norm_out = group_norm(cur_ch)
        self.conv_out = nn.Conv2d(cur_ch, out_channels, 3, padding=1)
        self.conv_out._zero_init = True  # reference: init_scale=0.

        self.reset_parameters()

    # ------------------------------------------------------------------ config
    @staticmethod
    def _validate(image_size, in_channels, out_channels, channels, channel_mult,
                  num_res_blocks, attention_resolutions, dropout) -> None:
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"data.image_size must be a positive integer, got {image_size!r}")
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"data.channels (in/out channels) must be > 0, got {in_channels}/{out_channels}")
        if channels <= 0:
            raise ValueError(f"model.channels must be > 0, got {channels}")
        if len(channel_mult) == 0 or any(m <= 0 for m in channel_mult):
            raise ValueError(f"model.channel_mult must be a non-empty list of positive ints, got {list(channel_mult)}")
        if num_res_blocks < 1:
            raise ValueError(f"model.num_res_blocks must be >= 1, got {num_res_blocks}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        n_down = len(channel_mult) - 1
        factor = 2 ** n_down
        if image_size % factor != 0:
            raise ValueError(
                f"data.image_size={image_size} cannot be halved {n_down} times for "
                f"model.channel_mult={list(channel_mult)}; use a multiple of {factor}")
        valid = [image_size // 2 ** i for i in range(len(channel_mult))]
        bad = [r for r in attention_resolutions if r not in valid]
        if bad:
            raise ValueError(
                f"model.attention_resolutions={list(attention_resolutions)}: {bad} match no UNet level; "
                f"valid resolutions for data.image_size={image_size} and model.channel_mult="
                f"{list(channel_mult)} are {valid}")

    @classmethod
    def from_config(cls, model_cfg: Any, image_size: int, channels: int) -> "UNet":
        """Build from any object with attributes ``channels, channel_mult, num_res_blocks,
        attention_resolutions, dropout`` (the model config).

        ``image_size`` and ``channels`` are the *data* image size and image channel count
        (in = out channels); ``model_cfg.channels`` is the base width ``ch``.
        """
        return cls(
            image_size=image_size,
            in_channels=channels,
            out_channels=channels,
            channels=getattr(model_cfg, "channels"),
            channel_mult=tuple(getattr(model_cfg, "channel_mult")),
            num_res_blocks=getattr(model_cfg, "num_res_blocks"),
            attention_resolutions=tuple(getattr(model_cfg, "attention_resolutions")),
            dropout=getattr(model_cfg, "dropout"),
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference init: Glorot-uniform weights, zero biases, zero for ``init_scale=0`` layers."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if getattr(m, "_zero_init", False):
                    nn.init.zeros_(m.weight)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (B, C, H, W) float; t: (B,) int64 (or float) timesteps. Returns (B, out_channels, H, W)."""
        # float32, or x's dtype when the module itself runs in bf16/fp16 (DeepSpeed casts the weights).
        temb = timestep_embedding(t, self.channels).to(x.dtype if x.dtype in (torch.bfloat16, torch.float16)
                                                       else torch.float32)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))
        temb_act = F.silu(temb)  # every ResBlock's temb_proj consumes SiLU(temb)

        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, temb_act))
                hs.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                hs.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb_act)), temb_act)

        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb_act))
            if level.upsample is not None:
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
