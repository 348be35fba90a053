"""Shard lists: expand `data.urls` into shards, and know how many samples each holds.

Counts come from a wids shard index JSON (``{"shardlist": [{"url", "nsamples"}, ...]}``, as
``ddpm-shards`` writes it): one given in `data.urls`, or, for local shards, any ``*index*.json``
beside them. Shards no index covers are counted by reading their tar headers once (local files:
the headers only; remote ones are downloaded, so give remote data an index).

Remote means any scheme webdataset's `gopen` opens (`pipeline.data.fetch`): ``pipe:``, ``http(s)``,
``gs``, ``hf``, ``ais``, ``sftp`` ... An index is data, not configuration, and may come from anywhere:
its ``pipe:`` entries (a shell command each) are refused unless ``data.index_commands`` allows them,
and its counts must be non-negative integers.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from pipeline.data import fetch
from pipeline.data.tario import DEFAULT_STALL_TIMEOUT_S, read_shard
from pipeline.errors import DataError

log = logging.getLogger("pipeline.data")


# ----------------------------------------------------------------------------- shard lists

def resolve_urls(urls: str | os.PathLike | list, *, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
                 index_commands: bool = False) -> list[str]:
    """Expand `urls` into a list of shards.

    Accepts a brace pattern (``d/x-{000000..000009}.tar``), a glob, a directory (its ``*.tar``,
    sorted), a wids index JSON (``*.json``, local or any gopen URL; its shards, relative to it), or
    a list of those. Local files must exist; remote urls (``pipe:``, ``http(s)://``, ``gs://``, ...)
    are only brace-expanded. Duplicates are dropped (first one kept).
    """
    return list(resolve_with_counts(urls, stall_timeout_s=stall_timeout_s,
                                    index_commands=index_commands))


def resolve_with_counts(urls, *, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
                        index_commands: bool = False) -> dict[str, int | None]:
    """{shard url: sample count from an index JSON, or None}, in order."""
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not patterns:
        raise DataError("data.urls is empty: give a brace pattern, a glob, a list or a directory")
    out: dict[str, int | None] = {}
    for pattern in map(str, patterns):
        if pattern.endswith(".json"):
            for url, n in _read_index(pattern, stall_timeout_s, index_commands).items():
                out.setdefault(url, n)
            continue
        if not fetch.is_remote(pattern):
            pattern = fetch.local_path(pattern)  # file:///x -> /x, as gopen reads it
        if fetch.is_remote(pattern):
            found = list(braceexpand(pattern))
        elif os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).glob("*.tar"))
            if not found:
                raise DataError(f"data.urls: directory {pattern!r} holds no *.tar shards")
        else:
            found = []
            for path in braceexpand(os.path.expanduser(pattern)):
                if glob.has_magic(path):
                    matches = sorted(glob.glob(path))
                    if not matches:
                        raise DataError(f"data.urls: no shard matches {pattern!r}")
                    found += matches
                elif os.path.isfile(path):
                    found.append(path)
                else:
                    where = "" if path == pattern else f" (from {pattern!r})"
                    raise DataError(f"data.urls: shard {path!r}{where} does not exist"
                                    + _scheme_hint(path))
        for url in found:
            out.setdefault(url, None)
    _check_programs(list(out) + [p for p in map(str, patterns) if p.endswith(".json")])
    return out


def _check_programs(urls: list[str]) -> None:
    """One error at start-up when gopen would need a program that is not installed."""
    seen: dict[str, str] = {}
    for url in urls:
        if fetch.is_remote(url):
            seen.setdefault(fetch.scheme(url), url)
    for scheme, url in seen.items():
        program = fetch.missing_program(url)
        if program:
            raise DataError(f"data.urls: {url!r} is opened by webdataset's gopen with {program}, which is "
                            f"not installed (not on PATH): install it, or give the shards another way")


def _scheme_hint(path: str) -> str:
    """For a missing 'shard' that looks like a URL of a scheme gopen lacks: what to write instead."""
    scheme = fetch.scheme(path)
    if not scheme or scheme in fetch.LOCAL_SCHEMES or len(scheme) == 1:  # (C: is a drive)
        return ""
    example = {"s3": f"pipe:aws s3 cp {path} -"}.get(scheme, f"pipe:<a command that writes {path} to stdout>")
    return (f"; webdataset's gopen has no {scheme}:// scheme (it has {', '.join(fetch.REMOTE_SCHEMES)}): "
            f"write it as {example!r}")


def _read_index(where: str, stall_timeout_s: float, index_commands: bool) -> dict[str, int]:
    """A wids shard index: {"shardlist": [{"url": ..., "nsamples": ...}, ...]}."""
    try:
        if fetch.is_remote(where):
            data, problem = fetch.read_remote(where, stall_timeout_s)
            if problem:
                raise OSError(problem)
            index = json.loads(bytes(data))
            base = None if fetch.runs_command(where) else where.rsplit("/", 1)[0] + "/"
        else:
            index = json.loads(Path(fetch.local_path(where)).expanduser().read_text())
            base = str(Path(fetch.local_path(where)).expanduser().parent) + os.sep
        entries = index["shardlist"]
        shards = {}
        for e in entries:
            url = e["url"]
            if not fetch.is_remote(url) and not os.path.isabs(url):
                if base is None:
                    raise DataError(f"data.urls: shard index {where!r} is the output of a command, so "
                                    f"its entry {url!r} must be a full URL or an absolute path")
                url = base + url
            shards[url] = _count(e["nsamples"], url, where)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"data.urls: cannot read shard index {where!r} ({type(e).__name__}: {e})") from None
    commands = [u for u in shards if fetch.runs_command(u)]
    if commands and not index_commands:
        raise DataError(f"data.urls: shard index {where!r} lists {len(commands)} pipe: command(s), e.g. "
                        f"{commands[0]!r}; an index is data and does not run commands here: write the "
                        f"commands in data.urls, or set data.index_commands=true if you trust this index")
    missing = [u for u in shards if not fetch.is_remote(u) and not os.path.isfile(fetch.local_path(u))]
    if missing:
        raise DataError(f"data.urls: shard {missing[0]!r} listed in {where!r} does not exist"
                        + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    return shards


def _count(value, url: str, where: str) -> int:
    """An index entry's nsamples: a non-negative integer, or a DataError naming the index."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"data.urls: shard index {where!r} gives {url!r} nsamples={value!r}; "
                        f"counts must be non-negative integers (fix the index, or delete it and "
                        f"the shards are counted from their tar headers)")
    return value


