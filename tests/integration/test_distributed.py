"""Data parallel and DeepSpeed ZeRO with real processes on the CPU (gloo).

- One optimizer step is the same whether a batch of 2B is split over 2 ranks, taken whole by 1 rank,
  or taken as 2 accumulated micro batches of B (pipeline.step.optimizer_step, fed fixed tensors).
- DeepSpeed ZeRO-2 and ZeRO-1 on 2 processes: loss falls, SIGKILL + resume is bit-exact (including the
  engine's sharded optimizer state), and ddpm-export gives the live fp32 weights.
- A DeepSpeed JSON that disagrees with the config, and ZeRO-3, end with one line and exit 2.
The first DeepSpeed start JIT-compiles a small comm op (about 30 s, once per machine).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_run import REPO, scalars, tiny_cfg

sys.path.insert(0, str(REPO / "scripts"))
from kill_soak import kill_at_half, resumed_from, run, same, train_command  # noqa: E402

B = 4  # micro batch per rank in the equivalence test


# ---------------------------------------------------------------------------------------------
# One optimizer step: 2 ranks x B == 1 rank x 2B == 1 rank x B x 2 accumulation steps.

def _fixed_batch(cfg):
    g = torch.Generator().manual_seed(123)
    shape = (2 * B, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    t = torch.randint(0, cfg.diffusion.timesteps, (2 * B,), generator=g)
    noise = torch.randn(shape, generator=g)
    return x0, t, noise


def _one_step(cfg, out: Path, micro_size: int, accum: int) -> None:
    """Build model/optimizer as the loop does, take one step on this rank's share of the fixed batch."""
    from accelerate import Accelerator

    from pipeline.dist.runtime import seed_everything
    from pipeline.train.step import MicroBatch, optimizer_step
    from pipeline.factory import build_diffusion, build_model

    acc = Accelerator(cpu=True, mixed_precision="no")
    seed_everything(cfg.train.seed)
    net = build_model(cfg)
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    o = cfg.optim
    optimizer = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                  weight_decay=o.weight_decay)
    model, optimizer = acc.prepare(net, optimizer)
    x0, t, noise = _fixed_batch(cfg)
    lo = acc.process_index * micro_size * accum  # this rank's slice of the global batch
    mbs = [MicroBatch(x0[s:s + micro_size], t[s:s + micro_size], noise[s:s + micro_size])
           for s in range(lo, lo + micro_size * accum, micro_size)]
    optimizer_step(acc, model, net, optimizer, build_diffusion(cfg), mbs, accum, o.grad_clip)
    if acc.is_main_process:
        torch.save({"w0": w0, "w1": net.state_dict()}, out)


def _two_ranks(cfg, out):
    _one_step(cfg, out, B, 1)


def _equivalence_cfg(tmp_path):
    return tiny_cfg(Path(tmp_path) / "run", "model.dropout=0", "optim.lr=1e-3", "optim.grad_clip=0.5")


def debug_two_ranks(tmp_path: str) -> None:
    from accelerate import debug_launcher

    debug_launcher(_two_ranks, args=(_equivalence_cfg(tmp_path), Path(tmp_path) / "ranks.pt"), num_processes=2)


def _update_diff(a, b) -> float:
    """|w_a - w_b| relative to the size of the step itself, |w_a - w0| (a far stricter test than |w|)."""
    num = sum(float((a["w1"][k] - b["w1"][k]).double().norm() ** 2) for k in a["w1"]) ** 0.5
    den = sum(float((a["w1"][k] - a["w0"][k]).double().norm() ** 2) for k in a["w1"]) ** 0.5
    return num / den


