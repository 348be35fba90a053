"""Distribution and resume of the data stream over ranks and workers, with real processes.

The rank processes here are real: each is its own Python process building its rank's loader with
its own DataLoader worker processes, as `accelerate launch` would start them.
"""

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import deal
from pipeline.data import DataError, build_loader
from shardkit import id_shards, ids, shares, stream_sequences

SIZES = [37, 5, 23, 1, 40, 12, 9, 17, 30, 2]  # uneven on purpose; 176 samples
TOTAL = sum(SIZES)
REPO = Path(__file__).resolve().parents[2]

RANK_SCRIPT = r"""
import json, sys
from pipeline.data import build_loader
a = json.loads(sys.argv[1])
loader = build_loader(a["urls"], image_size=8, channels=1, micro_batch_size=a["batch"],
                      num_workers=a["workers"], seed=a["seed"], rank=a["rank"],
                      world_size=a["world_size"])
if a.get("resume"):
    loader.load_state_dict([json.load(open(p)) for p in a["resume"]])
batches = []
for k in range(a["batches"]):
    b = next(loader)
    batches.append((b[:, 0, 0, 0].int() * 256 + b[:, 0, 0, 1].int()).tolist())
    if k + 1 == a.get("save_at"):
        json.dump(loader.state_dict(), open(a["state_out"], "w"))
json.dump({"batches": batches, "stats": loader.stats()}, open(a["out"], "w"))
"""


def run_ranks(tmp: Path, tag: str, world_size: int, workers: int, batches: int, urls, *,
              batch=4, seed=3, save_at=None, resume=None) -> list[dict]:
    """Start `world_size` rank processes at once; each pulls `batches` batches. Returns their
    outputs; fails (rather than hangs) if any of them takes longer than 120 s."""
    procs, outs = [], []
    for rank in range(world_size):
        out = tmp / f"{tag}-rank{rank}.json"
        args = dict(urls=urls, batch=batch, workers=workers, seed=seed, rank=rank,
                    world_size=world_size, batches=batches, out=str(out), save_at=save_at,
                    state_out=str(tmp / f"{tag}-state{rank}.json"), resume=resume)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, json.dumps(args)],
                                      env=env, stderr=subprocess.PIPE, text=True))
        outs.append(out)
    for p in procs:
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank process hung")
        assert p.returncode == 0, err
    return [json.loads(o.read_text()) for o in outs]


def epoch_slices(sequences: list[list[int]], lengths: list[int], epoch: int) -> list[int]:
    """The samples of `epoch` over all streams, each stream taking `lengths[s]` per epoch."""
    return [i for seq, n in zip(sequences, lengths) for i in seq[epoch * n:(epoch + 1) * n]]


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """2 ranks x 2 workers, 50 batches of 4 per rank (2.3 epochs), state saved after 13."""
    tmp = tmp_path_factory.mktemp("dist")
    urls, _ = id_shards(tmp / "d", SIZES)
    runs = run_ranks(tmp, "straight", 2, 2, 50, urls, save_at=13)
    return tmp, urls, runs


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(two_by_two):
    _, _, runs = two_by_two
    sequences = [seq for run in runs for seq in stream_sequences(run["batches"], 2)]
    per_stream = shares(TOTAL, 4)
    assert per_stream == [44] * 4  # each stream gets 11 batches per epoch, though shards are uneven
    epochs = [epoch_slices(sequences, per_stream, e) for e in (0, 1)]
    for seen in epochs:
        assert sorted(seen) == list(range(1, TOTAL + 1))
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert all(run["stats"]["skipped_samples"] == 0 for run in runs)


def test_resume_on_the_same_layout_gives_the_same_batches(two_by_two):
    tmp, urls, runs = two_by_two
    states = [str(tmp / f"straight-state{r}.json") for r in range(2)]
    resumed = run_ranks(tmp, "again", 2, 2, 50 - 13, urls, resume=states)
    for r in range(2):
        assert resumed[r]["batches"] == runs[r]["batches"][13:]


@pytest.mark.parametrize("world_size, workers", [(1, 3), (3, 1)])
def test_resume_on_another_layout_sees_the_rest_of_the_epoch_once(two_by_two, world_size, workers):
    tmp, urls, runs = two_by_two
    before = [i for run in runs for b in run["batches"][:13] for i in b]  # 2 x 13 batches of 4
    states = [str(tmp / f"straight-state{r}.json") for r in range(2)]
    after = run_ranks(tmp, f"to{world_size}x{workers}", world_size, workers, 21 * workers, urls,
                      resume=states)  # 84 samples per stream: the rest of epoch 0 and epoch 1
    sequences = [seq for run in after for seq in stream_sequences(run["batches"], workers)]
    streams = world_size * workers
    rest = shares(TOTAL - len(before), streams)  # the unread 72 samples, re-dealt
    epoch0 = before + [i for seq, n in zip(sequences, rest) for i in seq[:n]]
    assert sorted(epoch0) == list(range(1, TOTAL + 1))  # nothing repeated, nothing skipped
    epoch1 = [i for seq, n, m in zip(sequences, rest, shares(TOTAL, streams)) for i in seq[n:n + m]]
    assert sorted(epoch1) == list(range(1, TOTAL + 1))  # and the next epoch is whole


