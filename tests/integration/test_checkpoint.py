"""Checkpoints: complete or invisible at every moment of a save, rotation, corrupted and malicious
files, config changes on resume, and `ddpm-export`. Real processes killed with SIGKILL: test_kill.py."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import _reset_accelerate
from pipeline.ckpt import checkpointer as ck
from pipeline.ckpt.checkpointer import Checkpointer, newest_loadable, verify
from ckptkit import RunsCode, forge
from tiny_run import REPO, tiny_cfg

sys.path.insert(0, str(REPO / "scripts"))
from kill_soak import train_command  # noqa: E402

# -- Checkpointer on small fake states ------------------------------------------------------------


def checkpointer(run, keep_last=2):
    return Checkpointer(run, keep_last, rank=0, world_size=1, barrier=lambda: None)


def fake_save(c, step):
    c.save(step, weights={"model": {"w": torch.full((64,), float(step))}, "ema": {"w": torch.zeros(64)}},
           objects={"optimizer": {"state": {0: {"exp_avg": torch.ones(64) * step}}, "param_groups": []}},
           train_state={"step": step}, rank_state={"rng": [1, 2, 3], "data": {"pos": step}})


def read_all(ckpt):
    """What a resume reads: every file of the checkpoint."""
    ck.read_weights(ckpt, "model"), ck.read_weights(ckpt, "ema"), ck.read_train_state(ckpt)
    ck.read_object(ckpt, "optimizer.pt"), ck.read_object(ckpt, ck.rank_file(0))


def latest_name(run):
    return (run / "checkpoints/latest").read_text().strip()


def entries(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.parametrize("keep_last, saves", [(1, 3), (3, 3), (3, 7), (10, 6)])
def test_rotation_keeps_keep_last_checkpoints(tmp_path, keep_last, saves):
    run = tmp_path / "run"
    c = checkpointer(run, keep_last=keep_last)
    for step in range(1, saves + 1):
        fake_save(c, step)
    kept = range(max(1, saves - keep_last + 1), saves + 1)
    assert entries(run) == ["latest", *(f"step-{s:08d}" for s in kept)]
    assert latest_name(run) == f"step-{saves:08d}"


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    c = checkpointer(run, keep_last=2)
    for step in range(1, 6):
        fake_save(c, step)
        assert latest_name(run) == f"step-{step:08d}"
    assert entries(run) == ["latest", "step-00000004", "step-00000005"]

    # Leftovers of killed saves and rotations, an incomplete older directory, and a complete
    # checkpoint from after this step (left when a run resumed from an older one).
    (run / "checkpoints/.tmp-step-00000006").mkdir()
    (run / "checkpoints/.old-step-00000003").mkdir()
    (run / "checkpoints/step-00000002").mkdir()
    shutil.copytree(run / "checkpoints/step-00000005", run / "checkpoints/step-00000009")
    fake_save(c, 6)
    # The incomplete directory is not counted, and not deleted either: it is set aside (issue 15).
    assert entries(run) == ["corrupt", "latest", "step-00000005", "step-00000006", "step-00000009"]
    assert (run / "checkpoints/corrupt/step-00000002").is_dir()
    assert latest_name(run) == "step-00000006"

    c1 = checkpointer(run, keep_last=1)
    fake_save(c1, 7)
    assert entries(run) == ["corrupt", "latest", "step-00000007", "step-00000009"]
    assert verify(run / "checkpoints/step-00000007", content=True) is None


class Killed(BaseException):
    """The process died here (BaseException: no `except Exception` in the code may catch it)."""


def arm_kill(monkeypatch, kill_at):
    """Count every filesystem operation of a save; die at operation `kill_at` (None: never).

    A write that is killed leaves half its file behind, as a real kill in mid-write would."""
    count = [0]

    def wrap(fn, writes_to):
        def op(*args, **kwargs):
            if count[0] == kill_at:
                if writes_to is not None:
                    fn(*args, **kwargs)
                    path = Path(args[writes_to])
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                raise Killed(f"killed at operation {kill_at} ({fn.__name__})")
            count[0] += 1
            return fn(*args, **kwargs)
        return op

    for owner, name, writes_to in [(os, "rename", None), (os, "replace", None), (os, "fsync", None),
                                   (os, "mkdir", None), (shutil, "rmtree", None), (ck, "save_file", 1),
                                   (torch, "save", 1)]:
        monkeypatch.setattr(owner, name, wrap(getattr(owner, name), writes_to))
    return count


@pytest.mark.parametrize("scenario", ["new step", "replaces an incomplete directory of the same step"])
def test_a_kill_at_any_point_of_a_save_leaves_a_complete_latest(tmp_path, monkeypatch, scenario):
    def setup(run):
        c = checkpointer(run, keep_last=2)
        fake_save(c, 1)
        fake_save(c, 2)
        if scenario != "new step":
            (run / "checkpoints/step-00000003").mkdir()
            (run / "checkpoints/step-00000003/model.safetensors").write_bytes(b"partial")
        return c

    c = setup(tmp_path / "count")
    count = arm_kill(monkeypatch, None)
    fake_save(c, 3)
    monkeypatch.undo()
    n_ops = count[0]
    assert n_ops > 20  # every write, fsync, rename and delete of one save

    for kill_at in range(n_ops):
        run = tmp_path / f"kill-{kill_at}"
        c = setup(run)
        arm_kill(monkeypatch, kill_at)
        with pytest.raises(Killed):
            fake_save(c, 3)
        monkeypatch.undo()
        # `latest` names the previous checkpoint or the new one, complete, and a resume loads it.
        name = latest_name(run)
        assert name in ("step-00000002", "step-00000003"), (kill_at, name)
        assert verify(run / "checkpoints" / name, content=True) is None, (kill_at, name)
        assert newest_loadable(checkpointer(run), read_all) == run / "checkpoints" / name
        # The next save succeeds and clears what the killed one left.
        fake_save(checkpointer(run), 4)
        assert latest_name(run) == "step-00000004"
        assert [e for e in entries(run) if e.startswith(".")] == [], kill_at
        assert len([e for e in entries(run) if e.startswith("step-")]) == 2, (kill_at, entries(run))


# -- corrupted and malicious checkpoints of a real run --------------------------------------------

N_TINY = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    from pipeline.train.trainer import train

    run = tmp_path_factory.mktemp("trained") / "run"
    _reset_accelerate()
    train(tiny_cfg(run, f"train.max_steps={N_TINY}", "ckpt.every_steps=2", "ckpt.keep_last=3"))
    _reset_accelerate()
    return run


def copy_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def malicious_pickle(tmp_path, marker):
    """A torch.save file whose plain unpickling runs code (checked on a copy, with its own marker)."""
    probe = tmp_path / "probe-marker"
    torch.save(RunsCode(probe), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists(), "the payload must really run code, or the test below proves nothing"
    torch.save(RunsCode(marker), tmp_path / "evil.pt")
    return (tmp_path / "evil.pt").read_bytes()


def corrupt(ckpt, how, tmp_path, marker):
    if how == "truncated":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "model.safetensors has"
    if how == "missing":
        (ckpt / "optimizer.pt").unlink()
        return "missing file optimizer.pt"
    if how == "flipped bytes":  # same size: only the CRC-32 tells
        data = bytearray((ckpt / "ema.safetensors").read_bytes())
        data[-100:] = bytes(100)
        (ckpt / "ema.safetensors").write_bytes(bytes(data))
        return "ema.safetensors is corrupted"
    assert how == "malicious pickle"
    forge(ckpt, "optimizer.pt", malicious_pickle(tmp_path, marker))
    return "optimizer.pt was refused"


@pytest.mark.parametrize("how", ["truncated", "missing", "flipped bytes", "malicious pickle"])
def test_a_bad_newest_checkpoint_is_reported_and_the_previous_one_used(trained, tmp_path, how, caplog,
                                                                       fresh_accelerate):
    from pipeline.train.trainer import train

    run = copy_run(trained, tmp_path)
    marker = tmp_path / "code-ran"
    why = corrupt(run / "checkpoints/step-00000004", how, tmp_path, marker)
    caplog.set_level(logging.INFO)
    result = train(tiny_cfg(run, "train.max_steps=6", "ckpt.every_steps=2", "ckpt.keep_last=3"))
    assert result.step == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-00000004" in w and why in w for w in warnings), warnings
    assert any("resumed from" in r.getMessage() and "step-00000002: step 2," in r.getMessage()
               for r in caplog.records)
    assert not marker.exists(), "loading a checkpoint ran code from it"
    # The run went on from step 2 and wrote a good step 4 (and 6) in place of the bad one.
    assert verify(run / "checkpoints/step-00000004", content=True) is None
    assert latest_name(run) == "step-00000006"


def test_no_loadable_checkpoint_is_a_one_line_error(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "code-ran"
    corrupt(run / "checkpoints/step-00000004", "truncated", tmp_path, marker)
    corrupt(run / "checkpoints/step-00000002", "malicious pickle", tmp_path, marker)
    argv, env = train_command(run, "train.max_steps=6")
    p = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("ddpm-train: error:") and "checkpoints exist but none can be loaded" in last, p.stderr
    assert "step-00000002" in last and "step-00000004" in last
    assert "Traceback" not in p.stderr
    assert not marker.exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]


# -- config changes on resume ---------------------------------------------------------------------


def test_harmless_config_changes_are_accepted_and_logged(tmp_path, caplog):
    from pipeline.config import ConfigError
    from pipeline.train.trainer import check_run_config

    run = tmp_path / "run"
    check_run_config(run, tiny_cfg(run, "train.max_steps=4"), is_main=True)
    caplog.set_level(logging.INFO)
    check_run_config(run, tiny_cfg(run, "train.max_steps=8", "log.every_steps=1"), is_main=True)
    logged = [r.getMessage() for r in caplog.records]
    assert "config change on resume: train.max_steps 4 -> 8" in logged
    assert "config change on resume: log.every_steps 5 -> 1" in logged
    # The saved config stays that of the first start; breaking changes are listed and refused.
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 4
    with pytest.raises(ConfigError) as refused:
        check_run_config(run, tiny_cfg(run, "diffusion.timesteps=500", "data.channels=3", "train.max_steps=8"),
                         is_main=True)
    message = str(refused.value)
    assert "diffusion.timesteps: 1000 -> 500" in message and "data.channels: 1 -> 3" in message
    assert "max_steps" not in message


# -- ddpm-export ----------------------------------------------------------------------------------


def test_export_writes_the_newest_checkpoint_as_fp32_and_ddpm_sample_reads_it(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    from pipeline.cli import export
    from pipeline.cli import sample

    run = copy_run(trained, tmp_path)
    out = tmp_path / "export"
    assert export.main([str(run), str(out)]) == 0
    assert "step-00000004" in capsys.readouterr().out
    for name in ["model", "ema"]:
        exported = load_file(out / f"{name}.safetensors")
        saved = ck.read_weights(run / "checkpoints/step-00000004", name)
        assert exported.keys() == saved.keys()
        assert all(v.dtype == torch.float32 and torch.equal(v, saved[k]) for k, v in exported.items())
    assert (out / "config.yaml").read_text() == (run / "config.yaml").read_text()

    # ddpm-sample gives the same images from the export as from the run directory.
    images = []
    for src in [out, run]:
        npz = tmp_path / f"{src.name}.npz"
        assert sample.main([str(src), "--num", "2", "--steps", "2", "--out", str(tmp_path / "g.png"),
                            "--npz", str(npz), "--device", "cpu"]) == 0
        images.append(np.load(npz)["arr_0"])
    assert np.array_equal(images[0], images[1])

    # A corrupted newest checkpoint: the export falls back to the previous complete one.
    corrupt(run / "checkpoints/step-00000004", "truncated", tmp_path, None)
    assert export.main([str(run), str(tmp_path / "export2")]) == 0
    assert "step-00000002" in capsys.readouterr().out


@pytest.mark.parametrize("setup, needle", [
    ("nothing", "not a run directory (no config.yaml)"),
    ("no checkpoints", "has no checkpoint yet"),
    ("all corrupted", "none can be loaded"),
])
def test_export_errors_are_one_line(trained, tmp_path, capsys, setup, needle):
    from pipeline.cli import export

    run = copy_run(trained, tmp_path)
    if setup == "nothing":
        run = tmp_path / "nothing"
    elif setup == "no checkpoints":
        shutil.rmtree(run / "checkpoints")
    else:
        for step in (2, 4):
            corrupt(run / f"checkpoints/step-{step:08d}", "missing", tmp_path, None)
    assert export.main([str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ddpm-export: error:") and needle in err[-1], err
    assert not (tmp_path / "out" / "ema.safetensors").exists()
