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


def test_the_schedule_diffusers_builds_from_the_config_is_ours():
    from diffusers import DDPMScheduler

    from pipeline.factory import build_diffusion

    for schedule in ("linear", "cosine"):
        cfg = load_config(REPO / "configs/cifar10.yaml", [f"diffusion.beta_schedule={schedule}"])
        ours = build_diffusion(cfg).betas
        config = dexp.scheduler_config(cfg, ours)
        assert config["trained_betas"] is None  # written by name
        theirs = DDPMScheduler.from_config(config).betas.double()
        assert torch.allclose(theirs, ours, rtol=1e-6, atol=1e-9), schedule


def test_objectives_map_to_diffusers_names_or_are_refused():
    from types import SimpleNamespace

    betas = torch.linspace(1e-4, 0.02, 10, dtype=torch.float64)

    def cfg(**objective):
        from pipeline.config import DiffusionConfig

        d = DiffusionConfig()
        for k, v in objective.items():
            setattr(d, k, v)
        return SimpleNamespace(diffusion=d)

    # the default objective (what a config saved before the objective keys reads): eps, fixed_large
    got = dexp.scheduler_config(cfg(), betas)
    assert (got["prediction_type"], got["variance_type"]) == ("epsilon", "fixed_large")
    got = dexp.scheduler_config(cfg(prediction="v", variance="learned_range"), betas)
    assert (got["prediction_type"], got["variance_type"]) == ("v_prediction", "learned_range")
    got = dexp.scheduler_config(cfg(prediction="x0", variance="fixed_small", rescale_zero_terminal_snr=True), betas)
    assert got["prediction_type"] == "sample" and got["trained_betas"] == betas.tolist()
    for bad, needle in ((dict(prediction="score"), "diffusion.prediction='score'"),
                        (dict(variance="learned"), "diffusion.variance='learned'"),
                        (dict(rescale_zero_terminal_snr=True), "zero terminal SNR")):
        with pytest.raises(dexp.ExportError, match=needle):
            dexp.scheduler_config(cfg(**bad), betas)