# ----------------------------------------------------------------------------- in one process

def test_shares_differ_by_at_most_one_and_cover_each_epoch(tmp_path):
    urls, total = id_shards(tmp_path / "d", [7, 1, 13, 4])  # 25 samples, 3 streams: 8, 8, 9
    loaders = [build_loader(urls, image_size=8, channels=1, micro_batch_size=1, num_workers=0,
                            seed=1, rank=r, world_size=3) for r in range(3)]
    sequences = [[ids(next(lo))[0] for _ in range(30)] for lo in loaders]
    lengths = shares(total, 3)
    assert lengths == [8, 8, 9]
    for epoch in (0, 1, 2):
        assert sorted(epoch_slices(sequences, lengths, epoch)) == list(range(1, total + 1))


def test_fewer_shards_than_streams_warns_and_does_not_hang(tmp_path, caplog):
    urls, total = id_shards(tmp_path / "d", [6])
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        loaders = [build_loader(urls, image_size=8, channels=1, micro_batch_size=1, num_workers=2,
                                seed=0, rank=r, world_size=2) for r in range(2)]
    assert "only 1 shards for 4 streams" in caplog.text
    sequences = [seq for lo in loaders for seq in stream_sequences([ids(next(lo)) for _ in range(8)], 2)]
    assert sorted(epoch_slices(sequences, shares(total, 4), 0)) == list(range(1, total + 1))


def test_fewer_samples_than_streams_is_a_startup_error(tmp_path):
    urls, _ = id_shards(tmp_path / "d", [2, 1])
    with pytest.raises(DataError, match="only 3 samples for 4 streams"):
        build_loader(urls, image_size=8, channels=1, micro_batch_size=1, num_workers=2, seed=0,
                     rank=0, world_size=2)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resumes_the_exact_next_batches(tmp_path, num_workers):
    urls, total = id_shards(tmp_path / "d", SIZES)
    kwargs = dict(image_size=8, channels=1, micro_batch_size=3, num_workers=num_workers, seed=7,
                  rank=1, world_size=2)
    straight = build_loader(urls, **kwargs)
    k, more = 7, total // 3  # enough to cross shard and epoch ends
    before = [next(straight) for _ in range(k)]
    state = json.loads(json.dumps(straight.state_dict()))  # plain data: fits any checkpoint
    after = [next(straight) for _ in range(more)]

    resumed = build_loader(urls, **kwargs)
    resumed.load_state_dict(state)
    again = [next(resumed) for _ in range(more)]
    assert [ids(b) for b in again] == [ids(b) for b in after]
    assert all(torch.equal(a, b) for a, b in zip(again, after))
    assert [ids(b) for b in before] != [ids(b) for b in after[:k]]

    # a fresh loader with no state starts from the beginning, and the global RNG is left alone
    torch.manual_seed(0)
    fresh = build_loader(urls, **kwargs)
    assert [ids(next(fresh)) for _ in range(k)] == [ids(b) for b in before]
    fresh.load_state_dict(fresh.state_dict())
    next(fresh)  # restarts the workers
    drawn = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(3))

    # one rank's state alone cannot re-deal another layout; other data cannot resume at all
    other = build_loader(urls, **{**kwargs, "num_workers": num_workers + 1})
    with pytest.raises(DataError, match="every saved rank"):
        other.load_state_dict(state)
    changed = build_loader(urls[:-1], **kwargs)
    with pytest.raises(DataError, match="keep data.urls"):
        changed.load_state_dict(state)


