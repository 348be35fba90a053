"""The diffusers mapping on the meta device: the CIFAR-10 config is a UNet2DModel of our size."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is in the [test] extra")
from diffusers import UNet2DModel  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.export import diffusers as dexp  # noqa: E402
from pipeline.factory import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_cifar10_config_is_a_unet2dmodel_with_our_parameter_count():
    cfg = load_config(REPO / "configs/cifar10.yaml", [])
    with torch.device("meta"):
        model = build_model(cfg)
        config = dexp.unet_config(cfg, model)
        unet = UNet2DModel.from_config(config)
    count = sum(p.numel() for p in unet.parameters())
    assert count == sum(p.numel() for p in model.parameters()) == 35_746_307
    assert config["norm_num_groups"] == 32 and config["down_block_types"][1] == "AttnDownBlock2D"
    # every tensor has a counterpart of the same shape under the mapping
    mapped = dexp.unet_state_dict({k: torch.empty(v.shape) for k, v in model.state_dict().items()})
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
