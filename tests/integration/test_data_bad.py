"""Bad data costs a counter, not the run: each kind of damage crafted here, read by the real
loader; too much of it stops the run with a one-line error, end to end through the CLI."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DataError, build_loader
from shardkit import encode, id_image, id_shards, ids, write_shard

REPO = Path(__file__).resolve().parents[2]
GOOD = [5, 5, 5, 5]  # ids 1..20; the damaged shard holds ids 21..25


def read_until_all_good(loader, good: set[int], limit=200) -> list[int]:
    """Batches of one sample until every good id was seen; returns the ids in order."""
    seen: list[int] = []
    while not good <= set(seen):
        seen += ids(next(loader))
        assert len(seen) < limit, "the good samples never all arrived"
    return seen


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    d = tmp_path / "d"
    urls, total = id_shards(d, [3, 4])
    jpeg = encode(np.zeros((8, 8, 3), dtype=np.uint8), fmt="JPEG")
    urls.append(write_shard(d / "bad-samples.tar", [
        ("ok", {"png": id_image(total + 1)}),
        ("corrupt", {"jpg": jpeg[: len(jpeg) // 2] + b"\x00" * 7}),
        ("garbage", {"png": b"not an image at all"}),
        ("noimage", {"cls": b"3", "json": b"{}"}),
    ]))
    loader = build_loader(urls, image_size=8, channels=1, micro_batch_size=1, num_workers=0,
                          seed=0, max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        seen = [ids(next(loader))[0] for _ in range(total + 1)]  # one epoch: 8 good samples
    assert sorted(seen) == list(range(1, total + 2))
    stats = loader.stats()
    assert stats["skipped_samples"] == 3 and stats["failed_shards"] == 0
    assert stats["bad_fraction"] == pytest.approx(3 / 11)
    for key, why in (("corrupt", "cannot decode .jpg"), ("garbage", "cannot decode .png"),
                     ("noimage", "no image member (has cls, json)")):
        line = next(r.getMessage() for r in caplog.records if repr(key) in r.getMessage())
        assert "bad-samples.tar" in line and why in line


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 10 + 100])  # inside the third of five samples


def _not_a_tar(path: Path) -> None:
    path.write_bytes(b"hello world, no tar here " * 100)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _empty_tar(path: Path) -> None:
    write_shard(path, [])


def _vanished(path: Path) -> None:
    path.unlink()


def _a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _no_permission(path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    path.chmod(0)


# (damage, applied before start-up (True) or while running, with an index JSON, what the log says,
#  samples of the damaged shard still readable)
CASES = {
    "truncated, counted by scan": (_truncated, True, False, "truncated tar", None),
    "truncated, counted by index": (_truncated, True, True, "truncated tar", None),
    "not a tar, counted by scan": (_not_a_tar, True, False, "not a tar file", 0),
    "not a tar, counted by index": (_not_a_tar, True, True, "not a tar file", 0),
    "empty file, counted by scan": (_empty, True, False, "empty file", 0),
    "empty tar, counted by scan": (_empty_tar, True, False, "holds no samples", 0),
    "empty file, counted by index": (_empty, True, True, "empty file", 0),
    "vanished while running": (_vanished, False, True, "FileNotFoundError", 0),
    "became a directory while running": (_a_directory, False, False, "IsADirectoryError", 0),
    "no read permission": (_no_permission, True, True, "PermissionError", 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_shards_are_skipped_counted_and_logged(tmp_path, caplog, case):
    damage, before_start, index, says, readable = CASES[case]
    urls, _ = id_shards(tmp_path / "d", GOOD + [5], index=index)
    bad = Path(urls[-1])
    if before_start:
        damage(bad)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        loader = build_loader(str(tmp_path / "d"), image_size=8, channels=1, micro_batch_size=1,
                              num_workers=0, seed=0, max_bad_fraction=1.0)
        if not before_start:
            damage(bad)
        seen = read_until_all_good(loader, set(range(1, 21)))
    assert len(seen) == len(set(seen)), "a sample came twice in one epoch"
    kept = [i for i in seen if i > 20]
    if readable is None:  # truncated: the intact samples before the cut are used
        assert 0 < len(kept) < 5
    else:
        assert len(kept) == readable
    stats = loader.stats()
    assert stats["failed_shards"] >= 1
    # the samples the deal promised but the shard did not give are counted as skipped
    promised = 5 if index or not before_start else (len(kept) if readable is None else 0)
    assert stats["skipped_samples"] == promised - len(kept)
    lines = [r.getMessage() for r in caplog.records if bad.name in r.getMessage()]
    assert any(says in line for line in lines), lines


def test_too_much_bad_data_stops_with_the_worst_shards_named(tmp_path):
    d = tmp_path / "d"
    urls, total = id_shards(d, [10] * 8)  # 80 good samples
    rotten = write_shard(d / "rotten.tar", [(f"r{i}", {"png": b"garbage"}) for i in range(8)])
    urls.append(rotten)
    urls.append(write_shard(d / "slightly.tar", [("s0", {"png": b"junk"}),
                                                 ("s1", {"png": id_image(999)})]))
    for workers in (0, 1):
        loader = build_loader(urls, image_size=8, channels=1, micro_batch_size=2,
                              num_workers=workers, seed=4, max_bad_fraction=0.05)
        with pytest.raises(DataError) as e:
            for _ in range(100):
                next(loader)
        message = str(e.value)
        assert message.startswith("too much bad data") and "\n" not in message
        assert "rotten.tar" in message and "data.max_bad_fraction=0.05" in message
        with pytest.raises(DataError, match="too much bad data"):
            next(loader)  # stays failed

    # the same data under a higher limit runs on, two epochs and more
    loader = build_loader(urls, image_size=8, channels=1, micro_batch_size=2, num_workers=0,
                          seed=4, max_bad_fraction=0.2)
    for _ in range(90):
        next(loader)
    assert loader.stats()["skipped_samples"] >= 18


def test_unreadable_shards_at_startup_beyond_the_limit_are_an_error(tmp_path):
    urls, _ = id_shards(tmp_path / "d", [5, 5, 5, 5])
    for u in urls[:2]:
        _not_a_tar(Path(u))
    with pytest.raises(DataError) as e:
        build_loader(urls, image_size=8, channels=1, micro_batch_size=1, num_workers=0, seed=0)
    assert "2 of 4 shards cannot be read" in str(e.value) and "part-000000.tar" in str(e.value)
    for u in urls[2:]:
        _not_a_tar(Path(u))
    with pytest.raises(DataError, match="none of the 4 shards holds a readable sample"):
        build_loader(urls, image_size=8, channels=1, micro_batch_size=1, num_workers=0, seed=0,
                     max_bad_fraction=1.0)


def test_an_epoch_without_samples_is_an_error_not_a_hang(tmp_path):
    url = write_shard(tmp_path / "x.tar", [(f"k{i}", {"png": b"junk"}) for i in range(3)])
    for workers in (0, 1):
        loader = build_loader(url, image_size=8, channels=1, micro_batch_size=1,
                              num_workers=workers, seed=0, max_bad_fraction=1.0)
        with pytest.raises(DataError) as e:
            next(loader)
        message = str(e.value)
        assert "x.tar" in message and "no readable sample" in message
        assert "\n" not in message and "Traceback" not in message


# ----------------------------------------------------------------------------- end to end

def ddpm_train(run_dir: Path, urls: str, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pipeline.train", str(REPO / "configs/demo.yaml"),
            f"run_dir={run_dir}", f"data.urls={urls}", "data.image_size=8", "data.channels=1",
            "data.num_workers=1", "model.channels=8", "model.channel_mult=[1,2]",
            "model.attention_resolutions=[]", "train.micro_batch_size=4", "train.max_steps=30",
            "log.every_steps=5", "log.sample_every_steps=0", "ckpt.every_steps=1000", *overrides]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli_stops_with_one_line_when_too_much_data_is_bad(tmp_path):
    d = tmp_path / "d"
    id_shards(d, [10, 10])
    write_shard(d / "part-000002.tar", [(f"r{i}", {"png": b"garbage"}) for i in range(10)])
    done = ddpm_train(tmp_path / "run", str(d))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ddpm-train: error: too much bad data") and "part-000002.tar" in last
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").glob("step-*"))


def test_cli_refuses_missing_shards_before_building_anything(tmp_path):
    done = ddpm_train(tmp_path / "run", str(tmp_path / "nowhere" / "x-{000000..000003}.tar"))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"ddpm-train: error: data.urls: shard "
                                   f"'{tmp_path}/nowhere/x-000000.tar' (from "
                                   f"'{tmp_path}/nowhere/x-{{000000..000003}}.tar') does not exist")
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_counters_reach_tensorboard(tmp_path, fresh_accelerate):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.config import load_config
    from pipeline.train.trainer import train

    d = tmp_path / "d"
    id_shards(d, [12, 12])
    write_shard(d / "part-000002.tar", [(f"r{i}", {"png": b"garbage"}) for i in range(3)])
    (d / "part-000003.tar").write_bytes(b"not a tar at all" * 64)  # left out at start-up
    cfg = load_config(REPO / "configs/demo.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.urls={d}", "data.image_size=8", "data.channels=1",
        "data.num_workers=0", "data.max_bad_fraction=0.5", "model.channels=8",
        "model.channel_mult=[1,2]", "model.attention_resolutions=[]", "train.micro_batch_size=8",
        "train.max_steps=4", "log.every_steps=4", "log.sample_every_steps=0",
        "ckpt.every_steps=1000"])
    train(cfg)  # 4 x 8 samples: a whole epoch of the 27 and more
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in ("data/skipped_samples", "data/failed_shards")}
    assert last == {"data/skipped_samples": 3, "data/failed_shards": 1}


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_max_bad_fraction_outside_0_1_is_a_config_error(value):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.max_bad_fraction: must be in"):
        load_config(REPO / "configs/demo.yaml", [f"data.max_bad_fraction={value}"])
