"""`sbatch launch/multinode.sh` against a real SLURM started here: slurmctld, two slurmd as two nodes
(127.0.0.1 and 127.0.0.2) and munged, in a scratch directory, stopped by PID afterwards.

Each job trains the tiny demo model with one CPU process per node (gloo, world size 2). The
preemption tests send the pre-timeout signal to the batch shell, as `#SBATCH --signal=B:USR1@300`
would, and cut the requeue hold short with `scontrol update StartTime=now`.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from pipeline.ckpt import checkpointer as ckpt_io
from slurm_cluster import SlurmCluster, missing_binaries
from tiny_run import REPO, assert_same_weights, steps_done, tiny_overrides

pytestmark = [
    pytest.mark.skipif(bool(missing_binaries()),
                       reason=f"SLURM/munge not installed (missing {', '.join(missing_binaries())}); "
                              "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test cluster's slurmd runs jobs as root: run as root"),
]

STEPS = 40
JOB_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def submit(cluster: SlurmCluster, out_dir: Path, run_dir: Path, env: dict | None = None) -> str:
    """sbatch the script as a user would, with the cluster-specific bits as options and variables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch(
        ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out_dir}/%x-%j.out",
         "launch/multinode.sh", "configs/demo.yaml", *tiny_overrides(run_dir, STEPS, "train.stop_check_steps=3")],
        cwd=REPO, env={"DDPM_CPU": "1", "DDPM_PYTHON": sys.executable, **(env or {})})


def log_of(cluster: SlurmCluster, job: str) -> str:
    return Path(cluster.job(job)["StdOut"]).read_text(errors="replace")


