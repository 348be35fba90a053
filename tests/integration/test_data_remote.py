"""Remote shards: http:// from a server on the loopback address, and pipe: commands, behave like
local files: every sample once, bad data counted, exact resume."""

import functools
import json
import logging
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.data import build_loader
from shardkit import id_shards, ids

SIZES = [6, 3, 8, 5]  # 22 samples


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean; requests are recorded instead
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def http_shards(tmp_path, monkeypatch):
    """Shards (and their index) served over http://127.0.0.1:<port>/ by a thread that stops at the
    end of the test, or after 120 s whatever happens. Yields (local dir, base url, request log)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    root = tmp_path / "www"
    id_shards(root, SIZES, index=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    deadline = threading.Timer(120, server.shutdown)
    deadline.daemon = True
    deadline.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", server.requests
    deadline.cancel()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def epoch(loader, n: int) -> list[int]:
    return [i for _ in range(n) for i in ids(next(loader))]


def test_http_shards_through_their_index_every_sample_once(http_shards):
    _, base, requests = http_shards
    loader = build_loader(f"{base}/part-index.json", image_size=8, channels=1, micro_batch_size=1,
                          num_workers=2, seed=0)
    assert requests == ["/part-index.json"]  # the index gave the counts: nothing downloaded yet
    got = epoch(loader, sum(SIZES))
    # two workers, 11 samples each: stream w's epoch is its first 11 samples
    firsts = got[0::2][:11] + got[1::2][:11]
    assert sorted(firsts) == list(range(1, 23))


def test_http_shards_without_index_are_counted_once_then_read(http_shards):
    root, base, requests = http_shards
    (root / "part-index.json").unlink()
    loader = build_loader(f"{base}/part-{{000000..000003}}.tar", image_size=8, channels=1,
                          micro_batch_size=2, num_workers=0, seed=1)
    assert sorted(epoch(loader, 11)) == list(range(1, 23))
    assert len(requests) == 8  # each shard: once to count at start-up, once to read


def test_http_bad_data_is_counted_and_resume_is_exact(http_shards, caplog):
    root, base, _ = http_shards
    data = (root / "part-000002.tar").read_bytes()
    (root / "part-000002.tar").write_bytes(data[: len(data) // 3])  # truncated download
    (root / "part-000001.tar").unlink()  # 404
    kwargs = dict(image_size=8, channels=1, micro_batch_size=2, num_workers=0, seed=2,
                  max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        loader = build_loader(f"{base}/part-index.json", **kwargs)
        first = epoch(loader, 3)
        state = json.loads(json.dumps(loader.state_dict()))
        rest = epoch(loader, 8)
    intact = set(range(1, 7)) | set(range(18, 23))  # shards 0 and 3
    seen = first + rest
    epoch0 = seen[: max(seen.index(i) for i in intact) + 1]
    assert len(epoch0) == len(set(epoch0))  # no sample twice in the epoch
    assert not set(epoch0) & set(range(7, 10))  # the 404 shard gave nothing
    assert 0 < len(set(epoch0) & set(range(10, 18))) < 8  # the truncated one its intact part
    stats = loader.stats()
    assert stats["failed_shards"] >= 2 and stats["skipped_samples"] >= 3
    assert "HTTPError" in caplog.text and "truncated tar" in caplog.text

    resumed = build_loader(f"{base}/part-index.json", **kwargs)
    resumed.load_state_dict(state)
    assert epoch(resumed, 8) == rest


def test_pipe_commands_read_like_files_and_failures_count(tmp_path, caplog):
    urls, total = id_shards(tmp_path / "d", SIZES, index=True)
    index = json.loads((tmp_path / "d" / "part-index.json").read_text())
    for entry in index["shardlist"]:
        entry["url"] = f"pipe:cat {tmp_path / 'd' / entry['url']}"
    index["shardlist"][3]["url"] = f"pipe:cat {tmp_path / 'gone.tar'}"  # fails: no such file
    (tmp_path / "pipes-index.json").write_text(json.dumps(index))
    kwargs = dict(image_size=8, channels=1, micro_batch_size=1, num_workers=0, seed=3,
                  max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        loader = build_loader(str(tmp_path / "pipes-index.json"), **kwargs)
        first = epoch(loader, 5)
        state = loader.state_dict()
        rest = epoch(loader, total - 5 - 5)  # the 5 samples of the failed shard never come
    assert sorted(first + rest) == list(range(1, total - 4))
    assert loader.stats()["failed_shards"] == 1 and loader.stats()["skipped_samples"] == 5
    assert "command exited with status 1" in caplog.text and "gone.tar" in caplog.text

    resumed = build_loader(str(tmp_path / "pipes-index.json"), **kwargs)
    resumed.load_state_dict(state)
    assert epoch(resumed, len(rest)) == rest
