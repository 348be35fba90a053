"""Preemption without SLURM: a stop signal mid-training gives a checkpoint at a step every rank agrees
on and exit status 75, and running the same command again ends with the same weights, bit for bit,
as a run that was never stopped. Also: launch/multinode.sh refuses to run outside SLURM."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ckpt import checkpointer as ckpt_io
from pipeline.config import ConfigError, load_config
from pipeline.dist.preempt import EXIT_PREEMPTED, parse_signal
from tiny_run import REPO, OutputReader, assert_same_weights, tiny_overrides

STEPS = 40
CONFIG = str(REPO / "configs/demo.yaml")
STOP_LINE = re.compile(r"ddpm-train: stopped on (.+?) at step (\d+) after saving (\S+);")


def stop_lines(text: str) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in STOP_LINE.finditer(text)]


def assert_stopped_checkpoint(run_dir: Path, step: int) -> None:
    """The checkpoint the stop saved is the newest, complete, and at the step the stop reported."""
    ckpt = run_dir / "checkpoints" / ckpt_io.step_name(step)
    assert (run_dir / "checkpoints/latest").read_text().strip() == ckpt.name
    assert ckpt_io.verify(ckpt) is None
    assert ckpt_io.read_train_state(ckpt)["step"] == step


def run_to_end(cmd: list[str], env: dict | None = None) -> None:
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]


def start(cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, OutputReader]:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, OutputReader(proc.stderr)


def test_one_process_stops_on_sigusr1_with_a_checkpoint_and_resumes_exactly(tmp_path):
    def cmd(run_dir):
        return [sys.executable, "-m", "pipeline.train", CONFIG, *tiny_overrides(run_dir, STEPS)]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_to_end(cmd(straight))

    proc, out = start(cmd(stopped))
    out.wait_for_step(4, timeout_s=120, alive=lambda: proc.poll() is None)
    proc.send_signal(signal.SIGUSR1)
    rc = proc.wait(timeout=120)
    text = out.join()
    assert rc == EXIT_PREEMPTED, text[-3000:]
    [(signal_name, step)] = stop_lines(text)
    assert signal_name == "SIGUSR1" and 4 <= step < STEPS
    # ckpt.every_steps is 1000: this checkpoint exists only because of the stop.
    assert_stopped_checkpoint(stopped, step)

    run_to_end(cmd(stopped))  # the same command resumes from the stop's checkpoint
    assert_same_weights(straight, stopped)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_pid(launcher_pid: int, rank: int) -> int:
    """The training process of `rank` among the launcher's children (torch elastic sets RANK)."""
    children = []
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        children += (task / "children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def test_two_processes_stop_at_the_same_step_when_one_is_signalled_and_resume_exactly(tmp_path):
    def cmd(run_dir):
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), "-m", "pipeline.train", CONFIG,
                *tiny_overrides(run_dir, STEPS, "train.stop_check_steps=3")]

    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}  # MULTI_CPU over gloo (see toolchain notes)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_to_end(cmd(straight), env)

    proc, out = start(cmd(stopped), env)
    out.wait_for_step(4, timeout_s=180, alive=lambda: proc.poll() is None)
    os.kill(_worker_pid(proc.pid, rank=1), signal.SIGUSR1)  # rank 0 never sees a signal
    rc = proc.wait(timeout=180)
    text = out.join()
    stops = stop_lines(text)
    assert sorted(name for name, _ in stops) == ["SIGUSR1", "a signal to another rank"], text[-3000:]
    [step] = {s for _, s in stops}  # both ranks stopped at the same step...
    assert step % 3 == 0 and 4 <= step < STEPS  # ...one where they compare notes
    # Each worker exits 75; accelerate's launcher lists that, then exits 1 itself (SLURM.md).
    assert "exitcode  : 75" in text and rc != 0
    assert_stopped_checkpoint(stopped, step)
    assert {p.name for p in (stopped / "checkpoints" / ckpt_io.step_name(step)).glob("rank-*.pt")} == {
        ckpt_io.rank_file(0), ckpt_io.rank_file(1)}

    run_to_end(cmd(stopped), env)
    assert_same_weights(straight, stopped)


def test_multinode_script_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", str(REPO / "launch/multinode.sh"), "configs/demo.yaml"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and p.stdout == ""
    [line] = p.stderr.strip().splitlines()
    assert line.startswith("multinode.sh: error: not inside a SLURM job") and "sbatch launch/multinode.sh" in line


@pytest.mark.parametrize("name, expected", [("SIGUSR1", signal.SIGUSR1), ("usr2", signal.SIGUSR2),
                                            ("15", signal.SIGTERM)])
def test_stop_signal_names(name, expected):
    assert parse_signal(name) == expected


@pytest.mark.parametrize("value, needle", [("SIGKILL", "cannot be caught"), ("SIGNOPE", "is not a signal")])
def test_bad_stop_signal_is_a_config_error(value, needle):
    with pytest.raises(ConfigError, match=f"train.stop_signal: .*{needle}"):
        load_config(CONFIG, [f"train.stop_signal={value}"])
