"""Reading one URL whole: local files here, every other scheme through webdataset's `gopen`.

`gopen` (webdataset 1.0.2) owns the scheme table: ``pipe:CMD`` (a shell command's stdout),
``http(s)://``, ``sftp://``, ``ftps://``, ``scp://`` (curl), ``gs://`` (gsutil), ``ais://``,
``htgs://``, ``hf://`` (curl on the Hub URL), plus ``USE_AIS_FOR`` and ``GOPEN_REWRITE`` from the
environment, so a URL that works with WebDataset works here, spelled the same way. What this module
adds around it:

- a no-progress timeout (`stall_timeout_s`): a stream that delivers no byte for that long is
  stopped and the read fails, so a stalled server or a command that never writes cannot hang a
  worker or the start-up;
- failures as data, not exceptions: a non-zero exit (curl's, or a ``pipe:`` command's), a cut
  download or a stall returns the bytes received so far and one line saying why, with the last
  line the command wrote on stderr (which is captured, not mixed into the trainer's output);
- no stray processes. Every gopen stream runs in a forked guard process that leads its own
  process group, so the command gopen starts (``sh -c``, curl, gsutil) and whatever that starts
  are in it. The guard asks the kernel to signal it when its parent dies (``PR_SET_PDEATHSIG``)
  and then kills its whole group; a stall or an error kills the group too. DataLoader workers get
  ``PR_SET_PDEATHSIG`` as well (`die_with_parent`), so a SIGKILL of the trainer takes down the
  workers, their guards and every download within a moment. (Linux only; elsewhere the guard still
  kills its group on a stall or an error.)

Why a fork per read and not a thread: a kill must reach the command's own children, and only a
process group does that; gopen does not let a caller start its command in a new group. The price is
one fork of the reading process per shard: measured 44 to 57 ms for a 1 MiB ``pipe:cat`` (5 ms for
gopen in the process) on a 2-core machine under load 7, nearly all of it forking a process that has
imported torch (1.3 ms for a bare Python); small against reading and decoding a shard of the usual
100 MB and more.
"""
from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import sys
import warnings
from urllib.parse import urlparse

from webdataset.gopen import gopen, gopen_schemes

LOCAL_SCHEMES = ("", "file")
REMOTE_SCHEMES = tuple(sorted(s for s in gopen_schemes if s != "__default__"))
"""URL schemes read through gopen (those in its table when this module was imported)."""
COMMAND_SCHEMES = ("pipe",)
"""Schemes whose URL is a shell command: only from the user's own config or command line."""

_CHUNK = 1 << 20
_MAX_FD = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536
_STATUS = b"\0pipeline.data.fetch "  # prefixes the guard's last stderr line: its verdict as JSON
# curl's exit statuses a shard read meets (man curl, "EXIT CODES"), for the log line
_CURL_EXITS = {6: "could not resolve the host", 7: "could not connect to the server",
               18: "the transfer was cut short", 22: "the server answered with an HTTP error",
               28: "the operation timed out", 35: "the TLS handshake failed",
               52: "the server sent nothing", 56: "the connection failed while receiving"}


def scheme(url: str) -> str:
    """The URL's scheme as gopen sees it ('' for a plain path)."""
    return urlparse(url).scheme if ":" in url else ""


def is_remote(url: str) -> bool:
    """Whether `url` is read through gopen (any scheme in its table), not as a local file."""
    return scheme(url) in REMOTE_SCHEMES


def runs_command(url: str) -> bool:
    """Whether opening `url` runs a command the URL itself spells (``pipe:``)."""
    return scheme(url) in COMMAND_SCHEMES


# The program each of gopen's handlers runs (read from its table, so USE_AIS_FOR is honoured).
_HANDLER_PROGRAMS = {"gopen_curl": "curl", "gopen_htgs": "curl", "gopen_hf": "curl",
                     "gopen_gsutil": "gsutil", "gopen_ais": "ais", "gopen_pipe": "sh"}


def missing_program(url: str) -> str | None:
    """The program gopen would run for `url` when it is not on PATH (curl for http(s), gsutil for
    gs, ...), else None: checked at start-up, so a missing tool is one error, not a failed shard
    per read."""
    import shutil

    handler = gopen_schemes.get(scheme(url))
    program = _HANDLER_PROGRAMS.get(getattr(handler, "__name__", ""))
    return program if program and shutil.which(program) is None else None


def local_path(url: str) -> str:
    """The file a local URL names (``file://`` stripped, as gopen does)."""
    if scheme(url) == "file":
        from urllib.request import url2pathname

        return url2pathname(urlparse(url).path)
    return url


# ----------------------------------------------------------------------------- processes