def _indexes_beside(urls: list[str]) -> dict[str, int]:
    """Sample counts from ``*index*.json`` files in the directories of local shards."""
    counts: dict[str, int] = {}
    dirs = dict.fromkeys(os.path.dirname(os.path.abspath(u)) for u in urls if not fetch.is_remote(u))
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(glob.escape(d), "*index*.json"))):
            try:
                entries = json.loads(Path(path).read_text())["shardlist"]
                found = {os.path.abspath(os.path.join(d, e["url"])): e["nsamples"] for e in entries}
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not an index; scanning will count those shards
            for url, n in found.items():
                counts.setdefault(url, _count(n, url, path))
    return counts


def count_samples(urls: list[str], known: dict[str, int | None],
                  stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
                  ) -> tuple[np.ndarray, dict[int, str], set[int]]:
    """Sample count of each shard (from `known`, an index beside the shards, or a header scan),
    {shard: why} for the shards left out (no sample), and which of those could not be read."""
    beside = _indexes_beside([u for u in urls if known.get(u) is None])
    counts = np.zeros(len(urls), dtype=np.int64)
    empty: dict[int, str] = {}
    unreadable: set[int] = set()
    todo = []
    for i, url in enumerate(urls):
        n = known.get(url)
        n = beside.get(os.path.abspath(url)) if n is None and not fetch.is_remote(url) else n
        if n is None:
            todo.append(i)
        else:
            counts[i] = n
            if n == 0:
                empty[i] = "holds no samples (its index says 0)"

    def scan(i: int) -> tuple[int, int, str | None]:
        shard = read_shard(urls[i], stall_timeout_s)
        shard.close()
        return i, len(shard.samples), shard.problem

    if todo:
        log.info("counting the samples of %d shards by reading their tar headers (no index JSON "
                 "found; ddpm-shards writes one)", len(todo))
        with ThreadPoolExecutor(max_workers=8) as pool:
            for i, n, problem in pool.map(scan, todo):
                counts[i] = n
                if n == 0:
                    empty[i] = problem or "holds no samples"
                    if problem and problem != "empty file":
                        unreadable.add(i)
    return counts, empty, unreadable


def load_shard_counts(urls, max_bad_fraction: float, *, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
                      index_commands: bool = False) -> tuple[list[str], np.ndarray, int]:
    """Shards of `urls`, their sample counts, and how many were left out (no sample). Raises
    `DataError` when no shard has a sample, or when the unreadable ones hold, by an average
    shard's count, more than `max_bad_fraction` of the data."""
    known = resolve_with_counts(urls, stall_timeout_s=stall_timeout_s, index_commands=index_commands)
    urls = list(known)
    counts, empty, unreadable = count_samples(urls, known, stall_timeout_s)
    for i, why in empty.items():
        log.warning("shard %r: %s; left out", urls[i], why)
    total = int(counts.sum())
    if not total:
        named = "; ".join(f"{urls[i]!r}: {why}" for i, why in list(empty.items())[:3])
        raise DataError(f"none of the {len(urls)} shards holds a readable sample: {named}")
    lost = len(unreadable) * total / max(1, len(urls) - len(empty))
    if lost > max_bad_fraction * (total + lost):
        named = "; ".join(f"{urls[i]!r}: {empty[i]}" for i in sorted(unreadable)[:3])
        raise DataError(f"{len(unreadable)} of {len(urls)} shards cannot be read, about "
                        f"{lost / (total + lost):.0%} of the data (more than "
                        f"data.max_bad_fraction={max_bad_fraction}): {named}")
    return urls, counts, len(empty)
