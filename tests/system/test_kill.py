"""Real processes, really killed (SIGKILL to the launcher and every process under it): N steps
straight == N/2 steps, kill, the same command to N, bit for bit, for 1 and 2 processes; and a short
fault-injection soak (scripts/kill_soak.py runs the long one by hand)."""
import io
import re
import sys

import pytest
import torch

from tiny_run import REPO, scalars

sys.path.insert(0, str(REPO / "scripts"))
from kill_soak import compare_checkpoints, resumed_from, run, soak  # noqa: E402
from kill_soak import kill_at_half  # noqa: E402

N = 20


def forge_malicious_rank_file(ckpt, rank, marker):
    from ckptkit import RunsCode, forge

    buf = io.BytesIO()
    torch.save(RunsCode(marker), buf)
    forge(ckpt, f"rank-{rank:05d}.pt", buf.getvalue())


@pytest.mark.parametrize("procs", [1, 2])
def test_sigkill_at_half_then_same_command_is_bit_identical(tmp_path, procs):
    overrides = [f"train.max_steps={N}", f"ckpt.every_steps={N // 2}", "ckpt.keep_last=2"]
    straight, killed, command = kill_at_half(tmp_path, overrides, N, procs=procs)
    log = (tmp_path / "first.log").read_text()
    world = re.search(r"global batch (\d+) = 16 x 1 accum x (\d+) ranks", log)
    assert world and world.groups() == (str(16 * procs), str(procs)), log[-3000:]

    assert run(command, tmp_path / "resumed.log", timeout_s=240) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert resumed_from(tmp_path / "resumed.log") == f"step-{N // 2:08d}"
    final = f"checkpoints/step-{N:08d}"
    assert compare_checkpoints(straight / final, killed / final) == []
    # TensorBoard: every logged step once, as in the uninterrupted run.
    steps = [s for s, _ in scalars(killed, "train/loss")]
    assert steps == [s for s, _ in scalars(straight, "train/loss")] == list(range(5, N + 1, 5))

    if procs == 2:
        # A failure on one rank only (its own file would run code): both ranks must agree to fall
        # back to the previous checkpoint, retrain, and end bit-identical again.
        marker = tmp_path / "code-ran"
        forge_malicious_rank_file(killed / final, 1, marker)
        rc = run(command, tmp_path / "rank-local.log", timeout_s=240)
        assert rc == 0, (tmp_path / "rank-local.log").read_text()[-3000:]
        assert resumed_from(tmp_path / "rank-local.log") == f"step-{N // 2:08d}"
        assert not marker.exists()
        assert compare_checkpoints(straight / final, killed / final) == []


def test_sigkill_at_random_moments_with_a_checkpoint_every_step(tmp_path):
    """The CI-sized soak: 3 kills; `python scripts/kill_soak.py --kills 20` is the long one."""
    summary = soak(tmp_path, kills=3, steps=28, procs=1, seed=1, max_delay_s=0.3, say=lambda s: None)
    assert summary["problems"] == []
    assert summary["kills"] == 3 and summary["final_identical"] and summary["tensorboard_steps_ok"]


def test_a_part_registered_from_outside_round_trips_a_sigkill_resume(tmp_path):
    """One `registry.register` call and no other change: the part is saved, restored and logged."""
    from kill_soak import TINY, kill, latest, start, wait_for

    run_dir, steps = tmp_path / "run", 12
    args = [sys.executable, str(REPO / "tests/system/probe_train.py"), "configs/demo.yaml", f"run_dir={run_dir}",
            *TINY, f"train.max_steps={steps}", "ckpt.every_steps=2", "ckpt.keep_last=3"]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = start((args, env), tmp_path / "first.log")
    try:
        assert wait_for(lambda: (latest(run_dir) or "") >= "step-00000006", proc, timeout_s=240)
    finally:
        kill(proc)
    saved_at = int(latest(run_dir).split("-")[1])
    assert saved_at < steps, "killed too late to test anything"
    done = __import__("subprocess").run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"probe ({saved_at})" in done.stderr, done.stderr[-3000:]  # the restore log line names it
    assert f"probe counted {steps} steps" in done.stdout
    final = torch.load(run_dir / f"checkpoints/step-{steps:08d}/rank-00000.pt", weights_only=True)
    assert final["probe"] == {"steps": steps}
