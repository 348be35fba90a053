"""The training data stream: tar shards -> (rank, worker) streams -> decode -> uint8 batches.

Order (`pipeline.data.deal`): every epoch is a fresh seeded permutation of the shards and of each
shard's samples; each of the ``world_size * num_workers`` streams reads an equal share of the
epoch's samples (shards are cut between streams where needed), so every sample reaches exactly
one stream per epoch and the streams stay in step. Streams are endless and batch inside the
worker (a batch may straddle an epoch end): no rank ever waits for another at an epoch end.
The deal needs each shard's sample count (`pipeline.data.urls`: from an index JSON, or one scan
of the tar headers at start-up). Shards are read by `pipeline.data.tario`, as WebDataset reads them.

Position: each stream's state (`ShardStream.state_dict`) is its epoch and the number of positions
of its share it has passed; `StatefulDataLoader` snapshots it in each worker as each batch is
handed out. Loaded into a loader with the same world size and workers it continues with exactly
the next batch; with another world size or worker count, every saved rank's state is merged into
a world-size-independent table (epoch -> positions read) and the unread rest of the epoch is
re-dealt to the new streams. Resuming re-reads at most the unfinished shards and decodes nothing
it skips.

Bad data costs a counter, not the run: a sample whose image is missing or undecodable is skipped,
a shard that cannot be read (missing, truncated, not a tar, empty, download failed) is skipped from
the point of damage on. Each is logged on ``pipeline.data`` naming shard and reason; counters
(`BatchLoader.stats`): ``skipped_samples`` (dealt samples not trained on, including those of failed
shards), ``failed_shards`` (failed shard reads, so a bad shard counts again each epoch it is
read, plus shards left out at start-up because they hold no sample). When more than
``max_bad_fraction`` of the samples dealt to a rank were skipped, the rank stops with a `DataError`
naming the worst shards (the denominator is at least the rank's share of one epoch, so a bad shard
early on is judged against the whole epoch).
"""

from __future__ import annotations

import logging
import re
import traceback
import warnings
import zlib
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data import deal
from pipeline.data.urls import load_shard_counts
from pipeline.errors import DataError
from pipeline.data.decode import decode_image
from pipeline.data.tario import read_shard

log = logging.getLogger("pipeline.data")

_STATE_KIND = "pipeline.data.ShardStream/v2"
_LOADER_VERSION = 2
_COUNTERS = ("dealt", "skipped_samples", "failed_shards")
_WORST_KEPT = 16  # per stream, the shards with the most skipped samples, for the error message
_LOGGED_PER_SHARD = 3  # bad samples logged one by one per shard read; the rest in one summary
_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-f]+>")


# ----------------------------------------------------------------------------- the stream