def test_one_step_is_the_same_for_any_layout_of_the_batch(tmp_path, fresh_accelerate):
    cfg = _equivalence_cfg(tmp_path)
    # 2 real processes (MULTI_CPU, gloo, DDP), forked by debug_launcher from a fresh interpreter: forking
    # this one, whose OpenMP threads earlier tests have started, can deadlock the children.
    code = (f"import sys; sys.path[:0] = [{str(REPO / 'tests')!r}, {str(REPO / 'tests/integration')!r}]; import test_distributed as t; "
            f"t.debug_two_ranks({str(tmp_path)!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    _one_step(cfg, tmp_path / "whole.pt", 2 * B, 1)
    fresh_accelerate()
    _one_step(cfg, tmp_path / "accum.pt", B, 2)
    whole, accum, ranks = (torch.load(tmp_path / f"{n}.pt") for n in ("whole", "accum", "ranks"))
    assert any(not torch.equal(whole["w0"][k], whole["w1"][k]) for k in whole["w0"]), "the step changed nothing"
    for w in (accum, ranks):
        assert all(torch.equal(whole["w0"][k], w["w0"][k]) for k in whole["w0"])  # same start
    assert _update_diff(whole, accum) < 1e-5, _update_diff(whole, accum)
    assert _update_diff(whole, ranks) < 1e-5, _update_diff(whole, ranks)


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1/2 on 2 processes, through the CLI.

def _ds_files(ckpt: Path) -> dict:
    return {p.relative_to(ckpt).as_posix(): torch.load(p, map_location="cpu", weights_only=False)
            for p in sorted((ckpt / "deepspeed").rglob("*.pt"))}


def _compare_ds(a: Path, b: Path) -> list[str]:
    """Everything a resume needs, bit for bit: our files and the engine's (fp32 masters, Adam moments)."""
    from kill_soak import compare_checkpoints

    diffs = compare_checkpoints(a, b)
    fa, fb = _ds_files(a), _ds_files(b)
    assert fa.keys() == fb.keys() and any("optim_states" in k for k in fa), sorted(fa)
    for name in fa:
        # Compared: tensors and plain values; the config objects DeepSpeed pickles alongside are not state.
        sa, sb = fa[name], fb[name]
        for key in sa:
            if key in ("ds_config", "ds_version", "mp_world_size"):
                continue
            if not _same_state(sa[key], sb[key]):
                diffs.append(f"{name}:{key}")
    return diffs


def _same_state(a, b) -> bool:
    """kill_soak.same, also for DeepSpeed's plain objects (e.g. its LossScaler), compared by attributes."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if type(a) is type(b) and hasattr(a, "__dict__") and not isinstance(a, torch.Tensor):
        return _same_state(vars(a), vars(b))
    return same(a, b)


def _loss_falls(run_dir: Path) -> None:
    loss = [v for _, v in scalars(run_dir, "train/loss")]
    assert np.mean(loss[-2:]) < 0.9 * np.mean(loss[:2]), f"loss did not fall: {loss}"


@pytest.mark.slow
def test_zero2_trains_resumes_exactly_after_sigkill_and_exports_live_weights(tmp_path):
    n = 30
    overrides = [f"train.max_steps={n}", f"ckpt.every_steps={n // 2}", "train.mixed_precision=no",
                 "train.deepspeed=configs/deepspeed/zero2.json", "optim.lr=4e-3"]
    straight, killed, command = kill_at_half(tmp_path, overrides, n, procs=2)
    assert "global batch 32 = 16 x 1 accum x 2 ranks" in (tmp_path / "first.log").read_text()

    assert run(command, tmp_path / "resumed.log", timeout_s=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert resumed_from(tmp_path / "resumed.log") == f"step-{n // 2:08d}"
    final = f"checkpoints/step-{n:08d}"
    assert _compare_ds(straight / final, killed / final) == []
    _loss_falls(straight)

    # Export: fp32 weights rebuilt from both ranks' ZeRO partitions == the live module (fp32 here).
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli.export", str(killed), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    for name in ("model", "ema"):
        live, exported = load_file(killed / final / f"{name}.safetensors"), load_file(out / f"{name}.safetensors")
        assert live.keys() == exported.keys()
        assert all(exported[k].dtype == torch.float32 and torch.equal(live[k], exported[k]) for k in live), name


@pytest.mark.slow
def test_zero1_with_accumulation_trains_and_resumes_exactly(tmp_path):
    n = 16
    base = ["train.mixed_precision=no", "train.deepspeed=configs/deepspeed/zero1.json", "train.grad_accum_steps=2",
            "train.micro_batch_size=8", "optim.lr=4e-3", "log.every_steps=4", f"ckpt.every_steps={n // 2}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(train_command(straight, *base, f"train.max_steps={n}", procs=2), tmp_path / "straight.log") == 0, \
        (tmp_path / "straight.log").read_text()[-3000:]
    assert "global batch 32 = 8 x 2 accum x 2 ranks" in (tmp_path / "straight.log").read_text()
    _loss_falls(straight)
    for steps, log in ((n // 2, "first.log"), (n, "second.log")):
        rc = run(train_command(resumed, *base, f"train.max_steps={steps}", procs=2), tmp_path / log)
        assert rc == 0, (tmp_path / log).read_text()[-3000:]
    assert resumed_from(tmp_path / "second.log") == f"step-{n // 2:08d}"
    assert _compare_ds(straight / f"checkpoints/step-{n:08d}", resumed / f"checkpoints/step-{n:08d}") == []
    ema_step = json.loads((resumed / f"checkpoints/step-{n:08d}/train_state.json").read_text())["ema_step"]
    assert ema_step == n  # one EMA update per real optimizer step, not per micro batch


# ---------------------------------------------------------------------------------------------
# Refused at start-up, one line.

@pytest.mark.parametrize("change, expect", [
    ({"train_micro_batch_size_per_gpu": 7}, "train_micro_batch_size_per_gpu is 7 but train.micro_batch_size is 16"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps is 4 but train.grad_accum_steps is 1"),
    ({"train_batch_size": 64}, "train_batch_size is 64 but micro_batch_size x grad_accum_steps x world_size is 16"),
    ({"gradient_clipping": 2.0}, "gradient_clipping is 2.0 but optim.grad_clip is 1.0"),
    ({"bf16": {"enabled": True}}, "bf16.enabled is true but train.mixed_precision is 'no'"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage 3 is not supported"),
])
def test_disagreeing_deepspeed_json_is_refused_with_one_line(tmp_path, change, expect):
    ds = json.loads((REPO / "configs/deepspeed/zero2.json").read_text())
    ds.update(change)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    argv, env = train_command(tmp_path / "run", "train.mixed_precision=no", f"train.deepspeed={path}", procs=1)
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith(f"ddpm-train: error: {path}: ") and expect in lines[0], lines[0]
