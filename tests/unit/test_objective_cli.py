"""The objective through the commands: `ddpm-sample --steps K --sampler ddpm|ddim` for every objective
(from an export-style directory with freshly initialised weights: no training needed), and a refused
combination ending `ddpm-train` with one line and exit 2."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.cli import sample as sample_cli
from pipeline.config import load_config, to_yaml
from pipeline.factory import build_model

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.channels=8", "model.channel_mult=[1,2]", "model.attention_resolutions=[14]",
        "diffusion.timesteps=20", "log.sample_steps=5"]
OBJECTIVES = {
    "eps-fixed_large": [],
    "x0-fixed_small": ["diffusion.prediction=x0", "diffusion.variance=fixed_small"],
    "v-learned-hybrid": ["diffusion.prediction=v", "diffusion.variance=learned_range", "diffusion.loss=hybrid"],
    "v-zero-snr": ["diffusion.prediction=v", "diffusion.rescale_zero_terminal_snr=true", "diffusion.snr_gamma=5"],
}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_sample_every_objective(tmp_path, name):
    cfg = load_config(REPO / "configs/demo.yaml", TINY + OBJECTIVES[name])
    torch.manual_seed(0)
    net = build_model(cfg)
    assert net.out_channels == (2 if "learned" in name else 1) * cfg.data.channels
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "ema.safetensors")
    for sampler in ["ddpm", "ddim"]:
        out = tmp_path / f"{sampler}.png"
        rc = sample_cli.main([str(tmp_path), "--num", "3", "--out", str(out), "--npz", str(out.with_suffix(".npz")),
                              "--sampler", sampler, "--steps", "5", "--device", "cpu"])
        assert rc == 0 and out.is_file()
        images = np.load(out.with_suffix(".npz"))["arr_0"]
        assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8


def test_refused_combination_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli.train", "configs/demo.yaml",
                           "diffusion.loss=hybrid", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm-train: error: diffusion.loss: hybrid"), proc.stderr
