"""Fault injection: SIGKILL a training run at random moments; it must end where an uninterrupted one does.

    python scripts/kill_soak.py --kills 20 [--procs 1|2] [--steps N] [--seed S] [--work DIR]

1. Trains a tiny UNet on the demo shards straight to --steps, a checkpoint every step (WORK/straight).
2. Starts the same command in WORK/killed, waits until it has saved a new checkpoint, then SIGKILLs
   the launcher and every process under it: after a random 0..--max-delay-s, or (every other kill)
   a random 0..10 ms after the next save has begun. Records what was on disk (the checkpoint that
   `latest` names, and whether a save was in progress), restarts it; --kills times.
3. Lets the last start finish, then checks: every restart logged "resumed from" the checkpoint that
   `latest` named at the kill, and that checkpoint was complete; the final checkpoints (model, EMA,
   optimizer, train state, every rank's RNG and data position) are bit-identical; TensorBoard has
   each logged step once.
Prints progress and a JSON summary as the last line; exit status 0 when every check passed.
tests/test_kill.py imports the helpers below and runs a short version in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A tiny UNet on the demo shards: a step is tens of milliseconds on one core.
TINY = [f"data.urls={REPO / 'data/demo'}", "data.num_workers=1", "model.channels=8", "model.channel_mult=[1,2]",
        "model.attention_resolutions=[14]", "train.micro_batch_size=16", "optim.warmup_steps=10",
        "log.every_steps=5", "log.sample_every_steps=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(run_dir: Path, *overrides: str, procs: int = 1) -> tuple[list[str], dict]:
    """(argv, env) of `ddpm-train` with the tiny config; procs=2 is two gloo processes on the CPU."""
    args = ["configs/demo.yaml", f"run_dir={run_dir}", *TINY, *overrides]
    # One thread per process: runs that share the cores (straight beside killed, other jobs) would
    # otherwise spin-wait on each other's OpenMP threads. Both runs compared use the same setting.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if procs == 1:
        return [sys.executable, "-m", "pipeline.train", *args], env
    # The one flag set that really runs N CPU processes (shared/notes/toolchain.md). Under DeepSpeed,
    # CPU mode would make accelerate ignore the plugin: the runtime picks gloo and DS_ACCELERATOR=cpu.
    if not any(o.startswith("train.deepspeed=") and o != "train.deepspeed=" for o in overrides):
        env["ACCELERATE_USE_CPU"] = "true"
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "pipeline.train", *args], env


def start(command: tuple[list[str], dict], log_path: Path) -> subprocess.Popen:
    """Start the command in a session of its own, with its output in `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.Popen(command[0], env=command[1], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process under it, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at one moment: no handler runs, like a node failure.

    `accelerate launch` starts each rank in a session of its own, so killing the process group alone
    would leave the ranks training. Everything is frozen first (SIGSTOP), so nothing forks while
    the tree is collected, then killed.
    """
    if proc.poll() is not None:
        return  # exited and reaped: its pid may belong to someone else by now
    stopped: set[int] = set()  # (until reaped below, proc.pid stays ours even if it exits meanwhile)
    while fresh := set(process_tree(proc.pid)) - stopped:
        for pid in fresh:
            _signal(pid, signal.SIGSTOP)
        stopped |= fresh
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    proc.wait()


def run(command: tuple[list[str], dict], log_path: Path, timeout_s: float = 600) -> int:
    proc = start(command, log_path)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s; log: {log_path}") from None


def latest(run_dir: Path) -> str | None:
    try:
        return (run_dir / "checkpoints" / "latest").read_text().strip() or None
    except FileNotFoundError:
        return None


def wait_for(predicate, proc: subprocess.Popen, timeout_s: float, poll_s: float = 0.002) -> bool:
    """Poll until predicate() is true (True), or the process exits first (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return bool(predicate())
        time.sleep(poll_s)
    raise RuntimeError(f"nothing happened within {timeout_s:.0f} s")


def kill_at_half(work: Path, overrides: list[str], steps: int, procs: int = 1):
    """Start an uninterrupted run (work/straight) beside one that is SIGKILLed as soon as `latest`
    names step steps/2 (work/killed); wait for the first to finish. The overrides must save at
    steps/2. Returns (straight run dir, killed run dir, the killed run's command to rerun it).
    Logs: work/straight.log, work/first.log."""
    straight, killed = work / "straight", work / "killed"
    command = train_command(killed, *overrides, procs=procs)
    # The uninterrupted run goes alongside the one we kill (2 cores: it also widens the kill window).
    straight_proc = start(train_command(straight, *overrides, procs=procs), work / "straight.log")
    proc = start(command, work / "first.log")
    try:
        wait_for(lambda: latest(killed) == f"step-{steps // 2:08d}", proc, timeout_s=300)
        kill(proc)
        assert straight_proc.wait(timeout=300) == 0, (work / "straight.log").read_text()[-3000:]
    finally:
        kill(proc)
        kill(straight_proc)
    assert proc.returncode == -9
    ckpts = sorted(p.name for p in (killed / "checkpoints").glob("step-*"))
    assert ckpts == [f"step-{steps // 2:08d}"], f"the kill came too late: {ckpts}"
    return straight, killed, command


def resumed_from(log_path: Path) -> str | None:
    m = re.search(r"resumed from \S*?(step-\d{8})", log_path.read_text())
    return m.group(1) if m else None


def same(a, b) -> bool:
    """Exact equality of nested checkpoint objects: tensors bit for bit (and dtype), the rest by ==."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def compare_checkpoints(a: Path, b: Path) -> list[str]:
    """Names of the parts that differ between two checkpoint directories (empty: identical state)."""
    from pipeline.ckpt import checkpointer as ck

    diffs = []
    for name in ("model", "ema"):
        wa, wb = ck.read_weights(a, name), ck.read_weights(b, name)
        bad = [k for k in wa.keys() | wb.keys() if not same(wa.get(k), wb.get(k))]
        if bad:
            diffs.append(f"{name}: {len(bad)} tensors differ, e.g. {sorted(bad)[0]}")
    files = sorted(p.name for p in a.glob("*.pt"))
    if files != sorted(p.name for p in b.glob("*.pt")):
        diffs.append(f"different files: {files}")
    for f in files:  # optimizer.pt and every rank's RNG and data position
        if not same(ck.read_object(a, f), ck.read_object(b, f)):
            diffs.append(f)
    if ck.read_train_state(a) != ck.read_train_state(b):
        diffs.append("train_state.json")
    return diffs


def tensorboard_steps(run_dir: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def soak(work: Path, kills: int, steps: int, procs: int, seed: int, max_delay_s: float,
         max_save_delay_s: float = 0.01, say=print) -> dict:
    from pipeline.ckpt.checkpointer import verify

    rng = random.Random(seed)
    overrides = [f"train.max_steps={steps}", "ckpt.every_steps=1", "ckpt.keep_last=2"]
    straight, killed = work / "straight", work / "killed"
    t0 = time.monotonic()
    rc = run(train_command(straight, *overrides, procs=procs), work / "logs/straight.log")
    if rc != 0:
        raise RuntimeError(f"the straight run failed (exit {rc}); log: {work / 'logs/straight.log'}")
    say(f"straight run: {steps} steps in {time.monotonic() - t0:.1f} s")

    command = train_command(killed, *overrides, procs=procs)
    records, problems = [], []
    for i in range(kills):
        before = latest(killed)
        log_path = work / f"logs/killed-{i:03d}.log"
        proc = start(command, log_path)
        progressed = wait_for(lambda: latest(killed) not in (None, before), proc, timeout_s=300)
        if progressed and i % 2:
            # Every other kill aims at a save: once the next one has begun, within its first ms.
            wait_for(lambda: any((killed / "checkpoints").glob(".tmp-step-*")), proc, timeout_s=300)
            time.sleep(rng.uniform(0, max_save_delay_s))
        elif progressed:
            time.sleep(rng.uniform(0, max_delay_s))
        kill(proc)
        if not progressed and proc.returncode != -signal.SIGKILL:
            problems.append(f"start {i} exited with status {proc.returncode} before a new checkpoint; log: {log_path}")
            break
        if not progressed or latest(killed) == f"step-{steps:08d}":
            say(f"kill {i}: the run finished before the kill; stopping with {i} kills (use more --steps)")
            break
        ckpts = killed / "checkpoints"
        named = latest(killed)
        dirs = sorted(p.name for p in ckpts.iterdir())
        steps_on_disk = [d for d in dirs if d.startswith("step-")]
        # Inside a save: its temporary directory exists, or it is renamed into place but `latest`
        # not yet updated, or its rotation was deleting an old one (a `.old-` entry that the
        # previous kill did not leave already).
        left_before = set(records[-1]["dirs"]) if records else set()
        inside = (any(d.startswith(".tmp-") or (d.startswith(".old-") and d not in left_before) for d in dirs)
                  or (bool(steps_on_disk) and steps_on_disk[-1] > named))
        rec = {"kill": i, "latest": named, "latest_complete": verify(ckpts / named, content=True) is None,
               "inside_save": inside, "dirs": dirs}
        records.append(rec)
        if i > 0:
            got = resumed_from(log_path)
            if got != records[-2]["latest"]:
                problems.append(f"start {i} resumed from {got}, but latest named {records[-2]['latest']}")
        if not rec["latest_complete"]:
            problems.append(f"after kill {i}, latest names an incomplete checkpoint {named}")
        say(f"kill {i}: latest {named} complete={rec['latest_complete']} inside_save={inside} dirs={dirs}")

    final_log = work / "logs/killed-final.log"
    rc = run(command, final_log)
    if rc != 0:
        problems.append(f"the final start failed (exit {rc}); log: {final_log}")
    elif records and resumed_from(final_log) != records[-1]["latest"]:
        problems.append(f"final start resumed from {resumed_from(final_log)}, latest named {records[-1]['latest']}")
    final = f"step-{steps:08d}"
    diffs = compare_checkpoints(straight / "checkpoints" / final, killed / "checkpoints" / final) if rc == 0 else []
    problems += [f"final checkpoint differs: {d}" for d in diffs]
    tb = tensorboard_steps(killed)
    tb_ok = tb == tensorboard_steps(straight)
    if not tb_ok:
        problems.append(f"TensorBoard steps differ from the straight run's: {tb}")
    summary = {"kills": len(records), "inside_save": sum(r["inside_save"] for r in records),
               "procs": procs, "steps": steps, "final_identical": rc == 0 and not diffs,
               "tensorboard_steps_ok": tb_ok,
               "problems": problems, "seconds": round(time.monotonic() - t0, 1)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    parser.add_argument("--procs", type=int, default=1, choices=[1, 2], help="training processes (default 1)")
    parser.add_argument("--steps", type=int, help="optimizer steps of the run (default 6 x kills + 10)")
    parser.add_argument("--max-delay-s", type=float, default=0.3,
                        help="kill this long at most after a new checkpoint appears (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    work = args.work or Path(tempfile.mkdtemp(prefix="kill-soak-"))
    print(f"working in {work}", flush=True)
    summary = soak(work, args.kills, args.steps or 6 * args.kills + 10, args.procs, args.seed, args.max_delay_s,
                   say=lambda s: print(s, flush=True))
    print(json.dumps(summary))
    return 0 if not summary["problems"] and summary["final_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
