"""Who reads which sample: the epoch deal, and the re-deal after a change of world size.

An epoch is a sequence of *positions* 0 .. total-1: the shards in the order
``default_rng((seed, epoch)).permutation(n_shards)``, each contributing `counts[shard]` positions;
position ``p`` of a shard holds its sample ``default_rng((seed, epoch, shard)).permutation(count)[p]``.
There are ``S = world_size * num_workers`` streams; stream ``s`` reads the positions
``[s * R // S, (s + 1) * R // S)`` of the epoch's R unread positions (all of them, unless a resume
re-dealt a partly read epoch). So every stream gets the same number of samples per epoch, give or
take one, and the streams, which all hand out batches at the same rate, stay in step.

Position sets are lists of disjoint, sorted ``[start, stop)`` intervals ("Intervals").
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

Intervals = list[tuple[int, int]]


def shard_order(seed: int, epoch: int, n_shards: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n_shards)


def sample_order(seed: int, epoch: int, shard: int, count: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch, shard)).permutation(count)


def normalize(intervals) -> Intervals:
    """Sorted, merged, non-empty intervals."""
    out: Intervals = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def complement(intervals: Intervals, total: int) -> Intervals:
    out, at = [], 0
    for a, b in normalize(intervals):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < total:
        out.append((at, total))
    return out


def size(intervals: Intervals) -> int:
    return sum(b - a for a, b in intervals)


def take(intervals: Intervals, start: int, stop: int) -> Intervals:
    """The positions number start .. stop-1 of the concatenation of `intervals`."""
    out, seen = [], 0
    for a, b in intervals:
        lo, hi = max(start - seen, 0), min(stop - seen, b - a)
        if lo < hi:
            out.append((a + lo, a + hi))
        seen += b - a
        if seen >= stop:
            break
    return out


def stream_plan(stream: int, num_streams: int, total: int, read: Intervals = ()) -> Intervals:
    """The positions `stream` reads in an epoch of `total` positions of which `read` were
    already read before the current layout took over."""
    unread = complement(read, total)
    r = size(unread)
    return take(unread, stream * r // num_streams, (stream + 1) * r // num_streams)


def segments(plan: Intervals, order: np.ndarray, counts: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """`plan` cut at shard boundaries: (shard, first position in the shard, end position)."""
    bounds = np.concatenate([[0], np.cumsum(counts[order])])
    for a, b in plan:
        j = int(np.searchsorted(bounds, a, side="right")) - 1
        while a < b:
            stop = min(b, int(bounds[j + 1]))
            if stop > a:
                yield int(order[j]), a - int(bounds[j]), stop - int(bounds[j])
            a = stop
            j += 1


def read_table(streams: list[dict], num_streams: int, total: int) -> tuple[int, dict[int, Intervals]]:
    """The world-size-independent position of a set of streams (one layout): the first epoch not
    wholly read, and for it and later epochs the positions already read.

    Each stream state has ``stream``, ``epoch`` (the epoch it is in), ``pos`` (positions of that
    epoch's plan it has passed) and ``read`` ({epoch: Intervals} read before the layout took over).
    A stream in a later epoch has read all of its plan of the earlier ones.
    """
    lo = min(s["epoch"] for s in streams)
    hi = max(s["epoch"] for s in streams)
    table: dict[int, Intervals] = {}
    for epoch in range(lo, hi + 1):
        before = normalize(iv for s in streams for iv in s["read"].get(epoch, ()))
        done = list(before)
        for s in streams:
            if s["epoch"] >= epoch:
                plan = stream_plan(s["stream"], num_streams, total, before)
                done += plan if s["epoch"] > epoch else take(plan, 0, s["pos"])
        table[epoch] = normalize(done)
    while lo in table and table[lo] == [(0, total)]:
        del table[lo]
        lo += 1
    return lo, table