def preempt_midway(cluster: SlurmCluster, job: str) -> int:
    """Wait until training is under way, signal the batch shell, wait for the requeue; the stop's step."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while steps_done(log_of(cluster, job) if Path(cluster.job(job).get("StdOut", "")).is_file() else "") < 4:
        assert time.monotonic() < deadline, f"job {job} made no progress:\n{cluster.log_tail(cluster.job(job))}"
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), cluster.log_tail(cluster.job(job))
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = cluster.wait_for(job, {"PENDING"}, timeout_s=JOB_TIMEOUT_S)
    assert info["Restarts"] == "1", info
    stops = {int(s) for s in re.findall(r"stopped on SIGUSR1 at step (\d+)", log_of(cluster, job))}
    assert len(stops) == 1, log_of(cluster, job)[-3000:]
    return stops.pop()


def finish_requeued(cluster: SlurmCluster, job: str) -> dict[str, str]:
    # Skip the ~120 s requeue hold, but not quite all of it: slurmd refuses a job's new credential
    # issued in the same second its old one was revoked ("Job credential revoked", job FAILED).
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    return cluster.wait_for(job, {"COMPLETED"}, timeout_s=JOB_TIMEOUT_S)


@pytest.fixture(scope="module")
def straight_run(cluster, tmp_path_factory):
    """An uninterrupted 2-node job: (job id, run_dir, log)."""
    tmp = tmp_path_factory.mktemp("straight")
    job = submit(cluster, tmp / "out", tmp / "run")
    cluster.wait_for(job, {"COMPLETED"}, timeout_s=JOB_TIMEOUT_S)
    return job, tmp / "run", log_of(cluster, job)


def test_two_node_job_trains_with_world_size_2_and_completes(cluster, straight_run):
    job, run_dir, log = straight_run
    info = cluster.job(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0")
    assert "global batch 32 = 16 x 1 accum x 2 ranks" in log
    assert "rank 0 at 127.0.0.1:" in log and "multinode.sh: training finished" in log
    ckpt = run_dir / "checkpoints" / ckpt_io.step_name(STEPS)
    assert (run_dir / "checkpoints/latest").read_text().strip() == ckpt.name and ckpt_io.verify(ckpt) is None
    state = ckpt_io.read_train_state(ckpt)
    assert (state["step"], state["world_size"], state["images_seen"]) == (STEPS, 2, STEPS * 32)
    assert sorted(p.name for p in ckpt.glob("rank-*.pt")) == [ckpt_io.rank_file(0), ckpt_io.rank_file(1)]


def test_preempted_job_checkpoints_requeues_itself_and_ends_like_an_uninterrupted_one(cluster, straight_run,
                                                                                      tmp_path):
    job = submit(cluster, tmp_path / "out", tmp_path / "run")
    step = preempt_midway(cluster, job)
    assert 4 <= step < STEPS and step % 3 == 0
    log = log_of(cluster, job)
    assert f"requeued job {job}" in log
    stopped = tmp_path / "run/checkpoints" / ckpt_io.step_name(step)
    assert ckpt_io.verify(stopped) is None and ckpt_io.read_train_state(stopped)["step"] == step

    info = finish_requeued(cluster, job)
    assert (info["ExitCode"], info["Restarts"]) == ("0:0", "1")
    log = log_of(cluster, job)
    assert f"resumed from {stopped}: step {step}" in log
    assert ckpt_io.read_train_state(tmp_path / "run/checkpoints" / ckpt_io.step_name(STEPS))["step"] == STEPS
    assert_same_weights(straight_run[1], tmp_path / "run")


def _path_without(tmp_path: Path, command: str) -> str:
    """A PATH with everything of the current one except `command`, as on nodes without SLURM clients."""
    bin_dir = tmp_path / f"bin-without-{command}"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            target = bin_dir / entry.name
            if entry.name != command and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    assert shutil.which(command, path=str(bin_dir)) is None
    return str(bin_dir)


def test_without_scontrol_in_the_job_the_exit_status_requeues_it(cluster, straight_run, tmp_path):
    """No scontrol: the first host comes from SLURM_JOB_NODELIST by hand, and the job exits 75, which
    this cluster's slurm.conf (RequeueExit=75, as SLURM.md asks admins to set) requeues."""
    job = submit(cluster, tmp_path / "out", tmp_path / "run", env={"PATH": _path_without(tmp_path, "scontrol")})
    step = preempt_midway(cluster, job)
    log = log_of(cluster, job)
    assert "rank 0 at 127.0.0.1:" in log
    assert "could not requeue with scontrol; exiting 75" in log
    finish_requeued(cluster, job)
    assert f"step {step}" in log_of(cluster, job)
    assert_same_weights(straight_run[1], tmp_path / "run")


def test_cancelled_job_saves_a_checkpoint_on_sigterm_and_is_not_requeued(cluster, tmp_path):
    """scancel (as for a time limit or preemption): SIGTERM to every process, SIGKILL after KillWait
    (5 s here). Training stops at an agreed step with a checkpoint; SLURM, not the script, decides."""
    job = submit(cluster, tmp_path / "out", tmp_path / "run")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not Path(cluster.job(job).get("StdOut", "")).is_file() or steps_done(log_of(cluster, job)) < 4:
        assert time.monotonic() < deadline, cluster.log_tail(cluster.job(job))
        time.sleep(0.2)
    cluster.run("scancel", job)
    info = cluster.wait_for(job, {"CANCELLED"}, timeout_s=JOB_TIMEOUT_S)
    time.sleep(6)  # past KillWait: whatever was going to be written is written
    assert cluster.job(job)["Restarts"] == "0", info
    log = log_of(cluster, job)
    [step] = {int(s) for s in re.findall(r"stopped on SIGTERM at step (\d+)", log)} or [None]
    assert step is not None and step < STEPS, log[-3000:]
    assert "SLURM ended the job; training exited with status 75" in log and "requeued" not in log
    ckpt = tmp_path / "run/checkpoints" / ckpt_io.step_name(step)
    assert ckpt_io.verify(ckpt) is None and (tmp_path / "run/checkpoints/latest").read_text().strip() == ckpt.name
