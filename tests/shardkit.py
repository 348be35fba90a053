"""Helpers for the data tests: real tar shards whose images say which sample they are."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def encode(arr: np.ndarray, fmt="PNG", mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def id_image(i: int, size=8) -> bytes:
    """A gray PNG carrying the sample id `i` (< 65536) in its first two pixels."""
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[0, 0], arr[0, 1] = i >> 8, i & 255
    return encode(arr)


def ids(batch: torch.Tensor) -> list[int]:
    """Sample ids of a (B, 1, H, W) uint8 batch of `id_image`s."""
    return (batch[:, 0, 0, 0].int() * 256 + batch[:, 0, 0, 1].int()).tolist()


def write_tar(path: Path, members, fmt=tarfile.USTAR_FORMAT) -> str:
    """members: [(name, bytes)] in order -> a tar file at `path`."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def write_shard(path: Path, samples) -> str:
    """samples: [(key, {ext: bytes})] -> a tar shard at `path`."""
    return write_tar(path, [(f"{key}.{ext}", data) for key, members in samples
                            for ext, data in members.items()])


def id_shards(directory: Path, sizes, index: bool = False, first_id: int = 1) -> tuple[list[str], int]:
    """Shards `part-NNNNNN.tar` of id images (ids first_id.., unique over all shards) with the
    given sample counts, and optionally a wids index `part-index.json`. Returns (urls, last id)."""
    directory.mkdir(parents=True, exist_ok=True)
    urls, next_id = [], first_id
    for n, size in enumerate(sizes):
        samples = [(f"s{n}_{i}", {"png": id_image(next_id + i), "cls": b"0"}) for i in range(size)]
        urls.append(write_shard(directory / f"part-{n:06d}.tar", samples))
        next_id += size
    if index:
        shardlist = [{"url": Path(u).name, "nsamples": s} for u, s in zip(urls, sizes)]
        (directory / "part-index.json").write_text(json.dumps({"shardlist": shardlist}))
    return urls, next_id - 1


def shares(total: int, num_streams: int) -> list[int]:
    """Samples per stream per epoch, as the deal specifies: stream s gets [s*N//S, (s+1)*N//S)."""
    return [(s + 1) * total // num_streams - s * total // num_streams for s in range(num_streams)]


def stream_sequences(batches: list[list[int]], num_workers: int) -> list[list[int]]:
    """One rank's batches (ids) -> the sample sequence of each of its workers: the loader hands
    out batches round-robin over the workers, starting with worker 0."""
    workers = max(1, num_workers)
    return [[i for b in batches[w::workers] for i in b] for w in range(workers)]


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root: Path, counts=None) -> dict[str, tuple[str, bytes]]:
    """An image folder of mixed sizes/modes/formats; returns {relative path: (class, bytes)}."""
    counts = counts or {"cat": 4, "ant": 3, "dog": 5}
    rng = np.random.default_rng(0)
    kinds = [("RGB", (20, 30), "JPEG", "jpg"), ("L", (16, 16), "PNG", "png"),
             ("RGBA", (12, 9), "PNG", "png"), ("P", (10, 10), "PNG", "png")]
    files = {}
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            mode, (w, h), fmt, ext = kinds[i % len(kinds)]
            bands = {"RGB": 3, "L": 1, "RGBA": 4, "P": 1}[mode]
            arr = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
            img = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode="L" if bands == 1 else mode)
            img = img.convert("P") if mode == "P" else img
            data = _encode(img, fmt)
            rel = f"{cls}/img{i:03d}.{ext}"
            (root / rel).write_bytes(data)
            files[rel] = (cls, data)
    return files
