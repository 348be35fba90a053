"""The training data stream: tar shards -> (rank, worker) split -> decode -> uint8 batches.

Order (all of it derived from (seed, epoch, shard), never from wall clock or a global RNG):

- Epoch ``e`` visits the shards in the order ``default_rng((seed, e)).permutation(n_shards)``.
- There are ``S = world_size * num_workers`` streams; stream ``s = rank * num_workers + worker``
  reads ``order[s::S]``. With fewer shards than streams, the streams sharing a shard each take
  every k-th sample of it, so an epoch still sees every sample exactly once.
- A shard is read whole into memory (raw bytes; shards are small) and its samples are visited in
  the order ``default_rng((seed, e, shard)).permutation(n_samples)``; images are decoded as visited.
- Each stream runs through epochs forever and batches inside the worker (a batch may straddle an
  epoch end), so no rank waits for another; the training loop counts steps.

Position, per stream (`ShardStream.state_dict`): ``epoch``, ``shard_pos`` (index into the epoch's
shard list of this stream), ``sample_pos`` (samples of that shard consumed, skipped ones included),
plus counters. ``StatefulDataLoader`` snapshots it in each worker as each batch is handed out, so
`BatchLoader.state_dict()` after k batches, loaded into a fresh loader with the same world size
and workers, continues with batch k+1 exactly; resuming re-reads at most one shard per stream and
decodes nothing it skips.

Bad data: a sample without an image or with an undecodable one is skipped (counter
``skipped_samples``); a shard that cannot be read (missing, truncated, not a tar) is skipped whole
(counter ``failed_shards``, one per failed read: a bad shard counts again each epoch); each
occurrence is logged on ``pipeline.data``. A stream that gets no sample in a whole epoch raises
`DataError` rather than spinning. `BatchLoader.stats()` sums the counters of a rank's workers;
they also travel in `state_dict()`, so they survive a resume.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import subprocess
import tarfile
import traceback
import urllib.request
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.shards import IMAGE_EXTS, resize_center_crop, split_key

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes JPEG too, about 7x slower
    simplejpeg = None

log = logging.getLogger("pipeline.data")

_REMOTE = ("http://", "https://", "pipe:")
_STATE_KIND = "pipeline.data.ShardStream/v1"
_COUNTERS = ("skipped_samples", "failed_shards")


class DataError(Exception):
    """A user-facing data problem (missing shards, no readable samples); one line, names the shard."""


# ----------------------------------------------------------------------------- shard lists

def resolve_urls(urls: str | os.PathLike | list) -> list[str]:
    """Expand `urls` into a list of shards.

    Accepts a brace pattern (``d/x-{000000..000009}.tar``), a glob, a directory (its ``*.tar``,
    sorted), or a list of those. Local files must exist; ``http(s)://`` and ``pipe:`` urls are
    only brace-expanded. Duplicates are dropped (first one kept).
    """
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not patterns:
        raise DataError("data.urls is empty: give a brace pattern, a glob, a list or a directory")
    out: list[str] = []
    for pattern in map(str, patterns):
        if pattern.startswith(_REMOTE):
            out.extend(braceexpand(pattern))
            continue
        if os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).glob("*.tar"))
            if not found:
                raise DataError(f"data.urls: directory {pattern!r} holds no *.tar shards")
            out.extend(found)
            continue
        for path in braceexpand(os.path.expanduser(pattern)):
            if glob.has_magic(path):
                found = sorted(glob.glob(path))
                if not found:
                    raise DataError(f"data.urls: no shard matches {pattern!r}")
                out.extend(found)
            elif os.path.isfile(path):
                out.append(path)
            else:
                where = "" if path == pattern else f" (from {pattern!r})"
                raise DataError(f"data.urls: shard {path!r}{where} does not exist")
    return list(dict.fromkeys(out))


def _open(url: str):
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        return proc.stdout, proc
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=120), None
    return open(url, "rb"), None


def read_shard(url: str) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of a shard as (key, {extension: bytes}), grouping consecutive members by key
    as WebDataset does. Raises OSError/tarfile.TarError/... when the shard is unreadable."""
    f, proc = _open(url)
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if key is None:
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"truncated tar: member {member.name!r} is short")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = data
            # tarfile ends quietly at a cut header; a complete tar ends with a zero block
            if tar.fileobj.tell() != tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"truncated tar: no end-of-archive block after byte "
                                        f"{tar.offset}")
    finally:
        f.close()
        if proc is not None and proc.wait() != 0:
            raise OSError(f"command exited with status {proc.returncode}")
    return samples