def test_resume_reads_no_shard_it_has_finished(tmp_path):
    """Shards whose samples were all consumed before the checkpoint are deleted: resuming, on the
    same layout or another, must not touch them for the rest of the epoch."""
    urls, total = id_shards(tmp_path / "d", SIZES)
    first = [build_loader(urls, image_size=8, channels=1, micro_batch_size=4, num_workers=0,
                          seed=2, rank=r, world_size=2) for r in range(2)]
    consumed = [i for lo in first for _ in range(7) for i in ids(next(lo))]
    states = [lo.state_dict() for lo in first]
    bounds = np.cumsum([0] + SIZES) + 1
    finished = [u for u, a, b in zip(urls, bounds[:-1], bounds[1:])
                if set(range(a, b)) <= set(consumed)]
    assert finished  # the test means something only if some shards were finished
    layouts = {world_size: [build_loader(urls, image_size=8, channels=1, micro_batch_size=4,
                                         num_workers=0, seed=2, rank=r, world_size=world_size)
                            for r in range(world_size)]
               for world_size in (2, 1)}  # same layout (exact), then another (re-deal)
    for u in finished:
        os.remove(u)
    for world_size, loaders in layouts.items():
        for r, lo in enumerate(loaders):
            lo.load_state_dict(states if world_size != 2 else states[r])
        rest = [i for lo, n in zip(loaders, shares(total - len(consumed), world_size))
                for i in [j for _ in range(n // 4) for j in ids(next(lo))]]
        assert sorted(consumed + rest) == list(range(1, total + 1))
        assert all(lo.stats()["failed_shards"] == 0 for lo in loaders)


# ----------------------------------------------------------------------------- the table

@pytest.mark.parametrize("seed", range(6))
def test_read_table_and_redeal_partition_every_epoch(seed):
    """Streams of one layout at random positions (some already an epoch further); the table of
    what they read plus the re-deal of the rest to another layout covers each epoch exactly once."""
    rng = np.random.default_rng(seed)
    total = int(rng.integers(20, 200))
    old, new = int(rng.integers(1, 7)), int(rng.integers(1, 7))
    base = {0: deal.normalize([(3, 9), (15, 17)])} if seed % 2 else {}  # a layout that was re-dealt
    streams = []
    for s in range(old):
        epoch = int(rng.integers(0, 2))
        plan = deal.stream_plan(s, old, total, base.get(epoch, []))
        streams.append({"stream": s, "epoch": epoch, "pos": int(rng.integers(0, deal.size(plan) + 1)),
                        "read": {e: v for e, v in base.items() if e >= epoch}})
    first, table = deal.read_table(streams, old, total)
    for epoch in range(first, 3):
        read = table.get(epoch, [])
        dealt = [deal.stream_plan(s, new, total, read) for s in range(new)]
        covered = Counter(p for ivs in [read, *dealt] for a, b in ivs for p in range(a, b))
        assert sorted(covered) == list(range(total)) and set(covered.values()) == {1}
        sizes = [deal.size(d) for d in dealt]
        assert max(sizes) - min(sizes) <= 1
    # and what the old streams read is exactly what the table says
    for epoch in range(first, 2):
        expected = Counter()
        for st in streams:
            plan = deal.stream_plan(st["stream"], old, total, base.get(epoch, []))
            if st["epoch"] == epoch:
                plan = deal.take(plan, 0, st["pos"])
            if st["epoch"] >= epoch:
                expected.update(p for a, b in plan for p in range(a, b))
        expected.update(p for a, b in base.get(epoch, []) for p in range(a, b))
        assert sorted(expected) == [p for a, b in table.get(epoch, []) for p in range(a, b)]


# ----------------------------------------------------------------------------- through the loop

def test_training_resumed_with_more_workers_continues_the_epoch(tmp_path, fresh_accelerate, caplog):
    """2 steps with 1 worker, then on to 4 with 2: the checkpoint's position says exactly the
    4 x 4 samples of the training so far were read, none twice (a fresh start would say 8)."""
    from pipeline.ckpt.checkpointer import read_object
    from pipeline.config import load_config
    from pipeline.data.loader import _stream_states
    from pipeline.train.trainer import train

    def cfg(workers, steps):
        return load_config(REPO / "configs/demo.yaml", [
            f"run_dir={tmp_path / 'run'}", f"data.urls={REPO / 'data/demo'}",
            f"data.num_workers={workers}", "model.channels=8", "model.channel_mult=[1,2]",
            "model.attention_resolutions=[]", "train.micro_batch_size=4",
            f"train.max_steps={steps}", "ckpt.every_steps=2", "log.every_steps=2",
            "log.sample_every_steps=0"])
    train(cfg(1, 2))
    fresh_accelerate()
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        train(cfg(2, 4))
    assert "re-dealt from 1 ranks x 1 workers to 1 x 2" in caplog.text
    state = read_object(tmp_path / "run/checkpoints/step-00000004", "rank-00000.pt")["data"]
    assert state["num_workers"] == 2
    streams = [{**s, "read": {int(e): v for e, v in s["read"].items()}}
               for s in _stream_states(state["loader"])]
    epoch, table = deal.read_table(streams, 2, 2250)
    assert epoch == 0 and deal.size(table[0]) == 4 * 4
