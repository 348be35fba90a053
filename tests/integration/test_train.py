"""The training loop end to end on the embedded demo shards: real data, real TensorBoard files."""

import numpy as np
import pytest
import torch

from pipeline.train.trainer import train
from tiny_run import REPO, run_cli, scalars, tiny_cfg, weights  # noqa: F401

def test_loss_falls_and_tensorboard_has_scalars(tmp_path, fresh_accelerate):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, "train.max_steps=120", "ckpt.every_steps=1000", "log.sample_every_steps=120")
    result = train(cfg)
    assert result.step == 120 and result.images_seen == 120 * 16

    loss = [v for _, v in scalars(run, "train/loss")]
    assert len(loss) == 24
    first, last = np.mean(loss[:4]), np.mean(loss[-4:])
    assert last < 0.7 * first, f"loss did not fall: first window {first:.4f}, last window {last:.4f}"
    for tag in ["train/lr", "train/grad_norm", "perf/images_per_sec", "perf/data_wait_frac"]:
        values = scalars(run, tag)
        assert len(values) == 24 and all(np.isfinite(v) for _, v in values), tag
    lr = dict(scalars(run, "train/lr"))
    assert lr[5] == pytest.approx(2e-3 * 5 / 10) and lr[120] == pytest.approx(2e-3)  # warm-up, then flat
    # A sample grid from the EMA weights, in TensorBoard and as a PNG; the final checkpoint exists.
    assert (run / "samples" / "step-00000120.png").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000120"
    assert (run / "config.yaml").is_file()


def test_ema_follows_its_decay(tmp_path, fresh_accelerate):
    """ema_k = d * ema_{k-1} + (1 - d) * w_k after every optimizer step, from the checkpoints of each step."""
    run = tmp_path / "run"
    decay = 0.8
    train(tiny_cfg(run, "train.max_steps=6", "ckpt.every_steps=1", "ckpt.keep_last=10", f"ema.decay={decay}"))
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == [f"step-{s:08d}" for s in range(1, 7)]
    online = [weights(c, "model") for c in ckpts]
    ema = [weights(c, "ema") for c in ckpts]
    # The first update copies the weights; every later one is a lerp with the configured decay.
    expected = dict(online[0])
    for k in range(1, 6):
        expected = {n: decay * expected[n] + (1 - decay) * online[k][n] for n in expected}
        for n in expected:
            torch.testing.assert_close(ema[k][n], expected[n], rtol=1e-5, atol=1e-6)
    moved = [n for n in expected if not torch.equal(ema[-1][n], online[-1][n])]
    assert moved, "EMA weights equal the online weights: the EMA is not averaging"


def test_resume_continues_exactly(tmp_path, fresh_accelerate):
    """8 steps straight == 4 steps, stop, then the same command to 8 (weights, EMA, optimizer)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(straight, "train.max_steps=8", "ckpt.every_steps=4"))
    train(tiny_cfg(resumed, "train.max_steps=4", "ckpt.every_steps=4"))
    fresh_accelerate()
    result = train(tiny_cfg(resumed, "train.max_steps=8", "ckpt.every_steps=4"))
    assert result.step == 8
    a, b = straight / "checkpoints/step-00000008", resumed / "checkpoints/step-00000008"
    for name in ["model", "ema"]:
        wa, wb = weights(a, name), weights(b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name} differs after resume"
    oa = torch.load(a / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(b / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    # TensorBoard continues without duplicated steps.
    steps = [s for s, _ in scalars(resumed, "train/loss")]
    assert steps == sorted(set(steps))


def test_breaking_config_change_is_refused(tmp_path, fresh_accelerate):
    from pipeline.config import ConfigError

    run = tmp_path / "run"
    train(tiny_cfg(run, "train.max_steps=2", "ckpt.every_steps=2"))
    fresh_accelerate()
    with pytest.raises(ConfigError, match="model.channels: 8 -> 16"):
        train(tiny_cfg(run, "train.max_steps=4", "model.channels=16"))


@pytest.mark.parametrize("override, needle", [
    ("optim.learning_rate=1", "unknown key 'optim.learning_rate'"),
    ("train.max_steps=lots", "train.max_steps: expected int"),
    ("data.urls=/nonexistent/shard-{000000..000003}.tar", "/nonexistent/shard-{000000..000003}.tar"),
])
def test_bad_input_one_line_no_traceback(tmp_path, override, needle):
    p = run_cli("pipeline.train", "configs/demo.yaml", f"run_dir={tmp_path}/r", override)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("ddpm-train: error:"), p.stderr
    assert "Traceback" not in p.stderr


def test_dry_run_prints_config_params_and_batch(tmp_path):
    p = run_cli("pipeline.train", "configs/cifar10.yaml", "--dry-run", f"data.urls={REPO / 'data/demo'}",
                "train.grad_accum_steps=2")
    assert p.returncode == 0, p.stderr
    assert "model parameters: 35,7" in p.stdout
    assert "global batch: 256 = micro_batch_size 128 x grad_accum_steps 2 x world_size 1" in p.stdout
    assert "channel_mult: [1, 2, 2, 2]" in p.stdout
    assert not (tmp_path / "r").exists()


def test_sample_cli_from_run_dir(tmp_path, fresh_accelerate):
    run = tmp_path / "run"
    train(tiny_cfg(run, "train.max_steps=2", "ckpt.every_steps=2"))
    out = []
    for i in range(2):
        p = run_cli("pipeline.cli.sample", str(run), "--num", "6", "--out", str(tmp_path / f"g{i}.png"),
                    "--steps", "4", "--seed", "3", "--npz", str(tmp_path / f"s{i}.npz"), "--device", "cpu")
        assert p.returncode == 0, p.stderr
        out.append(np.load(tmp_path / f"s{i}.npz")["arr_0"])
    assert out[0].shape == (6, 28, 28, 1) and out[0].dtype == np.uint8
    assert np.array_equal(out[0], out[1]), "same seed must give the same samples"
    from PIL import Image
    assert Image.open(tmp_path / "g0.png").size[0] > 28
    p = run_cli("pipeline.cli.sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and "no config.yaml" in p.stderr


def test_loaded_optimizer_state_takes_the_parameter_layout():
    """A CPU (NCHW) checkpoint resumed for channels_last parameters (the GPU layout): fused AdamW
    reads state as flat memory, so without `match_param_layout` the step is silently wrong."""
    from pipeline.train.trainer import match_param_layout

    def second_step(saved_layout_differs: bool, fix: bool) -> torch.Tensor:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last))
        opt = torch.optim.AdamW([w], lr=1e-2, fused=True)
        w.grad = torch.randn_like(w)
        opt.step()
        saved = opt.state_dict()
        if saved_layout_differs:
            for key in ("exp_avg", "exp_avg_sq"):
                saved["state"][0][key] = saved["state"][0][key].contiguous()
        opt.load_state_dict(saved)
        if fix:
            match_param_layout(opt)
        assert not fix or all(opt.state[w][k].stride() == w.stride() for k in ("exp_avg", "exp_avg_sq"))
        w.grad = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
        opt.step()
        return w.detach().clone()

    reference = second_step(saved_layout_differs=False, fix=False)
    assert not torch.allclose(second_step(saved_layout_differs=True, fix=False), reference)  # the hazard
    torch.testing.assert_close(second_step(saved_layout_differs=True, fix=True), reference, rtol=0, atol=0)
