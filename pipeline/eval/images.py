"""Image sets for evaluation, as uint8 (N, C, H, W): the first N readable images of tar shards,
an `.npz` array (``ddpm-sample --npz``: uint8 NHWC in ``arr_0``), or a folder of image files.

Order is fixed (shards in list order, samples in tar order; folder files sorted), so image i is the
same on every rank. Every image goes through `pipeline.data.decode.decode_image` at the evaluated size
and channel count: the same decode, resize and centre crop as training.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pipeline.data.decode import decode_image
from pipeline.data.fetch import is_remote
from pipeline.data.tario import read_shard
from pipeline.data.urls import load_shard_counts
from pipeline.data.write import read_folder
from pipeline.errors import DataError

log = logging.getLogger("pipeline.eval")


def shard_list(urls) -> tuple[list[str], list[int], list[list]]:
    """(shards, sample counts, [url, count, size, mtime_ns] per shard) for a reference-cache key.

    Local shards add their size and modification time, so a rewritten shard invalidates the key."""
    shards, counts, _ = load_shard_counts(urls, max_bad_fraction=1.0)
    ident = []
    for url, n in zip(shards, counts.tolist()):
        if is_remote(url):
            ident.append([url, n, None, None])
        else:
            st = os.stat(url)
            ident.append([os.path.abspath(url), n, st.st_size, st.st_mtime_ns])
    return shards, counts.tolist(), ident


def read_shard_images(shards: list[str], num: int, *, image_size: int, channels: int,
                      what: str = "--data") -> np.ndarray:
    """The first `num` decodable images of `shards`, uint8 (num, C, H, W). Undecodable samples
    are skipped with a warning; too few images is a `DataError`."""
    out = np.empty((num, image_size, image_size, channels), dtype=np.uint8)  # (N, H, W, C)
    n, skipped = 0, 0
    for url in shards:
        shard = read_shard(url)
        try:
            if shard.problem:
                log.warning("shard %r: %s; its readable samples are used", url, shard.problem)
            for key, ext, offset, length, _ in shard.samples:
                if ext is None:
                    continue
                try:
                    out[n] = decode_image(shard.data[offset:offset + length], ext, image_size, channels)
                except Exception as e:  # a bad image costs a warning, as in training
                    skipped += 1
                    log.warning("shard %r, sample %r: cannot decode .%s (%s); skipped", url, key, ext,
                                type(e).__name__)
                    continue
                n += 1
                if n == num:
                    return out.transpose(0, 3, 1, 2)
        finally:
            shard.close()
    raise DataError(f"{what}: the {len(shards)} shards hold only {n} readable images "
                    f"({skipped} undecodable), fewer than the {num} asked for; lower --num "
                    f"(eval.num_samples) or give more shards")


def read_image_file(path: Path, num: int, *, image_size: int | None, channels: int | None) -> np.ndarray:
    """uint8 (num, C, H, W) from an .npz (the first `num` of ``arr_0``, NHWC or NCHW)."""
    try:
        with np.load(path) as z:
            arr = z["arr_0"] if "arr_0" in z.files else z[z.files[0]]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise DataError(f"--samples '{path}': not a readable .npz of images ({type(e).__name__})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise DataError(f"--samples '{path}': expected a uint8 (N, H, W, C) array, got {arr.dtype} "
                        f"{arr.shape}")
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if arr.shape[1] not in (1, 3) or arr.shape[2] != arr.shape[3]:
        raise DataError(f"--samples '{path}': expected square images with 1 or 3 channels, got {arr.shape}")
    if arr.shape[0] < num:
        raise DataError(f"--samples '{path}' holds {arr.shape[0]} images, fewer than --num {num}")
    if image_size is not None and arr.shape[2] != image_size:
        raise DataError(f"--samples '{path}': images are {arr.shape[2]}x{arr.shape[3]}, the model's are "
                        f"{image_size}x{image_size}")
    if channels is not None and arr.shape[1] != channels:
        raise DataError(f"--samples '{path}': images have {arr.shape[1]} channels, the model's "
                        f"{channels}")
    return np.ascontiguousarray(arr[:num])


def read_folder_images(root: Path, num: int, *, image_size: int, channels: int) -> np.ndarray:
    """The first `num` images of a folder (files sorted, recursively), uint8 (num, C, H, W)."""
    records = read_folder(root)
    if len(records) < num:
        raise DataError(f"--samples '{root}' holds {len(records)} image files, fewer than --num {num}")
    out = np.empty((num, image_size, image_size, channels), dtype=np.uint8)
    for i, rec in enumerate(records[:num]):
        try:
            out[i] = decode_image(rec.load(), rec.ext, image_size, channels)
        except Exception as e:
            raise DataError(f"--samples '{root / rec.source}': cannot decode ({type(e).__name__})") from None
    return out.transpose(0, 3, 1, 2)


def native_size(path: Path) -> tuple[int, int]:
    """(image size, channels) of a sample set when no model says which: its first image's."""
    from PIL import Image

    if path.suffix == ".npz":
        arr = read_image_file(path, 1, image_size=None, channels=None)
        return int(arr.shape[2]), int(arr.shape[1])
    if path.is_dir() and not any(path.glob("*.tar")):
        records = read_folder(path)
        if not records:
            raise DataError(f"--samples '{path}' holds no image files")
        data = records[0].load()
    else:
        shards, _, _ = shard_list([str(path)])
        shard = read_shard(shards[0])
        first = next((s for s in shard.samples if s[1] is not None), None)
        if first is None:
            raise DataError(f"--samples '{path}': its first shard holds no image")
        data = bytes(shard.data[first[2]:first[2] + first[3]])
        shard.close()
    import io

    with Image.open(io.BytesIO(data)) as img:
        return min(img.size), 1 if img.mode in ("L", "I", "I;16", "1") else 3