class ShardStream(IterableDataset):
    """The endless stream of uint8 batches (B, C, H, W) of one (rank, worker); implements
    `state_dict`/`load_state_dict`, which `StatefulDataLoader` calls inside the worker."""

    def __init__(self, urls: list[str], counts: np.ndarray, *, image_size: int, channels: int,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.urls, self.counts = list(urls), np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_states: dict[int, dict] = {}  # stream -> where it starts when nothing is loaded
        self._state: dict[str, Any] | None = None

    def fresh_state(self, stream: int, num_streams: int, epoch: int = 0,
                    read: dict | None = None) -> dict[str, Any]:
        return {"__kind__": _STATE_KIND, "stream": stream, "num_streams": num_streams,
                "epoch": epoch, "pos": 0, "epoch_good": 0, "read": read or {},
                "bad_shards": {}, **dict.fromkeys(_COUNTERS, 0)}

    def _current(self) -> dict[str, Any]:
        stream, num_streams = self._stream()
        if self._state is None:
            start = self.start_states.get(stream)
            self._state = _copy(start) if start else self.fresh_state(stream, num_streams)
        if (self._state["stream"], self._state["num_streams"]) != (stream, num_streams):
            raise DataError(f"data position of stream {self._state['stream']} of "
                            f"{self._state['num_streams']} loaded into stream {stream} of {num_streams}")
        return self._state

    def _stream(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * num_workers + worker, self.world_size * num_workers

    def state_dict(self) -> dict[str, Any]:
        return _copy(self._current())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("__kind__") != _STATE_KIND:
            raise DataError(f"not a data position saved by this version ({state.get('__kind__')!r})")
        self._state = _copy(state)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._batches(self._current())

    def plan(self, epoch: int, stream: int, num_streams: int,
             read: deal.Intervals = ()) -> list[tuple[int, int, int]]:
        """The share of `stream` in `epoch` as (shard, first position, end position) pieces."""
        share = deal.stream_plan(stream, num_streams, self.total, read)
        return list(deal.segments(share, deal.shard_order(self.seed, epoch, len(self.urls)),
                                  self.counts))

    def _batches(self, st: dict[str, Any]) -> Iterator[torch.Tensor]:
        size, channels = self.image_size, self.channels
        out = np.empty((self.batch_size, size, size, channels), dtype=np.uint8)  # (B, H, W, C)
        n = 0
        while True:
            epoch = st["epoch"]
            pieces = self.plan(epoch, st["stream"], st["num_streams"], st["read"].get(str(epoch), ()))
            passed = 0
            for shard, first, end in pieces:
                passed += end - first
                if passed <= st["pos"]:
                    continue
                first = max(first, end - (passed - st["pos"]))  # resuming inside: skip, no decode
                url = self.urls[shard]
                data = read_shard(url)
                samples = data.samples
                lost_why = None
                if data.problem or len(samples) < self.counts[shard]:
                    lost_why = self._shard_failed(st, shard, data, first, end, epoch)
                elif len(samples) > self.counts[shard]:
                    log.warning("shard %r holds %d samples, its count says %d: the extra ones are "
                                "not used (is its index JSON stale?)", url, len(samples),
                                self.counts[shard])
                bad = 0
                for index in deal.sample_order(self.seed, epoch, shard,
                                               int(self.counts[shard]))[first:end].tolist():
                    st["pos"] += 1
                    st["dealt"] += 1
                    if index >= len(samples):  # lost with the shard's damaged part (logged)
                        self._skipped(st, shard, 1, lost_why)
                        continue
                    key, ext, offset, length, fields = samples[index]
                    if ext is None:
                        why = f"no image member (has {', '.join(fields)})"
                    else:
                        try:
                            out[n] = decode_image(data.data[offset:offset + length], ext, size,
                                                  channels)
                        except Exception as e:  # any decoder failure costs a counter, not the run
                            said = _OBJECT_REPR.sub("", str(e))  # PIL names its BytesIO: noise
                            why = f"cannot decode .{ext} ({type(e).__name__}: {said})"
                        else:
                            n += 1
                            st["epoch_good"] += 1
                            if n == self.batch_size:
                                # (B, C, H, W) in channels-last memory order: no copy here,
                                # and the layout convolutions on a GPU prefer
                                yield torch.from_numpy(out).permute(0, 3, 1, 2)
                                out = np.empty_like(out)
                                n = 0
                            continue
                    bad += 1
                    self._skipped(st, shard, 1, why)
                    if bad <= _LOGGED_PER_SHARD:
                        log.warning("shard %r, sample %r: %s; skipped (%d samples skipped so far)",
                                    url, key, why, st["skipped_samples"])
                if bad > _LOGGED_PER_SHARD:
                    log.warning("shard %r: %d more samples skipped in this read (%d so far)", url,
                                bad - _LOGGED_PER_SHARD, st["skipped_samples"])
                data.close()
            if pieces and st["epoch_good"] == 0:
                names = ", ".join(repr(self.urls[s]) for s, _, _ in pieces[:3])
                more = f" and {len(pieces) - 3} more" if len(pieces) > 3 else ""
                raise DataError(f"epoch {epoch}: no readable sample in shards {names}{more} "
                                f"(stream {st['stream']} of {st['num_streams']}; see the log for why)")
            st["epoch"], st["pos"], st["epoch_good"] = epoch + 1, 0, 0
            st["read"] = {e: v for e, v in st["read"].items() if int(e) > epoch}

    def _skipped(self, st: dict, shard: int, n: int, why: str) -> None:
        st["skipped_samples"] += n
        worst = st["bad_shards"]
        key = str(shard)
        if key not in worst and len(worst) >= _WORST_KEPT:
            del worst[min(worst, key=lambda k: worst[k][0])]
        worst[key] = [worst.get(key, [0])[0] + n, why]

    def _shard_failed(self, st: dict, shard: int, data, first: int, end: int, epoch: int) -> str:
        """Count and log a shard read that fell short; returns why, for its lost samples (each
        counted as skipped when its position is passed, so a resume does not count it twice)."""
        have, expected = len(data.samples), int(self.counts[shard])
        order = deal.sample_order(self.seed, epoch, shard, expected)[first:end]
        why = data.problem or f"holds {have} samples, its count says {expected}"
        st["failed_shards"] += 1
        log.warning("shard %r: %s; %d of its %d samples readable, %d dealt here lost "
                    "(%d shard reads failed so far)", data.url, why, have, expected,
                    int((order >= have).sum()), st["failed_shards"])
        return why


# ----------------------------------------------------------------------------- the loader

class BatchLoader:
    """Endless iterator of uint8 CPU batches (micro_batch_size, channels, H, W) for one rank.

    `state_dict()` is plain data (ints, strings, lists, dicts) holding every worker's position.
    `load_state_dict(state)` before the next `next()`: this rank's own saved state (same world
    size and workers: the following batches are exactly those the saved run would have got), or
    the list of every saved rank's state (any world size and workers; see the module docstring).
    `stats()` -> counters summed over this rank's workers as of the last batch handed out.
    """

    def __init__(self, dataset: ShardStream, *, num_workers: int, pin_memory: bool,
                 max_bad_fraction: float, failed_at_start: int = 0):
        self.dataset = dataset
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.max_bad_fraction, self.failed_at_start = max_bad_fraction, failed_at_start
        self._layout = {"rank": dataset.rank, "world_size": dataset.world_size,
                        "num_workers": num_workers}
        self._data_id = {"seed": dataset.seed, "num_shards": len(dataset.urls),
                         "total_samples": dataset.total,
                         "counts_crc32": zlib.crc32(dataset.counts.tobytes())}
        self._start = {"epoch": 0, "read": {}}  # where this layout started (for idle workers)
        self._rank_share = dataset.total / dataset.world_size  # samples per epoch for this rank
        self._loader = self._make_loader()
        self._it = None
        self._error: str | None = None  # set once the stream has failed for good

    def _make_loader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        # The loader draws its workers' base seed from `generator`: a private one, so that
        # starting (or restarting) the workers never shifts the global torch RNG.
        seed = np.random.SeedSequence((self.dataset.seed, self.dataset.rank)).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch API deprecated in 2.13
            warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated")
            return StatefulDataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, generator=generator)

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> torch.Tensor:
        if self._error is not None:
            raise DataError(self._error)
        if self._it is None:
            self._it = iter(self._loader)
        try:
            batch = next(self._it)
            message = self._too_much_bad_data()
        except DataError as e:  # from a worker: keep the one-line message, drop the traceback
            message = str(e).rsplit("DataError: ", 1)[-1].strip()
            # torch's re-raise leaves a reference cycle through these frames; left to the
            # garbage collector, the workers' shutdown waits out a 5 s join timeout
            traceback.clear_frames(e.__traceback__)
        if message is None:
            return batch
        # The stream cannot go on: stop the workers now (dropping the loader's iterator does).
        self._error = message
        self._it = None
        self._loader.load_state_dict({})
        raise DataError(message)

    def _too_much_bad_data(self) -> str | None:
        states = list(_stream_states(self._loader.state_dict()))
        skipped = sum(s["skipped_samples"] for s in states)
        judged = max(sum(s["dealt"] for s in states), self._rank_share)
        if skipped <= self.max_bad_fraction * judged:
            return None
        worst: dict[str, list] = {}
        for s in states:
            for shard, (n, why) in s["bad_shards"].items():
                worst[shard] = [worst.get(shard, [0])[0] + n, why]
        top = sorted(worst.items(), key=lambda kv: -kv[1][0])[:3]
        names = "; ".join(f"{self.dataset.urls[int(k)]!r}: {n} ({why})" for k, (n, why) in top)
        return (f"too much bad data: {skipped} of the {int(judged)} samples dealt to rank "
                f"{self.dataset.rank} were skipped ({skipped / judged:.1%} > data.max_bad_fraction="
                f"{self.max_bad_fraction}); worst shards: {names}")

    def state_dict(self) -> dict[str, Any]:
        return {"version": _LOADER_VERSION, **self._layout, **self._data_id, "start": self._start,
                "loader": self._loader.state_dict()}

    def resumes_exactly(self, state: dict[str, Any]) -> bool:
        """Whether `state` (one rank's) was saved by this rank of the same layout."""
        return all(state.get(k) == v for k, v in self._layout.items())

    def resume(self, mine: dict[str, Any] | None, every_rank: Callable[[], list[dict[str, Any]]]) -> bool:
        """Continue from a checkpoint: from this rank's own state when the same layout saved it
        (exactly the next batch), else from every saved rank's state, the epoch's unread samples
        re-dealt to this layout. Returns whether the resume is exact."""
        exact = mine is not None and self.resumes_exactly(mine)
        self.load_state_dict(mine if exact else every_rank())
        return exact

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        states = state if isinstance(state, list) else [state]
        for s in states:
            if s.get("version") != _LOADER_VERSION:
                raise DataError(f"cannot resume the data position: unknown loader state version "
                                f"{s.get('version')!r} (saved by another version of pipeline.data)")
            saved = {k: s.get(k) for k in self._data_id}
            if saved != self._data_id:
                raise DataError(f"cannot resume the data position: it was saved for {saved}, the "
                                f"shards now give {self._data_id} (keep data.urls and train.seed, "
                                f"or start a new run_dir)")
        own = [s for s in states if self.resumes_exactly(s)]
        if not own and not isinstance(state, list):
            raise DataError(f"cannot resume the data position: it was saved with "
                            f"{ {k: state.get(k) for k in self._layout} }, this loader has "
                            f"{self._layout}; pass every saved rank's state to re-deal the epoch")
        start, start_states = (own[0]["start"], {}) if own else self._redeal(states)
        self._it = self._error = None
        self._start = start
        self.dataset.start_states, self.dataset._state = start_states, None
        self._loader = self._make_loader()
        if own:
            self._loader.load_state_dict(own[0]["loader"])

    def _redeal(self, states: list[dict[str, Any]]) -> tuple[dict, dict[int, dict]]:
        """Continue from another layout: merge all its streams' positions into one table and
        deal the unread rest of each epoch to this rank's streams. Returns the new layout's start
        and this rank's stream states."""
        world_size, num_workers = states[0]["world_size"], max(1, states[0]["num_workers"])
        if sorted(s["rank"] for s in states) != list(range(world_size)) or any(
                (s["world_size"], max(1, s["num_workers"])) != (world_size, num_workers) for s in states):
            raise DataError(f"cannot resume the data position: need the states of all "
                            f"{world_size} saved ranks, got ranks {sorted(s['rank'] for s in states)}")
        streams: dict[int, dict] = {}
        for s in states:
            start = s["start"]
            for i in range(s["rank"] * num_workers, (s["rank"] + 1) * num_workers):
                # a worker that never handed out a batch is still where the layout started
                streams[i] = {"stream": i, "epoch": start["epoch"], "pos": 0, "read": start["read"],
                              **dict.fromkeys(_COUNTERS, 0), "bad_shards": {}}
            for st in _stream_states(s["loader"]):
                streams[st["stream"]] = st
        as_ints = [{**st, "read": {int(e): v for e, v in st["read"].items()}}
                   for st in streams.values()]
        num_streams = world_size * num_workers
        epoch, table = deal.read_table(as_ints, num_streams, self.dataset.total)
        read = {str(e): [list(iv) for iv in ivs] for e, ivs in table.items()}
        # Counters carry over: this rank takes those of the saved ranks r with r % world size == rank.
        mine = [st for st in streams.values()
                if st["stream"] // num_workers % self.dataset.world_size == self.dataset.rank]
        carried = {c: sum(st[c] for st in mine) for c in _COUNTERS}
        worst: dict[str, list] = {}
        for st in mine:
            for k, (n, why) in st["bad_shards"].items():
                worst[k] = [worst.get(k, [0])[0] + n, why]
        worst = dict(sorted(worst.items(), key=lambda kv: -kv[1][0])[:_WORST_KEPT])
        workers = max(1, self.num_workers)
        new_states = {}
        for w in range(workers):
            stream = self.dataset.rank * workers + w
            new_states[stream] = self.dataset.fresh_state(stream, self.dataset.world_size * workers,
                                                          epoch, read)
            if w == 0:
                new_states[stream].update(carried, bad_shards=worst)
        left = self.dataset.total - deal.size(table.get(epoch, []))
        log.info("data position re-dealt from %d ranks x %d workers to %d x %d: epoch %d goes on "
                 "with its %d unread samples", world_size, num_workers, self.dataset.world_size,
                 workers, epoch, left)
        return {"epoch": epoch, "read": read}, new_states

    def stats(self) -> dict[str, float]:
        """``skipped_samples``, ``failed_shards``, ``bad_fraction`` (as judged against
        max_bad_fraction) and ``epoch`` (fractional, of this rank's slowest worker)."""
        states = list(_stream_states(self._loader.state_dict()))
        skipped = sum(s["skipped_samples"] for s in states)
        share = max(1.0, self.dataset.total / max(1, states[0]["num_streams"])) if states else 1.0
        return {"skipped_samples": skipped,
                "failed_shards": self.failed_at_start + sum(s["failed_shards"] for s in states),
                "bad_fraction": skipped / max(sum(s["dealt"] for s in states), self._rank_share, 1),
                "epoch": min((s["epoch"] + s["pos"] / share for s in states), default=0.0)}

    def close(self) -> None:
        """Stop the workers; a later `next()` starts new ones at the current position."""
        if self._it is not None:
            self.load_state_dict(self.state_dict())


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    """A stream state that shares no mutable part with `state`."""
    return {**state, "read": dict(state["read"]), "bad_shards": dict(state["bad_shards"])}


def _stream_states(obj: Any) -> Iterator[dict]:
    """Every ShardStream state nested in a StatefulDataLoader state."""
    if isinstance(obj, dict):
        if obj.get("__kind__") == _STATE_KIND:
            yield obj
            return
        for v in obj.values():
            yield from _stream_states(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _stream_states(v)


def build_loader(urls, *, image_size: int, channels: int, micro_batch_size: int,
                 num_workers: int, seed: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False, max_bad_fraction: float = 0.05) -> BatchLoader:
    """The endless, resumable batch stream of one rank (see the module docstring). `urls`: as
    for `resolve_urls`. Raises `DataError` at once for missing shards, for more than
    `max_bad_fraction` of the shards unreadable, or for fewer samples than streams."""
    checks = [(image_size >= 1, f"image_size must be >= 1, got {image_size}"),
              (channels in (1, 3), f"channels must be 1 or 3, got {channels}"),
              (micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {micro_batch_size}"),
              (num_workers >= 0, f"num_workers must be >= 0, got {num_workers}"),
              (seed >= 0, f"seed must be >= 0, got {seed}"),
              (0 <= rank < world_size, f"rank {rank} is outside world size {world_size}"),
              (0 <= max_bad_fraction <= 1, f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")]
    for ok, message in checks:
        if not ok:
            raise DataError(message)
    urls, counts, left_out = load_shard_counts(urls, max_bad_fraction)
    streams = world_size * max(1, num_workers)
    if counts.sum() < streams:
        raise DataError(f"only {counts.sum()} samples for {streams} streams (world size "
                        f"{world_size} x {max(1, num_workers)} workers): use fewer workers")
    usable = int((counts > 0).sum())
    if usable < streams:
        log.warning("only %d shards for %d streams (world size %d x %d workers): streams share "
                    "shards, each reading a whole shard to use a part; make more, smaller shards",
                    usable, streams, world_size, max(1, num_workers))
    dataset = ShardStream(urls, counts, image_size=image_size, channels=channels,
                          batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size)
    return BatchLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                       max_bad_fraction=max_bad_fraction, failed_at_start=left_out)


def to_model_input(batch_uint8: torch.Tensor, device, *, random_flip: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1] on `device`, each sample flipped left-right with
    probability 1/2 (drawn from `generator`, which must live on `device`)."""
    x = batch_uint8.to(device, non_blocking=True).to(torch.float32).div_(127.5).sub_(1.0)
    if random_flip:
        flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5  # (B,)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()
