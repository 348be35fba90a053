"""A real SLURM cluster on this machine for the tests: munged, slurmctld and two slurmd as two nodes.

Everything lives in one scratch directory (keys, sockets, state, spool, logs); nothing outside it
changes and no systemd is needed. The nodes are named by loopback addresses (127.0.0.1, 127.0.0.2)
so that `scontrol show hostnames` gives a resolvable MASTER_ADDR. Daemons are stopped by the PIDs
in their pid files. Facts behind the settings: ../shared/notes/slurm-on-one-host.md.

    cluster = SlurmCluster(tmp_dir); cluster.start()
    job = cluster.sbatch(["launch/multinode.sh", "configs/demo.yaml"], cwd=repo)
    cluster.wait_for(job, {"COMPLETED"}); cluster.stop()
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "srun")
NODES = ("127.0.0.1", "127.0.0.2")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _cpus_and_memory_mb() -> tuple[int, int]:
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return int(fields["CPUs"]), int(fields["RealMemory"])


class SlurmCluster:
    """Start/stop munged + slurmctld + one slurmd per node under `root`; run client commands."""

    def __init__(self, root: Path, requeue_exit: str = "75"):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        # Exit statuses SLURM itself requeues on (slurm.conf RequeueExit): the documented fallback
        # for job environments without scontrol. Empty: no automatic requeue.
        self.requeue_exit = requeue_exit
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files: list[Path] = []

    # -- daemons -------------------------------------------------------------------------------

    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o755)  # munged refuses a socket directory with other modes
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={r / 'munge/munge.key'}"],
                       check=True, capture_output=True)
        (r / "munge/munge.key").chmod(0o600)
        munge_pid = r / "run/munged.pid"
        subprocess.run([_which("munged"), f"--key-file={r / 'munge/munge.key'}",
                        f"--socket={r / 'munge/munge.socket'}", f"--pid-file={munge_pid}",
                        f"--log-file={r / 'log/munged.log'}", f"--seed-file={r / 'munge/munged.seed'}",
                        "--force"], check=True, capture_output=True)
        self._pid_files.append(munge_pid)
        self._write_conf()
        subprocess.run([_which("slurmctld"), "-f", str(self.conf), "-i"], check=True, env=self.env,
                       capture_output=True)
        self._pid_files.append(r / "run/slurmctld.pid")
        for node in NODES:
            # slurmd creates only the last level of its spool directory.
            (r / "spool" / node).mkdir(parents=True, exist_ok=True)
            subprocess.run([_which("slurmd"), "-f", str(self.conf), "-N", node], check=True, env=self.env,
                           capture_output=True)
            self._pid_files.append(r / f"run/slurmd-{node}.pid")
        self._wait_nodes_idle(timeout_s=30)

    def _write_conf(self) -> None:
        r = self.root
        cpus, memory_mb = _cpus_and_memory_mb()
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost Port={p} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN"
            for n, p in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=ddpmtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge/munge.socket'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
{f'RequeueExit={self.requeue_exit}' if self.requeue_exit else ''}
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=1
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'run/slurmctld.pid'}
SlurmdPidFile={r / 'run'}/slurmd-%n.pid
SlurmctldLogFile={r / 'log/slurmctld.log'}
SlurmdLogFile={r / 'log'}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_nodes_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        out = ""
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.2)
        raise RuntimeError(f"SLURM nodes not idle after {timeout_s} s: {out!r}; logs in {self.root / 'log'}")

    def stop(self) -> None:
        """Cancel all jobs, then stop the daemons by PID (slurmd, slurmctld, munged) and wait."""
        self.run("scancel", "--full", "--user", "root", check=False, timeout=10)
        time.sleep(0.5)
        for pid_file in reversed(self._pid_files):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._pid_files.clear()

    # -- clients -------------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True, timeout: float = 30, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([_which(args[0]), *args[1:]], capture_output=True, text=True, check=check,
                              timeout=timeout, env={**self.env, **(env or {})}, cwd=cwd)

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> str:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields = {}
        for token in out.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_for(self, job_id: str, states: set[str], timeout_s: float, poll_s: float = 0.2) -> dict[str, str]:
        """Poll until the job is in one of `states`; raise (with its log tail) on timeout or another end."""
        deadline = time.monotonic() + timeout_s
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in FINISHED:
                raise AssertionError(f"job {job_id} ended {state} (exit {info.get('ExitCode')}) while waiting for "
                                     f"{sorted(states)}:\n{self.log_tail(info)}")
            time.sleep(poll_s)
        raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout_s} s:\n{self.log_tail(info)}")

    def log_tail(self, info: dict[str, str], lines: int = 60) -> str:
        path = Path(info.get("StdOut", ""))
        if not path.is_file():
            return "(no job output)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
