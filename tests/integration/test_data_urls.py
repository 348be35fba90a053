"""URLs through webdataset's gopen: what an index may name, stalls, failing commands, truncation
under a running reader, and no process left behind by a SIGKILL of the trainer."""
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.data import build_loader, fetch, resolve_urls
from pipeline.data.tario import read_shard
from pipeline.errors import DataError
from shardkit import id_shards, ids

REPO = Path(__file__).resolve().parents[2]
SIZES = [6, 3, 8, 5]


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/stall/"):  # headers and a first part, then nothing for a minute
            body = (Path(self.directory) / self.path[len("/stall/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:1024])
            self.wfile.flush()
            self.server.stalled.set()
            time.sleep(60)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving tmp_path/www (stopped at the end, or after 120 s)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.daemon_threads = True
    httpd.stalled = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    deadline = threading.Timer(120, httpd.shutdown)
    deadline.daemon = True
    deadline.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    deadline.cancel()
    httpd.shutdown()
    httpd.server_close()


def test_gopen_schemes_are_remote_and_other_schemes_get_a_hint(tmp_path):
    for url in ("pipe:cat x.tar", "http://h/x.tar", "https://h/x.tar", "gs://b/x.tar", "hf://datasets/a/b/x.tar",
                "ais://b/x.tar", "sftp://h/x.tar"):
        assert fetch.is_remote(url), url
    for url in ("x.tar", "/data/x-000000.tar", "file:///data/x.tar", "./a:b/x.tar"):
        assert not fetch.is_remote(url), url
    assert fetch.runs_command("pipe:cat x") and not fetch.runs_command("http://h/x.tar")
    assert fetch.local_path("file:///data/x.tar") == "/data/x.tar"
    demo = REPO / "data/demo"
    assert resolve_urls(f"file://{demo}/fashion-mnist-{{000000..000001}}.tar") == [
        str(demo / "fashion-mnist-000000.tar"), str(demo / "fashion-mnist-000001.tar")]
    with pytest.raises(DataError, match=r"no s3:// scheme .* 'pipe:aws s3 cp s3://bucket/x-000000.tar -'"):
        resolve_urls("s3://bucket/x-{000000..000001}.tar")
    if shutil.which("ais") is None:  # gopen opens ais:// with the ais CLI: missing, one error at start-up
        with pytest.raises(DataError, match=r"'ais://bucket/x-000000.tar' is opened .* with ais, which is not installed"):
            resolve_urls("ais://bucket/x-{000000..000001}.tar")


def test_a_failing_pipe_command_is_one_log_line_naming_the_shard(tmp_path, caplog, capfd):
    urls, _ = id_shards(tmp_path / "d", SIZES)
    gone = tmp_path / "gone.tar"
    shards = [f"pipe:cat {u}" for u in urls[:3]] + [f"pipe:cat {gone}"]
    index = tmp_path / "pipes-index.json"
    index.write_text(json.dumps({"shardlist": [{"url": u, "nsamples": n} for u, n in zip(shards, SIZES)]}))
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        loader = build_loader(str(index), image_size=8, channels=1, micro_batch_size=1, num_workers=0,
                              seed=0, max_bad_fraction=1.0, index_commands=True)
        good = sum(SIZES[:3])
        got = [i for _ in range(good + 1) for i in ids(next(loader))]  # past the end of epoch 0
    assert sorted(got[:good]) == list(range(1, 1 + good))
    lines = [r.getMessage() for r in caplog.records if str(gone) in r.getMessage()]
    assert len(lines) == loader.stats()["failed_shards"] >= 1, lines  # one line per failed read
    assert "command exited with status 1: cat:" in lines[0] and "No such file" in lines[0]
    assert "No such file" not in capfd.readouterr().err  # the command's stderr is captured, not leaked


def test_a_stalled_command_or_server_times_out_at_start_up(tmp_path, server):
    root, base, httpd = server
    id_shards(root, SIZES, index=True)
    start = time.monotonic()
    with pytest.raises(DataError) as err:  # an index command that never writes
        resolve_urls("pipe:sleep 60 # index.json", stall_timeout_s=1.0)
    assert "no data for 1 s (data.stall_timeout_s)" in str(err.value) and "index.json" in str(err.value)
    # a shard to count at start-up whose server sends a part and then nothing
    data = read_shard(f"{base}/stall/part-000000.tar", stall_timeout_s=1.0)
    assert httpd.stalled.is_set() and "no data for 1 s" in data.problem
    with pytest.raises(DataError, match="cannot be read"):
        build_loader([f"{base}/stall/part-000000.tar", f"{base}/part-000001.tar"], image_size=8, channels=1,
                     micro_batch_size=1, num_workers=0, seed=0, stall_timeout_s=1.0)
    assert time.monotonic() - start < 20


def test_commands_in_a_fetched_index_are_refused_unless_allowed(tmp_path, server):
    root, base, _ = server
    urls, _ = id_shards(tmp_path / "d", SIZES)
    marker = tmp_path / "ran"
    index = {"shardlist": [{"url": f"pipe:touch {marker}; cat {u}", "nsamples": n}
                           for u, n in zip(urls, SIZES)]}
    (root / "evil-index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"lists 4 pipe: command.*data.index_commands=true"):
        build_loader(f"{base}/evil-index.json", image_size=8, channels=1, micro_batch_size=1,
                     num_workers=0, seed=0)
    assert not marker.exists()
    loader = build_loader(f"{base}/evil-index.json", image_size=8, channels=1, micro_batch_size=1,
                          num_workers=0, seed=0, index_commands=True)
    next(loader)
    assert marker.exists()


@pytest.mark.parametrize("bad", [-3, 2.5, "7", True, None])
def test_index_counts_must_be_non_negative_integers(tmp_path, bad):
    urls, _ = id_shards(tmp_path / "d", SIZES, index=True)
    index_file = tmp_path / "d" / "part-index.json"
    index = json.loads(index_file.read_text())
    index["shardlist"][1]["nsamples"] = bad
    index_file.write_text(json.dumps(index))
    for given in (str(index_file), str(tmp_path / "d")):  # named in data.urls, or found beside
        with pytest.raises(DataError) as err:
            build_loader(given, image_size=8, channels=1, micro_batch_size=1, num_workers=0, seed=0)
        message = str(err.value)
        assert "part-index.json" in message and f"nsamples={bad!r}" in message and "\n" not in message


def test_a_shard_truncated_under_a_running_reader_costs_a_counter(tmp_path):
    """Memory-mapped, this SIGBUSes: the reader has a batch from the shard, the file is cut, and the
    next batch touches pages past the new end. Read, it is the copy in memory that is decoded."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        from pathlib import Path
        from pipeline.data import build_loader
        from shardkit import id_shards
        urls, _ = id_shards(Path({str(tmp_path / 'd')!r}), [400, 400], index=True)
        loader = build_loader(urls, image_size=8, channels=1, micro_batch_size=2, num_workers=0,
                              seed=0, max_bad_fraction=1.0)
        next(loader)  # the first shard is open, most of its samples still to come
        for u in urls:
            os.truncate(u, 1024)
        for _ in range(800):
            next(loader)
        print("FAILED", loader.stats()["failed_shards"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    failed = int(done.stdout.split("FAILED")[1])
    assert failed >= 2  # the truncated shards count when they are read again


def _descendants(pid: int):
    psutil = pytest.importorskip("psutil")
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("kind, workers", [("pipe", 2), ("http", 0)])
def test_no_process_outlives_a_sigkilled_trainer_by_10_s(tmp_path, server, kind, workers):
    """Reads that are still running when the trainer dies (a command that keeps its output open, a
    server that stops sending): the workers, their guards, sh, sleep and curl are all gone 10 s later."""
    psutil = pytest.importorskip("psutil")
    root, base, httpd = server
    src = REPO / "data/demo"
    index = json.loads((src / "fashion-mnist-index.json").read_text())
    for entry in index["shardlist"]:
        (root / entry["url"]).write_bytes((src / entry["url"]).read_bytes())
        entry["url"] = (f"pipe:cat {src / entry['url']}; exec sleep 300" if kind == "pipe"
                        else f"{base}/stall/{entry['url']}")
    (tmp_path / "index.json").write_text(json.dumps(index))
    cmd = [sys.executable, "-m", "pipeline.cli.train", str(REPO / "configs/demo.yaml"), f"run_dir={tmp_path / 'run'}",
           f"data.urls={tmp_path / 'index.json'}", "data.index_commands=true", f"data.num_workers={workers}",
           "model.channels=8", "model.channel_mult=[1,2]", "model.attention_resolutions=[14]",
           "train.micro_batch_size=4", "log.sample_every_steps=0", "data.stall_timeout_s=600"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "no_proxy": "127.0.0.1"}
    trainer = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        want = "sleep" if kind == "pipe" else "curl"
        deadline = time.monotonic() + 120
        while not any(p.name() == want for p in _descendants(trainer.pid) if p.is_running()):
            assert trainer.poll() is None, trainer.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"no {want} under the trainer after 120 s"
            time.sleep(0.2)
        time.sleep(1.0)  # let every worker start its read
        tree = _descendants(trainer.pid)
        assert tree
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=30)
        time.sleep(10)
        alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [(p.pid, p.name(), p.cmdline()) for p in alive]
    finally:
        if trainer.poll() is None:
            trainer.kill()
        for p in _descendants(trainer.pid):
            p.kill()


def _train(run_dir, urls: str, *extra: str):
    """configs/demo.yaml shrunk (tests/tiny_run.py) on `urls`, trained in this process."""
    from conftest import _reset_accelerate
    from pipeline.config import load_config
    from pipeline.train.trainer import train
    from tiny_run import tiny_overrides

    _reset_accelerate()
    try:
        return train(load_config(REPO / "configs/demo.yaml",
                                 tiny_overrides(run_dir, 6) + [f"data.urls={urls}", *extra]))
    finally:
        _reset_accelerate()


@pytest.mark.slow
def test_http_and_pipe_shards_train_as_local_files_do(tmp_path, server):
    from tiny_run import assert_same_weights

    root, base, _ = server
    demo = REPO / "data/demo"
    for f in demo.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    _train(tmp_path / "local", str(demo))
    _train(tmp_path / "http", f"{base}/fashion-mnist-index.json")
    _train(tmp_path / "pipe", f"pipe:cat {demo}/fashion-mnist-{{000000..000004}}.tar")
    assert_same_weights(tmp_path / "local", tmp_path / "http")
    assert_same_weights(tmp_path / "local", tmp_path / "pipe")


@pytest.mark.slow
def test_a_server_stopped_mid_run_costs_a_counter_not_the_run(tmp_path, server, caplog):
    from test_train import scalars

    root, base, httpd = server
    demo = REPO / "data/demo"
    for f in demo.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    served = [f"{base}/fashion-mnist-00000{i}.tar" for i in (3, 4)]
    reads = []

    def stop():
        httpd.shutdown()
        httpd.server_close()  # the port closes: connections are refused from now on

    class Stopping(_Handler):  # the server goes away after its first shard read
        def do_GET(self):
            super().do_GET()
            reads.append(self.path)
            threading.Thread(target=stop, daemon=True).start()

    httpd.RequestHandlerClass = functools.partial(Stopping, directory=str(root))
    # counts from the demo index for all five shards; shards 3 and 4 from the server
    index = json.loads((demo / "fashion-mnist-index.json").read_text())
    for entry, url in zip(index["shardlist"][3:], served):
        entry["url"] = url
    (tmp_path / "mixed-index.json").write_text(json.dumps(index).replace(
        '"fashion-mnist-0', f'"{demo}/fashion-mnist-0'))
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        result = _train(tmp_path / "run", str(tmp_path / "mixed-index.json"), "data.num_workers=0",
                        "train.micro_batch_size=64", "train.max_steps=40", "data.max_bad_fraction=1.0",
                        "data.stall_timeout_s=10")
    assert result.step == 40 and len(reads) == 1
    failed = [r.getMessage() for r in caplog.records if "could not connect to the server" in r.getMessage()]
    assert failed and all(any(u in m for u in served) for m in failed)
    assert max(v for _, v in scalars(tmp_path / "run", "data/failed_shards")) >= 1