# ----------------------------------------------------------------------------- decoding

def decode_image(data: bytes, ext: str, size: int, channels: int) -> np.ndarray:
    """Image bytes -> uint8 array (channels, size, size): converted to L or RGB (alpha dropped),
    shorter side scaled to `size` and centre-cropped."""
    arr = None
    if ext in ("jpg", "jpeg") and simplejpeg is not None:
        try:  # libjpeg-turbo; may scale down by 1/2..1/8 in the DCT while staying >= size
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB" if channels == 3 else "GRAY",
                                         min_height=size, min_width=size)
        except ValueError:
            arr = None  # e.g. CMYK or progressive quirks: let PIL try (and raise if corrupt)
    if arr is None:
        img = Image.open(io.BytesIO(data))
        img = img.convert("RGB" if channels == 3 else "L")
    elif arr.shape[0] != size or arr.shape[1] != size:
        img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
    else:
        img = None
    if img is not None:
        arr = np.asarray(resize_center_crop(img, size))
    arr = arr.reshape(size, size, channels)  # (H, W, C)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (C, H, W)


# ----------------------------------------------------------------------------- the stream

class ShardStream(IterableDataset):
    """One rank's endless stream of uint8 batches (B, C, H, W); each DataLoader worker is one
    stream. Implements `state_dict`/`load_state_dict` (called inside the worker by
    `StatefulDataLoader`). `samples(stream, num_streams)` is the per-sample stream underneath."""

    def __init__(self, urls: list[str], *, image_size: int, channels: int, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.urls = list(urls)
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._state: dict[str, Any] = {"epoch": 0, "shard_pos": 0, "sample_pos": 0,
                                       "epoch_samples": 0, **{c: 0 for c in _COUNTERS}}
        self._layout: tuple[int, int] | None = None  # (stream, num_streams) of a loaded state

    # -- order

    def shard_plan(self, epoch: int, stream: int, num_streams: int) -> list[tuple[int, int, int]]:
        """The shards `stream` reads in `epoch`, in order, as (shard index, part, parts):
        the stream takes the samples at positions part, part + parts, ... of the shard."""
        n = len(self.urls)
        order = np.random.default_rng((self.seed, epoch)).permutation(n)
        if n >= num_streams:
            return [(int(i), 0, 1) for i in order[stream::num_streams]]
        j = stream % n  # fewer shards than streams: share shard order[j] with its other readers
        return [(int(order[j]), stream // n, len(range(j, num_streams, n)))]

    def samples(self, stream: int, num_streams: int) -> Iterator[tuple[int, str, str, np.ndarray]]:
        """Endless (epoch, shard url, key, image (C, H, W) uint8) of one stream; continues from
        and advances the position in `state_dict()`."""
        st = self._state
        while True:
            plan = self.shard_plan(st["epoch"], stream, num_streams)
            while st["shard_pos"] < len(plan):
                shard, part, parts = plan[st["shard_pos"]]
                url = self.urls[shard]
                records = self._read(url)
                perm = np.random.default_rng((self.seed, st["epoch"], shard)).permutation(
                    len(records))[part::parts]
                while st["sample_pos"] < len(perm):
                    key, members = records[perm[st["sample_pos"]]]
                    st["sample_pos"] += 1
                    image = self._decode(url, key, members)
                    if image is not None:
                        st["epoch_samples"] += 1
                        yield st["epoch"], url, key, image
                st["shard_pos"] += 1
                st["sample_pos"] = 0
            if st["epoch_samples"] == 0:
                names = ", ".join(repr(self.urls[s]) for s, _, _ in plan[:3])
                more = f" and {len(plan) - 3} more" if len(plan) > 3 else ""
                why = "see the log for why"
                if plan and plan[0][2] > 1:
                    why = (f"{len(self.urls)} shards shared by {num_streams} streams: "
                           "make more shards or use fewer workers")
                raise DataError(f"epoch {st['epoch']}: no readable sample in shards {names}{more} "
                                f"(stream {stream} of {num_streams}; {why})")
            st["epoch"] += 1
            st["shard_pos"] = st["epoch_samples"] = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        stream, num_streams = self._stream()
        if self._layout is not None and self._layout != (stream, num_streams):
            raise DataError(f"cannot resume the data position: it was saved by stream "
                            f"{self._layout[0]} of {self._layout[1]}, this is stream {stream} of "
                            f"{num_streams} (keep world size and data.num_workers when resuming)")
        images = []
        for _, _, _, image in self.samples(stream, num_streams):
            images.append(image)
            if len(images) == self.batch_size:
                batch = torch.from_numpy(np.stack(images))  # (B, C, H, W) uint8
                images = []
                yield batch

    def _stream(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * num_workers + worker, self.world_size * num_workers

    def _read(self, url: str) -> list[tuple[str, dict[str, bytes]]]:
        try:
            return read_shard(url)
        except (OSError, EOFError, tarfile.TarError, zlib.error, ValueError) as e:
            self._state["failed_shards"] += 1
            log.warning("shard %r: unreadable (%s: %s); skipped (%d shard reads failed so far)",
                        url, type(e).__name__, e, self._state["failed_shards"])
            return []

    def _decode(self, url: str, key: str, members: dict[str, bytes]) -> np.ndarray | None:
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        why = f"no image member (has {sorted(members)})"
        if ext is not None:
            try:
                return decode_image(members[ext], ext, self.image_size, self.channels)
            except Exception as e:  # any decoder failure costs a counter, not the run
                why = f"cannot decode .{ext} ({type(e).__name__}: {e})"
        self._state["skipped_samples"] += 1
        log.warning("shard %r, sample %r: %s; skipped (%d samples skipped so far)",
                    url, key, why, self._state["skipped_samples"])
        return None

    # -- resume

    def state_dict(self) -> dict[str, Any]:
        stream, num_streams = self._stream()
        return {"__kind__": _STATE_KIND, "seed": self.seed, "num_shards": len(self.urls),
                "stream": stream, "num_streams": num_streams, **self._state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("__kind__") != _STATE_KIND:
            raise DataError(f"not a data position saved by this version ({state.get('__kind__')!r})")
        if state["num_shards"] != len(self.urls) or state["seed"] != self.seed:
            raise DataError(f"cannot resume the data position: it was saved for "
                            f"{state['num_shards']} shards and seed {state['seed']}, now "
                            f"{len(self.urls)} shards and seed {self.seed}")
        self._layout = (state["stream"], state["num_streams"])
        self._state.update({k: int(state[k]) for k in self._state})


# ----------------------------------------------------------------------------- the loader

class BatchLoader:
    """Endless iterator of uint8 CPU batches (micro_batch_size, channels, H, W) for one rank.

    `state_dict()` -> ``{"version": 1, "rank", "world_size", "num_workers", "loader":
    <StatefulDataLoader state>}`` (plain ints/strings/dicts) holds every worker's `ShardStream`
    position; `load_state_dict(d)` (before the next `next()`) makes the
    following batches those an uninterrupted loader would have given. `stats()` ->
    ``{"skipped_samples": int, "failed_shards": int}`` summed over this rank's workers, as of the
    last batch handed out.
    """

    def __init__(self, dataset: ShardStream, *, num_workers: int, pin_memory: bool):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.dataset = dataset
        self._layout = {"rank": dataset.rank, "world_size": dataset.world_size,
                        "num_workers": num_workers}
        # The loader draws its workers' base seed from `generator`: a private one, so that
        # starting (or restarting) the workers never shifts the global torch RNG.
        seed = np.random.SeedSequence((dataset.seed, dataset.rank)).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch API deprecated in 2.13
            warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated")
            self._loader = StatefulDataLoader(dataset, batch_size=None, num_workers=num_workers,
                                              pin_memory=pin_memory, generator=generator)
        self._it = None
        self._error: str | None = None  # set once the stream has failed for good

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> torch.Tensor:
        if self._error is not None:
            raise DataError(self._error)
        if self._it is None:
            self._it = iter(self._loader)
        try:
            return next(self._it)
        except DataError as e:  # from a worker: keep the one-line message, drop the traceback
            message = str(e).rsplit("DataError: ", 1)[-1].strip()
            # torch's re-raise leaves a reference cycle through these frames; left to the
            # garbage collector, the workers' shutdown waits out a 5 s join timeout
            traceback.clear_frames(e.__traceback__)
        # The stream cannot go on: stop the workers now (dropping the loader's iterator does).
        self._error = message
        self._it = None
        self._loader.load_state_dict({})
        raise DataError(message)

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, **self._layout, "loader": self._loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise DataError(f"unknown data loader state version {state.get('version')!r}")
        saved = {k: state.get(k) for k in self._layout}
        if saved != self._layout:
            raise DataError(f"cannot resume the data position: it was saved with {saved}, this "
                            f"loader has {self._layout} (keep world size and data.num_workers)")
        self._it = self._error = None  # the loader drops its iterator (and workers) too
        self._loader.load_state_dict(state["loader"])

    def stats(self) -> dict[str, int]:
        totals = dict.fromkeys(_COUNTERS, 0)
        for s in _stream_states(self._loader.state_dict()):
            for c in _COUNTERS:
                totals[c] += s[c]
        return totals

    def close(self) -> None:
        """Stop the workers; a later `next()` starts new ones at the current position."""
        if self._it is not None:
            self.load_state_dict(self.state_dict())


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


def build_loader(urls: list[str], *, image_size: int, channels: int, micro_batch_size: int,
                 num_workers: int, seed: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> BatchLoader:
    """The endless, resumable batch stream of one rank (see the module docstring)."""
    checks = [(image_size >= 1, f"image_size must be >= 1, got {image_size}"),
              (channels in (1, 3), f"channels must be 1 or 3, got {channels}"),
              (micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {micro_batch_size}"),
              (num_workers >= 0, f"num_workers must be >= 0, got {num_workers}"),
              (seed >= 0, f"seed must be >= 0, got {seed}"),
              (0 <= rank < world_size, f"rank {rank} is outside world size {world_size}")]
    for ok, message in checks:
        if not ok:
            raise DataError(message)
    urls = resolve_urls(urls)
    streams = world_size * max(1, num_workers)
    if len(urls) < streams:
        log.warning("only %d shards for %d streams (world size %d x %d workers): streams share "
                    "shards and each reads whole shards to use a part; make more, smaller shards",
                    len(urls), streams, world_size, max(1, num_workers))
    dataset = ShardStream(urls, image_size=image_size, channels=channels,
                          batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size)
    return BatchLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)


def to_model_input(batch_uint8: torch.Tensor, device, *, random_flip: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1] on `device`, each sample flipped left-right with
    probability 1/2 (drawn from `generator`, which must live on `device`)."""
    x = batch_uint8.to(device, non_blocking=True).to(torch.float32).div_(127.5).sub_(1.0)
    if random_flip:
        flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5  # (B,)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()
