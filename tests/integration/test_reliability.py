"""Issue 15's defects, one test each: no code runs from untrusted files, one trainer per run
directory, nothing the user had is deleted, no silently wrong data, no crash or traceback."""
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ckptkit import RunsCode, forge
from pipeline.ckpt import checkpointer as ck
from pipeline.ckpt.checkpointer import Checkpointer, newest_loadable, verify
from tiny_run import REPO, TINY, run_cli

sys.path.insert(0, str(REPO / "scripts"))
from kill_soak import kill, latest, start, wait_for  # noqa: E402


def fake_save(c, step):
    c.save(step, weights={"model": {"w": torch.full((64,), float(step))}, "ema": {"w": torch.zeros(64)}},
           objects={"optimizer": {"state": {}, "param_groups": []}},
           train_state={"step": step}, rank_state={"rng": [1], "data": {"pos": step}})


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def train_args(run_dir, *extra):
    return [sys.executable, "-m", "pipeline.train", "configs/demo.yaml", f"run_dir={run_dir}", *TINY, *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def one_line(p, needle):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert needle in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4 (made once for the tests that damage copies)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    p = subprocess.run(train_args(run, "train.max_steps=4", "ckpt.every_steps=2", "ckpt.keep_last=3"),
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def copy_run(trained_run, tmp_path):
    import shutil

    shutil.copytree(trained_run, tmp_path / "run")
    (tmp_path / "run" / "trainer.lock").unlink(missing_ok=True)
    return tmp_path / "run"


# -- 1. untrusted code -------------------------------------------------------------------------

def test_export_of_a_non_deepspeed_run_never_loads_deepspeed_files(trained_run, tmp_path):
    """A crafted deepspeed/state/*.pt, listed in the MANIFEST with a matching CRC, or not listed."""
    run = copy_run(trained_run, tmp_path)
    ckpt = run / "checkpoints" / latest(run)
    marker = tmp_path / "code-ran"
    evil = io.BytesIO()
    torch.save(RunsCode(marker), evil)
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    forge(ckpt, "deepspeed/state/mp_rank_00_model_states.pt", evil.getvalue())
    p = run_cli("pipeline.cli.export", str(run), str(tmp_path / "out"))
    assert not marker.exists()
    assert p.returncode == 0, p.stderr  # fell back to the untouched older checkpoint
    assert "DeepSpeed files" in p.stderr and "step-00000002" in p.stdout
    # Unlisted: the checkpoint no longer verifies, so nothing in it is read.
    manifest = json.loads((ckpt / ck.MANIFEST).read_text())
    del manifest["files"]["deepspeed/state/mp_rank_00_model_states.pt"]
    (ckpt / ck.MANIFEST).write_text(json.dumps(manifest))
    assert "MANIFEST.json does not list" in verify(ckpt)
    run_cli("pipeline.cli.export", str(run), str(tmp_path / "out2"))
    assert not marker.exists()


def test_deepspeed_loads_are_weights_only_with_an_allow_list(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pipeline.ckpt import zero
    from pipeline.errors import CheckpointError

    marker = tmp_path / "code-ran"
    torch.save(RunsCode(marker), tmp_path / "evil.pt")
    torch.save({"stage": ZeroStageEnum.gradients, "w": torch.ones(2)}, tmp_path / "ok.pt")
    with zero.weights_only_loads():
        with pytest.raises(CheckpointError, match="could run code"):
            torch.load(tmp_path / "evil.pt", weights_only=False)  # what DeepSpeed's own code asks for
        assert torch.load(tmp_path / "ok.pt", weights_only=False)["stage"] is ZeroStageEnum.gradients
    assert not marker.exists()


# -- 2. one trainer per run directory -----------------------------------------------------------

def test_a_second_trainer_on_the_same_run_dir_exits_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = start((train_args(run, "train.max_steps=100000", "ckpt.every_steps=5"), ENV), tmp_path / "first.log")
    try:
        assert wait_for(lambda: latest(run) is not None, first, timeout_s=240), (tmp_path / "first.log").read_text()
        began = time.monotonic()
        second = subprocess.run(train_args(run, "train.max_steps=100000"), cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=120)
        one_line(second, "is in use by another trainer")
        assert f"pid {first.pid}" in second.stderr
        assert time.monotonic() - began < 60
        before = sorted(p.name for p in (run / "checkpoints").iterdir())
    finally:
        kill(first)
    assert all(verify(run / "checkpoints" / n) is None for n in before if n.startswith("step-"))
    # The kernel dropped the dead holder's lock: the same command resumes.
    again = subprocess.run(train_args(run, f"train.max_steps={int(latest(run).split('-')[1]) + 2}"), cwd=REPO,
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-3000:]


def test_a_manifest_that_lacks_a_required_file_is_incomplete(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    ckpt = run / "checkpoints" / latest(run)
    for name in ("model.safetensors", ck.rank_file(0)):
        manifest = json.loads((ckpt / ck.MANIFEST).read_text())
        kept = {k: v for k, v in manifest["files"].items() if k != name}
        (ckpt / ck.MANIFEST).write_text(json.dumps({**manifest, "files": kept}))
        (ckpt / name).rename(tmp_path / name)
        assert "does not list" in verify(ckpt, content=True)
        (tmp_path / name).rename(ckpt / name)
        (ckpt / ck.MANIFEST).write_text(json.dumps(manifest))
    assert verify(ckpt, content=True) is None
    # ddpm-sample uses the same policy: it falls back to step 2
    manifest = json.loads((ckpt / ck.MANIFEST).read_text())
    del manifest["files"]["model.safetensors"]
    (ckpt / ck.MANIFEST).write_text(json.dumps(manifest))
    p = run_cli("pipeline.cli.sample", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert p.returncode == 0 and "step-00000002" in p.stdout, p.stderr[-2000:]


# -- 3. nothing the user had is deleted ---------------------------------------------------------

def test_rotation_after_a_fallback_keeps_the_good_checkpoint_and_sets_the_corrupt_one_aside(tmp_path):
    run = tmp_path / "run"
    c = Checkpointer(run, keep_last=1, rank=0, world_size=1, barrier=lambda: None)
    fake_save(c, 2)
    c.keep_last = 2
    fake_save(c, 4)
    flip_a_byte(run / "checkpoints/step-00000004/ema.safetensors")  # sizes still match
    assert newest_loadable(c, lambda ckpt: None) == run / "checkpoints/step-00000002"
    c.keep_last = 1
    fake_save(c, 3)  # the resumed run's next save (e.g. at a preemption)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["corrupt", "latest", "step-00000003"]
    assert (run / "checkpoints/corrupt/step-00000004/ema.safetensors").is_file()  # kept, not deleted
    assert verify(run / "checkpoints/step-00000003", content=True) is None
    # A corrupt checkpoint of the same step as a new save is set aside too, not overwritten.
    fake_save(c, 5)
    flip_a_byte(run / "checkpoints/step-00000005/model.safetensors")
    fake_save(c, 5)
    assert sorted(p.name for p in (run / "checkpoints/corrupt").iterdir()) == ["step-00000004", "step-00000005"]


def test_shards_force_replaces_old_shards_only_after_the_new_ones_are_complete(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from pipeline.cli.shards import main
    from shardkit import make_folder

    make_folder(tmp_path / "src")
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "2", "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    real_read = Path.read_bytes
    calls = [0]

    def failing_read(self):
        calls[0] += 1
        if calls[0] > 5:
            raise OSError(5, "Input/output error", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", failing_read)
    rc = main([str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "3", "--force", "--quiet"])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Input/output error" in err[-1] and "unchanged" in err[-1], err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # nothing lost, no staging left


def test_shards_skips_a_fifo_instead_of_hanging(tmp_path, capsys):
    from pipeline.cli.shards import main
    from shardkit import make_folder

    make_folder(tmp_path / "src")
    os.mkfifo(tmp_path / "src" / "cat" / "pipe.png")
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--quiet"]) == 0
    assert "pipe.png: not a regular file" in capsys.readouterr().err


def test_export_refuses_a_run_directory_as_target(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    other = tmp_path / "other"
    subprocess.run(["cp", "-r", str(run), str(other)], check=True)
    config = (other / "config.yaml").read_bytes()
    one_line(run_cli("pipeline.cli.export", str(run), str(other)), "is a run directory")
    assert (other / "config.yaml").read_bytes() == config


def test_a_wrong_command_on_a_run_without_config_yaml_rewrites_nothing(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    (run / "config.yaml").unlink()
    p = subprocess.run(train_args(run, "train.max_steps=6", "model.channels=16"), cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "none can be loaded" in p.stderr, p.stderr[-2000:]
    assert not (run / "config.yaml").exists()
    p = subprocess.run(train_args(run, "train.max_steps=6"), cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[-2000:]
    assert "channels: 8" in (run / "config.yaml").read_text()


# -- 4. silently wrong data ---------------------------------------------------------------------

def test_16_bit_png_is_scaled_to_8_bits_not_white(tmp_path):
    from pipeline.data.decode import decode_image

    ramp = (np.arange(28 * 28).reshape(28, 28) * 83).astype(np.uint16)  # 0 .. 65,000
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    got = decode_image(buf.getvalue(), "png", 28, 1)[..., 0]
    assert np.abs(got.astype(int) - (ramp.astype(int) * 255 // 65535)).max() <= 1
    assert (got == 255).mean() < 0.01


# -- 6. tracebacks for user errors --------------------------------------------------------------

def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    p = subprocess.run(train_args(tmp_path / "afile" / "run", "train.max_steps=1"), cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    one_line(p, "cannot write in run_dir")


@pytest.mark.parametrize("damage", ["not UTF-8", "a directory"])
def test_an_unreadable_latest_falls_back_to_the_newest_checkpoint(tmp_path, damage, caplog):
    run = tmp_path / "run"
    c = Checkpointer(run, keep_last=3, rank=0, world_size=1, barrier=lambda: None)
    fake_save(c, 1)
    fake_save(c, 2)
    latest_file = run / "checkpoints" / "latest"
    latest_file.unlink()
    if damage == "a directory":
        latest_file.mkdir()
    else:
        latest_file.write_bytes(b"\xff\xfe")
    assert newest_loadable(c, lambda ckpt: None) == run / "checkpoints/step-00000002"
    assert "latest is unreadable" in caplog.text.replace(str(latest_file), "latest")


def _mount_tmpfs(path, size):
    path.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({p.stderr.strip() or 'mount failed'}); needs root")


def test_a_full_disk_is_one_line_keeps_the_previous_checkpoint_and_leaves_no_partial(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1600k")  # one tiny-run checkpoint (about 0.9 MB) fits, two do not
    try:
        run = disk / "run"
        p = subprocess.run(train_args(run, "train.max_steps=4", "ckpt.every_steps=2", "ckpt.keep_last=3"),
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        one_line(p, "is full")
        assert "step-00000002 is kept" in p.stderr
        assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial save is gone
        assert verify(run / "checkpoints/step-00000002", content=True) is None
        assert latest(run) == "step-00000002"
    finally:
        subprocess.run(["umount", str(disk)])
