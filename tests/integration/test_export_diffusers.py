"""ddpm-export --format diffusers: a folder diffusers' own pipelines load as they are, and that
samples what ddpm-sample samples from the same noise. diffusers is a test dependency only (the
`[test]` and `[diffusers]` extras); the writer never imports it."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is in the [test] extra")
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from pipeline.ckpt.rundir import open_ema  # noqa: E402
from pipeline.cli import export as export_cli  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.diffusion.sampling import sample_batches  # noqa: E402
from pipeline.export import diffusers as dexp  # noqa: E402
from pipeline.factory import build_diffusion  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
T = 40  # diffusion steps of the tiny run: every sampler comparison runs all of them in seconds


def tiny_cfg(run_dir, *overrides):
    """The demo data at 8x8 through the narrowest UNet diffusers can hold: 128 channels (below that
    our GroupNorms use C // 4 groups, which UNet2DModel cannot express), two levels, attention at 4x4."""
    return load_config(REPO / "configs/demo.yaml", [
        f"run_dir={run_dir}", f"data.urls={REPO / 'data/demo'}", "data.num_workers=0",
        "data.image_size=8", "model.channels=128", "model.channel_mult=[1,1]",
        "model.num_res_blocks=1", "model.attention_resolutions=[4]", f"diffusion.timesteps={T}",
        "train.micro_batch_size=4", "train.max_steps=3", "optim.warmup_steps=1", "optim.lr=1e-3",
        "log.every_steps=1", "log.sample_every_steps=0", "log.sample_steps=10", "ckpt.every_steps=3",
        *overrides])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-step run and its diffusers export: (run dir, export dir)."""
    from conftest import _reset_accelerate
    from pipeline.train.trainer import train

    root = tmp_path_factory.mktemp("diffusers")
    run, out = root / "run", root / "export"
    _reset_accelerate()
    train(tiny_cfg(run))
    _reset_accelerate()
    (run / "eval").mkdir()
    (run / "eval" / "step-00000003.json").write_text(json.dumps(
        {"step": 3, "num": 64, "sampler": "ddim", "steps": 10, "metrics": {"fid": 123.456, "bpd": 7.25}}))
    assert export_cli.main([str(run), str(out), "--format", "diffusers", "--card-samples", "4"]) == 0
    return run, out


@pytest.fixture(scope="module")
def scrambled(exported, tmp_path_factory):
    """The run's EMA UNet with every tensor moved by N(0, 0.05^2) noise, and its diffusers folder:
    three training steps leave the zero-initialised layers near zero, and a comparison of two
    near-zero networks would not see a wrong mapping. Returns (cfg, model, folder)."""
    run, _ = exported
    cfg, model, _ = open_ema(run)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("scrambled")
    dexp.write(folder, cfg, model, model.state_dict(), build_diffusion(cfg).betas)
    return cfg, model, folder


def ours(cfg, model, sampler: str, steps: int, num: int, seed: int) -> np.ndarray:
    """ddpm-sample's images before the uint8 rounding, in diffusers' output layout: NHWC in [0, 1]."""
    x = torch.cat(list(sample_batches(model, build_diffusion(cfg), num, cfg.data.channels,
                                      cfg.data.image_size, sampler=sampler, steps=steps, seed=seed)))
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def test_the_export_loads_with_diffusers_pipelines_and_holds_the_ema_weights(exported, scrambled):
    run, out = exported
    pipe = DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    assert DDIMPipeline.from_pretrained(out).scheduler.config.num_train_timesteps == T
    # The EMA weights of the checkpoint, tensor for tensor under the mapping.
    _, model, source = open_ema(run)
    assert source.parent.name == "step-00000003"
    theirs = pipe.unet.state_dict()
    mapped = dexp.unet_state_dict(model.state_dict())
    assert mapped.keys() == theirs.keys() and all(torch.equal(theirs[k], v) for k, v in mapped.items())
    # The same function: our UNet and diffusers' UNet2DModel agree on random inputs, for weights
    # that are far from zero everywhere.
    cfg, model, folder = scrambled
    unet = UNet2DModel.from_pretrained(folder / "unet")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0, 17, T - 1])
    with torch.no_grad():
        want = model(x, t)
        assert want.abs().mean() > 0.1
        assert torch.allclose(unet(x, t).sample, want, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in model.parameters())
    # The schedule: diffusers builds the betas we trained with from the config's name for them.
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.trained_betas is None
    ours_betas = build_diffusion(open_ema(run)[0]).betas
    assert torch.allclose(pipe.scheduler.betas.double(), ours_betas, rtol=1e-6, atol=0)
    assert pipe.scheduler.config.clip_sample and pipe.scheduler.config.prediction_type == "epsilon"


def test_ddpm_pipeline_reproduces_ddpm_sample_from_the_same_noise(scrambled):
    cfg, model, folder = scrambled
    pipe = DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=T,
                  output_type="np").images
    mine = ours(cfg, model, "ddpm", T, 3, seed=7)
    assert np.abs(theirs - mine).max() < 1e-4
    # the network matters: the same noise through another network gives other images
    with torch.no_grad():
        model.conv_out.weight.mul_(1.5)
    try:
        assert np.abs(ours(cfg, model, "ddpm", T, 3, seed=7) - mine).max() > 0.01
    finally:
        with torch.no_grad():
            model.conv_out.weight.div_(1.5)


def test_ddim_pipeline_reproduces_ddim_sample(scrambled, monkeypatch):
    """At K = T the two DDIMs take the same steps and agree. At K < T diffusers spaces its steps from
    0 by T // K (`leading`), ddpm-sample evenly from T-1 to 0: given diffusers' steps, ours agrees."""
    cfg, model, folder = scrambled
    pipe = DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def theirs(k: int) -> np.ndarray:
        return pipe(batch_size=3, generator=torch.Generator().manual_seed(3), num_inference_steps=k,
                    eta=0.0, use_clipped_model_output=True, output_type="np").images

    assert np.abs(theirs(T) - ours(cfg, model, "ddim", T, 3, seed=3)).max() < 1e-4
    k = 8
    pipe.scheduler.set_timesteps(k)
    leading = pipe.scheduler.timesteps.flip(0).clone()  # increasing, as ddim_timesteps returns them
    from pipeline.diffusion import Diffusion

    assert not torch.equal(build_diffusion(cfg).ddim_timesteps(k), leading)
    monkeypatch.setattr(Diffusion, "ddim_timesteps", lambda self, steps: leading)
    assert np.abs(theirs(k) - ours(cfg, model, "ddim", k, 3, seed=3)).max() < 1e-4


def test_the_model_card_says_what_a_shared_model_needs(exported):
    run, out = exported
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n")
    for needle in ("optimizer steps: 3", "images seen: 12", str(REPO / "data/demo"), "| FID | 123.5 |",
                   "| bits/dim | 7.25 |", "MIT (Expat) license", "![samples](samples.png)",
                   "model:\n  channels: 128"):
        assert needle in card, needle
    from PIL import Image

    assert Image.open(out / "samples.png").size[0] > 8  # a grid of the 4 drawn samples
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]


@pytest.mark.parametrize("override, needle", [
    (["model.channels=16", "model.channel_mult=[1,2,4]", "data.image_size=28",
      "model.attention_resolutions=[7]"], "too narrow for diffusers' UNet2DModel"),
    (["model.channel_mult=[2,2]"], "model.channel_mult[0] = 1"),
])
def test_what_unet2dmodel_cannot_hold_is_refused_in_one_line(exported, tmp_path, capsys, override, needle):
    run, _ = exported
    other = tmp_path / "run"
    shutil.copytree(run, other)
    cfg = tiny_cfg(other, *override)
    from pipeline.config import to_yaml

    (other / "config.yaml").write_text(to_yaml(cfg))
    assert export_cli.main([str(other), str(tmp_path / "out"), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm-export: error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything was written
