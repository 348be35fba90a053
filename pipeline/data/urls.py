"""Shard lists: expand `data.urls` into shards, and know how many samples each holds.

Counts come from a wids shard index JSON (``{"shardlist": [{"url", "nsamples"}, ...]}``, as
``ddpm-shards`` writes it): one given in `data.urls`, or, for local shards, any ``*index*.json``
beside them. Shards no index covers are counted by reading their tar headers once (local files:
the headers only; remote ones are downloaded, so give remote data an index).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from pipeline.errors import DataError
from pipeline.data.tario import HTTP_TIMEOUT_S, REMOTE_PREFIXES, read_shard

log = logging.getLogger("pipeline.data")


# ----------------------------------------------------------------------------- shard lists

def resolve_urls(urls: str | os.PathLike | list) -> list[str]:
    """Expand `urls` into a list of shards.

    Accepts a brace pattern (``d/x-{000000..000009}.tar``), a glob, a directory (its ``*.tar``,
    sorted), a wids index JSON (``*.json``, local or http(s); its shards, relative to it), or a
    list of those. Local files must exist; ``http(s)://`` and ``pipe:`` urls are only
    brace-expanded. Duplicates are dropped (first one kept).
    """
    return list(resolve_with_counts(urls))


def resolve_with_counts(urls) -> dict[str, int | None]:
    """{shard url: sample count from an index JSON, or None}, in order."""
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not patterns:
        raise DataError("data.urls is empty: give a brace pattern, a glob, a list or a directory")
    out: dict[str, int | None] = {}
    for pattern in map(str, patterns):
        if pattern.endswith(".json"):
            for url, n in _read_index(pattern).items():
                out.setdefault(url, n)
            continue
        if pattern.startswith(REMOTE_PREFIXES):
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
                    raise DataError(f"data.urls: shard {path!r}{where} does not exist")
        for url in found:
            out.setdefault(url, None)
    return out


def _read_index(where: str) -> dict[str, int]:
    """A wids shard index: {"shardlist": [{"url": ..., "nsamples": ...}, ...]}."""
    try:
        if where.startswith(("http://", "https://")):
            with urllib.request.urlopen(where, timeout=HTTP_TIMEOUT_S) as response:
                index = json.loads(response.read())
            base = where.rsplit("/", 1)[0] + "/"
        else:
            index = json.loads(Path(where).expanduser().read_text())
            base = str(Path(where).expanduser().parent) + os.sep
        entries = index["shardlist"]
        shards = {e["url"] if e["url"].startswith(REMOTE_PREFIXES) or os.path.isabs(e["url"])
                  else base + e["url"]: int(e["nsamples"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"data.urls: cannot read shard index {where!r} ({type(e).__name__}: {e})")
    missing = [u for u in shards if not u.startswith(REMOTE_PREFIXES) and not os.path.isfile(u)]
    if missing:
        raise DataError(f"data.urls: shard {missing[0]!r} listed in {where!r} does not exist"
                        + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    return shards


def _indexes_beside(urls: list[str]) -> dict[str, int]:
    """Sample counts from ``*index*.json`` files in the directories of local shards."""
    counts: dict[str, int] = {}
    dirs = dict.fromkeys(os.path.dirname(os.path.abspath(u)) for u in urls
                         if not u.startswith(REMOTE_PREFIXES))
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(glob.escape(d), "*index*.json"))):
            try:
                entries = json.loads(Path(path).read_text())["shardlist"]
                for e in entries:
                    counts.setdefault(os.path.abspath(os.path.join(d, e["url"])), int(e["nsamples"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not an index; scanning will count those shards
    return counts


def count_samples(urls: list[str], known: dict[str, int | None]
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
        n = beside.get(os.path.abspath(url)) if n is None and not url.startswith(REMOTE_PREFIXES) else n
        if n is None:
            todo.append(i)
        else:
            counts[i] = n
            if n == 0:
                empty[i] = "holds no samples (its index says 0)"

    def scan(i: int) -> tuple[int, int, str | None]:
        shard = read_shard(urls[i])
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


def load_shard_counts(urls, max_bad_fraction: float) -> tuple[list[str], np.ndarray, int]:
    """Shards of `urls`, their sample counts, and how many were left out (no sample). Raises
    `DataError` when no shard has a sample, or when the unreadable ones hold, by an average
    shard's count, more than `max_bad_fraction` of the data."""
    known = resolve_with_counts(urls)
    urls = list(known)
    counts, empty, unreadable = count_samples(urls, known)
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
