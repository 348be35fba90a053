"""Learned variance + hybrid loss + the loss-second-moment timestep sampler, really SIGKILLed at half
way and resumed by the same command: bit-identical to the uninterrupted run, including the sampler's
loss history, with 1 and 2 processes (the trainer also checks at every save that the ranks' histories
agree). T = 4 diffusion steps so that the history (4 x 10 losses) fills before the kill and the
importance weights, not the uniform warm-up, draw the timesteps of the second half."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

sys.path.insert(0, str(REPO / "scripts"))
from kill_soak import compare_checkpoints, kill_at_half, resumed_from, run  # noqa: E402

N = 20
OBJECTIVE = ["diffusion.timesteps=4", "log.sample_steps=4", "diffusion.prediction=v",
             "diffusion.variance=learned_range", "diffusion.loss=hybrid",
             "diffusion.timestep_sampler=loss_second_moment"]


@pytest.mark.parametrize("procs", [1, 2])
def test_resampler_state_survives_sigkill(tmp_path, procs):
    overrides = [f"train.max_steps={N}", f"ckpt.every_steps={N // 2}", "ckpt.keep_last=2", *OBJECTIVE]
    straight, killed, command = kill_at_half(tmp_path, overrides, N, procs=procs)
    half = torch.load(killed / f"checkpoints/step-{N // 2:08d}/timestep_sampler.pt", weights_only=True)
    assert bool((half["loss_counts"] == 10).all()), "history not full at the kill: the test would prove less"

    assert run(command, tmp_path / "resumed.log", timeout_s=240) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    assert resumed_from(tmp_path / "resumed.log") == f"step-{N // 2:08d}"
    assert "timestep sampler's loss history" in log
    final = f"checkpoints/step-{N:08d}"
    assert compare_checkpoints(straight / final, killed / final) == []  # weights, optimizer, RNG, sampler
    end = torch.load(killed / final / "timestep_sampler.pt", weights_only=True)
    assert not torch.equal(end["loss_history"], half["loss_history"])  # it kept learning after the resume
