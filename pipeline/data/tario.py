"""Tar shards as bytes: open local, http(s):// and pipe: urls, and index their samples.

A shard is read whole: a local file is memory-mapped (only the pages touched are read), a remote
one is downloaded into memory. Its 512-byte headers are parsed here rather than by `tarfile`,
which costs more per member in Python than decoding a 32x32 JPEG does.

Samples are grouped as WebDataset groups them (its ``base_plus_ext`` and ``skip_meta`` rules):
consecutive members with the same key, the key being the member name up to the first '.' of its
basename (``dir/a.b.jpg`` -> key ``dir/a``, field ``b.jpg``); names without a dot in the basename
and ``__meta__`` names are ignored; field names are lower-cased. A sample's image is its field
whose last extension comes first in `IMAGE_EXTS` (``b.jpg`` counts as a jpg); other fields, such
as labels, are ignored.

Handles ustar, GNU (long names) and pax headers, and gzip-compressed shards. Broken data never
raises: the intact samples before the damage are kept and `Shard.problem` says what is wrong and
at which byte.
"""

from __future__ import annotations

import http.client
import mmap
import os
import re
import subprocess
import urllib.request
import zlib
from dataclasses import dataclass, field

from pipeline.data.decode import IMAGE_EXTS

REMOTE_PREFIXES = ("http://", "https://", "pipe:")
HTTP_TIMEOUT_S = 120.0
"""Seconds without data after which an http(s) read fails (the shard then counts as failed)."""

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_KINDS = (48, 0, 55)  # typeflag '0', NUL (old tars) and '7' (contiguous file)
_IMAGE_RANK = {ext: i for i, ext in enumerate(IMAGE_EXTS)}
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta

Sample = tuple  # (key, image ext or None, data offset, data size, field names if no image else None)


@dataclass
class Shard:
    """One shard read into memory: `samples[i]` is (key, ext, offset, size, fields)."""

    url: str
    data: bytes | mmap.mmap = b""
    samples: list[Sample] = field(default_factory=list)
    problem: str | None = None
    """Why the shard is not (wholly) readable; None when it is intact."""

    def close(self) -> None:
        if isinstance(self.data, mmap.mmap):
            self.data.close()
        self.data = b""


def read_shard(url: str) -> Shard:
    """Read and index one shard. Never raises for bad data: see `Shard.problem`."""
    try:
        data, problem = _fetch(url)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Shard(url, problem=f"cannot read ({type(e).__name__}: {e})")
    try:
        if data[:2] == b"\x1f\x8b":
            data, gz_problem = _gunzip(data)
            problem = problem or gz_problem
        members, tar_problem = list_members(data)
    except (OSError, ValueError) as e:  # e.g. a local file that shrank under its memory map
        members, tar_problem = [], f"cannot read ({type(e).__name__}: {e})"
    return Shard(url, data, group_samples(members), problem or tar_problem)


def _fetch(url: str) -> tuple[bytes | mmap.mmap, str | None]:
    if url.startswith("pipe:"):
        proc = subprocess.run(url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            said = proc.stderr.decode(errors="replace").strip().splitlines()
            why = f": {said[-1]}" if said else ""
            return proc.stdout, f"command exited with status {proc.returncode}{why}"
        return proc.stdout, None
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            try:
                return response.read(), None
            except http.client.IncompleteRead as e:
                return e.partial, f"download cut after {len(e.partial)} bytes"
    with open(url, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b"", None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), None


def _gunzip(data) -> tuple[bytes, str | None]:
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data)
    except zlib.error as e:
        return b"", f"corrupt gzip data ({e})"
    return out, None if inflater.eof else "truncated gzip data"