# Resolved once at import: a forked guard must not dlopen (another thread may hold the loader lock).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _prctl_pdeathsig(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when the thread that forked it dies."""
    return _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def die_with_parent(_worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: a SIGKILL of the trainer kills this worker at once, even
    mid-read (the loader's own watchdog only looks between batches)."""
    parent = os.getppid()
    _prctl_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


# ----------------------------------------------------------------------------- reading

def read_remote(url: str, stall_timeout_s: float) -> tuple[bytes, str | None]:
    """All bytes of a gopen URL, and None, or the bytes received before a failure and one line
    saying why (the read never raises for a failed download)."""
    data_r, data_w = os.pipe()
    err_r, err_w = os.pipe()
    parent = os.getpid()
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() in a threaded process: the guard runs only gopen and
        # plain os-level I/O, and never logs (the logging lock is one another thread may hold)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the guard: nothing here may log (another thread may hold the logging lock)
        code = 70
        try:
            os.close(data_r)
            os.close(err_r)
            code = _guard(url, data_w, err_w, stall_timeout_s, parent)
        finally:
            os._exit(code)
    os.close(data_w)
    os.close(err_w)
    data: list[bytes] = []
    err: list[bytes] = []
    stalled_guard = False
    try:
        _drain(data_r, err_r, data, err, stall_timeout_s + 30.0)  # the guard times the stream
    except TimeoutError:
        stalled_guard = True
    finally:
        os.close(data_r)
        os.close(err_r)
        if stalled_guard:
            _kill_group(pid)
        _, status = os.waitpid(pid, 0)
    if stalled_guard:
        return b"".join(data), f"no data for {stall_timeout_s:g} s (data.stall_timeout_s); stopped"
    return b"".join(data), _verdict(url, b"".join(err), status)


def _drain(data_r: int, err_r: int, data: list[bytes], err: list[bytes], timeout_s: float) -> None:
    """Read both pipes to EOF; TimeoutError when neither moves for `timeout_s`."""
    with selectors.DefaultSelector() as sel:
        sel.register(data_r, selectors.EVENT_READ, data)
        sel.register(err_r, selectors.EVENT_READ, err)
        open_fds = 2
        while open_fds:
            ready = sel.select(timeout_s)
            if not ready:
                raise TimeoutError
            for key, _ in ready:
                chunk = os.read(key.fd, _CHUNK)
                if chunk:
                    key.data.append(chunk)
                else:
                    sel.unregister(key.fd)
                    open_fds -= 1


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _verdict(url: str, err: bytes, status: int) -> str | None:
    """None for a good read, else one line: the guard's verdict and the command's last words."""
    text, found, verdict = err.rpartition(_STATUS)
    if not found:
        text, verdict = err, b""
    said = [line for line in text.decode(errors="replace").splitlines() if line.strip()]
    last = f": {said[-1].strip()}" if said else ""
    try:
        verdict = json.loads(verdict)
    except ValueError:
        verdict = None
    if verdict is None:
        how = (f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status)
               else f"status {os.waitstatus_to_exitcode(status)}")
        return f"the reader process ended with {how}{last}"
    kind = verdict["kind"]
    if kind == "ok":
        return None
    if kind == "stalled":
        return f"no data for {verdict['after_s']:g} s (data.stall_timeout_s); stopped{last}"
    if kind == "open":
        return f"cannot open ({verdict['error']})"
    if kind == "error":
        return f"cannot read ({verdict['error']}){last}"
    code, program = verdict["status"], verdict["program"]
    if runs_command(url):
        return f"command exited with status {code}{last}"
    why = _CURL_EXITS.get(code) if program == "curl" else None
    return f"download failed: {program} exited with status {code}" + (f" ({why})" if why else "") + last


def _guard(url: str, out_fd: int, err_fd: int, stall_timeout_s: float, parent: int) -> int:
    """The forked guard: gopen(url) in a process group of its own, copied to `out_fd`."""
    # Only our two pipes stay open: a pipe another thread of the parent made at the moment of the
    # fork would otherwise stay open here, and that thread's read would never see its end.
    keep = sorted((out_fd, err_fd))
    os.closerange(3, keep[0])
    os.closerange(keep[0] + 1, keep[1])
    os.closerange(keep[1] + 1, _MAX_FD)
    os.setpgid(0, 0)  # gopen's command and its children join this group

    def kill_all(*_):
        os.killpg(0, signal.SIGKILL)  # this process included

    signal.signal(signal.SIGTERM, kill_all)
    # pipeline.dist.preempt blocks the preemption signals (SIGTERM among them) in every forked child,
    # so that only the trainer acts on them; here the parent-death signal must get through.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    _prctl_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:
        kill_all()
    os.dup2(err_fd, 2)  # what the command says goes to the parent, which keeps the last line

    def verdict(kind: str, **fields) -> None:
        os.write(err_fd, _STATUS + json.dumps({"kind": kind, **fields}).encode())

    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 (gopen raises ValueError, OSError, ...): report it
        verdict("open", error=f"{type(e).__name__}: {e}")
        return 0
    proc = getattr(stream, "proc", None)
    fd = (stream.stream if proc is not None else stream).fileno()
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                if not sel.select(stall_timeout_s):
                    verdict("stalled", after_s=stall_timeout_s)
                    kill_all()
                chunk = os.read(fd, _CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out_fd, view):]
    except OSError as e:  # the parent stopped reading, or the stream broke
        verdict("error", error=f"{type(e).__name__}: {e}")
        kill_all()
    if proc is None:
        verdict("ok")
        return 0
    code = proc.wait()
    if code in getattr(stream, "ignore_status", [0]):
        verdict("ok")
    else:
        args = proc.args if isinstance(proc.args, (list, tuple)) else [proc.args]
        program = "sh" if runs_command(url) else os.path.basename(str(args[0]))
        verdict("exit", status=code, program=program)
    return 0


def read_local(path: str) -> bytes:
    """A local file's bytes, read whole (not memory-mapped: a file truncated under a running
    trainer must cost a counter, not a SIGBUS)."""
    with open(path, "rb") as f:
        return f.read()
