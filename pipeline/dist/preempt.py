"""Preemption: a stop signal becomes a checkpoint at a step boundary and a distinct exit status.

SLURM warns a job before its time limit with a signal (`#SBATCH --signal=B:USR1@300`, forwarded to
the training processes by launch/multinode.sh) and ends or preempts it with SIGTERM. `install`
makes both set a flag and nothing else: a handler runs between two bytecodes of whatever the
process is doing, so it must not save, log or touch torch.distributed. The loop reads the flag
at step boundaries, the ranks agree on it (one all-reduce, every `train.stop_check_steps` steps),
every rank takes part in the checkpoint save, and the loop raises `Preempted`; `ddpm-train`
turns that into exit status EXIT_PREEMPTED, on which the batch script requeues the job.

Signal handlers belong to the process, so the flag does too: this module holds it.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

EXIT_PREEMPTED = 75
"""EX_TEMPFAIL from sysexits.h ("try again later"): stopped on request with a complete checkpoint;
running the same command again resumes. Distinct from 0 (done), 1 (crash), 2 (user error), 130 (Ctrl-C)."""

ALWAYS = ("SIGTERM",)
"""Handled whatever the configured signal: SLURM's cancel, time limit and preemption all send it."""

_received: str | None = None


class Preempted(Exception):
    """The loop stopped early on a stop signal, after saving a complete checkpoint."""

    def __init__(self, step: int, signal_name: str, checkpoint: Path):
        self.step = step
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        super().__init__(f"stopped on {signal_name} at step {step} after saving {checkpoint}; "
                         f"run the same command again to resume (exit status {EXIT_PREEMPTED})")


def parse_signal(name: str) -> signal.Signals:
    """`SIGUSR1`, `USR1` or a number -> a signal a process can catch; ValueError saying why not."""
    text = name.strip().upper()
    try:
        signum = signal.Signals(int(text)) if text.isdigit() else signal.Signals[
            text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ValueError(f"'{name}' is not a signal (use a name such as SIGUSR1 or SIGUSR2)") from None
    if signum in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{signum.name} cannot be caught (use e.g. SIGUSR1 or SIGUSR2)")
    return signum


def install(stop_signal: str) -> list[signal.Signals]:
    """Make `stop_signal` and SIGTERM request a stop; returns the signals now handled.

    SLURM signals every process of a task, DataLoader workers included, and torch makes a worker
    die of a SIGTERM that its parent did not send; the parent would then fail fetching the batches
    it needs to reach the agreed stop step. So children forked from here on (DataLoader workers)
    block these signals and leave the stop to their parent, which ends them itself.
    """
    signums = list(dict.fromkeys(parse_signal(s) for s in (stop_signal, *ALWAYS)))
    for signum in signums:
        signal.signal(signum, _on_signal)
    os.register_at_fork(after_in_child=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, signums))
    return signums


def _on_signal(signum: int, frame: object) -> None:
    global _received
    if _received is None:  # the first one names the reason; repeats change nothing
        _received = signal.Signals(signum).name


def received() -> str | None:
    """The name of the first stop signal this process received since `install`, or None."""
    return _received