def _number(field_bytes: bytes) -> int:
    if field_bytes[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        return int.from_bytes(field_bytes[1:], "big")
    return int(field_bytes.strip(b"\0 ") or b"0", 8)


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def list_members(data) -> tuple[list[tuple[str, int, int]], str | None]:
    """Regular files of a tar as (name, data offset, size), and the problem that ended the
    listing early (None for an intact tar)."""
    members = []
    end = len(data)
    find = data.find
    pos = 0
    long_name = None
    # Fields are sliced straight out of `data` (no 512-byte header copy): this loop runs once per
    # member, and at 32x32 it costs about as much as decoding the image.
    while True:
        if pos + _BLOCK > end:
            if end == 0:
                return members, "empty file"
            if pos == end:
                return members, f"truncated tar: no end-of-archive block after byte {pos}"
            return members, f"truncated tar: cut inside a header at byte {pos}"
        if data[pos] == 0 and data[pos:pos + _BLOCK] == _ZERO_BLOCK:
            return members, None
        magic = data[pos + 257:pos + 263]
        # Cheap check first: a ustar/GNU magic; the checksum decides for v7 tars and garbage.
        if magic[:5] != b"ustar" and not _checksum_ok(data[pos:pos + _BLOCK]):
            if pos == 0:
                return members, "not a tar file (no valid tar header at byte 0)"
            return members, f"corrupt tar header at byte {pos}"
        try:
            size = int(data[pos + 124:pos + 135], 8)  # 11 octal digits, as tar writers write it
        except ValueError:
            try:
                size = _number(data[pos + 124:pos + 136])
            except ValueError:
                return members, (f"corrupt tar header at byte {pos} (size field "
                                 f"{data[pos + 124:pos + 136]!r})")
        kind = data[pos + 156]
        start = pos + _BLOCK
        if start + size > end:
            name = data[pos:pos + 100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            return members, (f"truncated tar: member {name!r} needs bytes up to {start + size}, "
                             f"the data ends at byte {end}")
        if kind in _FILE_KINDS:
            if long_name is not None:
                name, long_name = long_name, None
            else:
                nul = find(b"\0", pos, pos + 100)
                name = data[pos:nul if nul >= 0 else pos + 100]
                if magic == b"ustar\0" and data[pos + 345]:  # POSIX prefix (GNU uses the field otherwise)
                    name = data[pos + 345:pos + 500].split(b"\0", 1)[0] + b"/" + name
                name = name.decode("utf-8", "surrogateescape")
            members.append((name, start, size))
        elif kind == 76:  # 'L': GNU long name of the next member
            long_name = data[start:start + size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == 120:  # 'x': pax extended header of the next member
            path = _pax_path(data[start:start + size])
            if path is not None:
                long_name = path
        elif kind not in (103, 75):  # not 'g' or 'K': directories, links, ...: nothing to read
            long_name = None
        pos = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _pax_path(records: bytes) -> str | None:
    # records: "<len> <key>=<value>\n" repeated
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            return None
        try:
            length = int(records[pos:space])
        except ValueError:
            return None
        key, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += max(length, 1)
    return None


def group_samples(members: list[tuple[str, int, int]]) -> list[Sample]:
    """Consecutive members with the same key -> one sample (see the module docstring)."""
    samples: list[Sample] = []
    key = None
    fields: dict[str, tuple[int, int]] = {}
    for name, offset, size in members:
        base = name.rfind("/") + 1
        dot = name.find(".", base)
        if dot <= base:  # no dot in the basename (no key), or a leading one: WebDataset's rule
            match = _KEY.match(name) if dot == base else None
            if match is None:
                continue
            dot = match.end(1)
        if name.startswith("__") and _META.match(name):
            continue
        if name[:dot] != key:
            if key is not None:
                samples.append(_sample(key, fields))
            key, fields = name[:dot], {}
        fields.setdefault(name[dot + 1:].lower(), (offset, size))
    if key is not None:
        samples.append(_sample(key, fields))
    return samples


def _sample(key: str, fields: dict[str, tuple[int, int]]) -> Sample:
    best, best_rank = None, len(_IMAGE_RANK)
    for name in fields:
        rank = _IMAGE_RANK.get(name[name.rfind(".") + 1:], best_rank)
        if rank < best_rank:
            best, best_rank = name, rank
    if best is None:
        return (key, None, 0, 0, tuple(fields))
    offset, size = fields[best]
    return (key, best[best.rfind(".") + 1:], offset, size, None)
