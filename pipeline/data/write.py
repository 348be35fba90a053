"""`ddpm-shards`: pack images into shuffled WebDataset tar shards plus a manifest.

Sources (SOURCE on the command line):

- an image folder laid out ``<class>/<file>`` (files directly in SOURCE are unlabelled);
- a tar of such a folder, optionally under one top directory (``train/<class>/0000.jpg``);
  read in one streaming pass; plain tars are re-read by offset, compressed ones are held in memory;
- IDX files of the MNIST family: the ``*-images-idx3-ubyte.gz`` file itself, or a directory
  holding ``<split>-images-idx3-ubyte.gz`` and ``<split>-labels-idx1-ubyte.gz``
  (``--split train`` -> ``train-*``, ``--split test`` -> ``t10k-*``); each image is stored as PNG.

Output: ``OUT_DIR/<name>-000000.tar, ...`` with, per sample, ``KEY.<ext>`` (the original image
bytes unless ``--image-size`` re-encodes them), ``KEY.cls`` (label index, ASCII) and ``KEY.json``
(label name and source), and ``OUT_DIR/<name>-index.json`` in the wids shard-index format with
each shard's sample count. Class names map to indices in sorted order (IDX keeps its labels).
The same SOURCE and ``--seed`` give byte-identical shards.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shutil
import stat
import struct
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pipeline.errors import UserError
from pipeline.data.decode import IMAGE_EXTS, resize_center_crop, to_8bit


LOSSY_EXTS = ("jpg", "jpeg", "webp")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed so the shard bytes are reproducible
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")


# ----------------------------------------------------------------------------- reading sources

@dataclass
class Record:
    """One source image: where it came from, its label, and how to get its bytes."""

    source: str          # path inside SOURCE (for the json member and messages)
    label: str | None    # class name, None when unlabelled
    ext: str             # lower-case image extension of the bytes `load` returns
    load: Callable[[], bytes]
    cls: int | None = None  # label index fixed by the source (IDX); else from sorted names


def _ext_of(name: str) -> str | None:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext if ext in IMAGE_EXTS else None


def _class_of(rel: str) -> str | None:
    """Class of a path relative to the folder root: its parent directory name, if any."""
    parts = rel.split("/")
    return parts[-2] if len(parts) >= 2 else None


def read_folder(root: Path) -> list[Record]:
    records = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            ext = _ext_of(fname)
            if ext is None or fname.startswith("."):
                continue
            path = Path(dirpath) / fname
            rel = path.relative_to(root).as_posix()
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                regular = False
            if not regular:  # a FIFO or device would block the read forever; a dangling link fails
                print(f"ddpm-shards: skipping {path}: not a regular file", file=sys.stderr)
                continue
            records.append(Record(rel, _class_of(rel), ext, path.read_bytes))
    return records


def read_tar(path: Path) -> list[Record]:
    with open(path, "rb") as f:
        compressed = f.read(6).startswith(_COMPRESSED_MAGIC)
    records = []
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                ext = _ext_of(m.name)
                if not m.isfile() or ext is None or Path(m.name).name.startswith("."):
                    continue
                if compressed:  # no random access: keep the bytes
                    data = tar.extractfile(m).read()
                    load = (lambda d=data: d)
                else:
                    load = (lambda o=m.offset_data, n=m.size: _read_at(path, o, n))
                records.append(Record(m.name, None, ext, load))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot read tar {str(path)!r}: {e}") from None
    # Classes: the parent directory; a single top directory (e.g. 'train/') is not a class.
    tops = {r.source.split("/")[0] for r in records}
    strip = len(tops) == 1 and all(r.source.count("/") >= 2 for r in records)
    for r in records:
        rel = r.source.split("/", 1)[1] if strip else r.source
        r.label = _class_of(rel)
    return records


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {str(path)!r}: {e}") from None
    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != magic:
        raise UserError(f"{str(path)!r} is not an IDX file with magic 0x{magic:08x}")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise UserError(f"IDX file {str(path)!r}: header says {dims}, found {arr.size} bytes")
    return arr.reshape(dims)


def _encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def read_idx(images_path: Path) -> list[Record]:
    labels_path = Path(str(images_path).replace("-images-idx3-ubyte", "-labels-idx1-ubyte"))
    images = _read_idx(images_path, 0x00000803)
    labels = _read_idx(labels_path, 0x00000801) if labels_path.exists() else None
    if labels is not None and len(labels) != len(images):
        raise UserError(f"{labels_path.name} has {len(labels)} labels for {len(images)} images")
    fashion = "fashion" in str(images_path.resolve()).lower()
    names = FASHION_MNIST_CLASSES if fashion else tuple(str(i) for i in range(256))
    records = []
    for i in range(len(images)):
        cls = None if labels is None else int(labels[i])
        records.append(Record(f"{images_path.name}#{i}", None if cls is None else names[cls],
                              "png", (lambda a=images[i]: _encode_png(a)), cls))
    return records


def open_source(source: Path, split: str) -> tuple[list[Record], str]:
    """Records of SOURCE and the default shard name."""
    if not source.exists():
        raise UserError(f"SOURCE {str(source)!r} does not exist")
    if source.is_dir():
        idx_prefix = {"train": "train", "test": "t10k"}[split]
        idx = source / f"{idx_prefix}-images-idx3-ubyte.gz"
        if not idx.exists():
            idx = source / f"{idx_prefix}-images-idx3-ubyte"
        if idx.exists():
            return read_idx(idx), source.resolve().name
        if any(source.glob("*-images-idx3-ubyte*")):
            raise UserError(f"{str(source)!r} holds IDX files but none for split {split!r}")
        return read_folder(source), source.resolve().name
    if "-images-idx3-ubyte" in source.name:
        return read_idx(source), source.resolve().parent.name
    if tarfile.is_tarfile(source) or source.name.endswith((".tar", ".tar.gz", ".tgz")):
        return read_tar(source), source.name.split(".")[0]
    raise UserError(f"SOURCE {str(source)!r}: unknown layout (expected an image folder "
                    "'<class>/<file>', a tar of one, or an IDX '*-images-idx3-ubyte.gz' file)")


# ----------------------------------------------------------------------------- selecting, writing

def select(records: list[Record], rng: np.random.Generator, *, limit: int | None,
           per_class: int | None) -> list[Record]:
    """A class-balanced random subset (up to `per_class` of each class, `limit` in all,
    taken round-robin over the classes), in shuffled order."""
    by_class: dict[str | None, list[Record]] = {}
    for r in records:
        by_class.setdefault(r.label, []).append(r)
    classes = sorted(by_class, key=lambda c: (c is None, c or ""))
    queues = []
    for c in classes:
        group = by_class[c]
        order = rng.permutation(len(group))
        if per_class is not None:
            order = order[:per_class]
        queues.append([group[i] for i in order])
    if limit is None:
        chosen = [r for q in queues for r in q]
    else:
        chosen, depth = [], 0
        while len(chosen) < limit and any(depth < len(q) for q in queues):
            for q in queues:
                if depth < len(q) and len(chosen) < limit:
                    chosen.append(q[depth])
            depth += 1
    return [chosen[i] for i in rng.permutation(len(chosen))]


def _reencode(data: bytes, ext: str, size: int) -> tuple[bytes, str]:
    img = to_8bit(Image.open(io.BytesIO(data)))
    img.load()
    if img.mode not in ("L", "RGB", "RGBA", "LA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    img = resize_center_crop(img, size)
    buf = io.BytesIO()
    if ext in LOSSY_EXTS:
        img.convert("L" if img.mode in ("L", "LA") else "RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg"
    img.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = "ddpm"
    tar.addfile(info, io.BytesIO(data))


def write_shards(records: list[Record], out_dir: Path, name: str, *, shard_size: int,
                 class_index: dict[str, int], write_json: bool, image_size: int | None,
                 progress: bool) -> list[dict]:
    """Write the records in order into shards of `shard_size` samples; returns the shardlist."""
    from tqdm import tqdm

    shardlist = []
    bar = tqdm(total=len(records), unit="img", desc=f"{name} shards", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    for shard_no, start in enumerate(range(0, len(records), shard_size)):
        fname = f"{name}-{shard_no:06d}.tar"
        tmp = out_dir / f".{fname}.tmp"
        chunk = records[start:start + shard_size]
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, r in enumerate(chunk):
                key = f"{start + i:08d}"
                try:
                    data = r.load()
                    ext = r.ext
                    if image_size is not None:
                        data, ext = _reencode(data, ext, image_size)
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    tmp.unlink(missing_ok=True)
                    raise UserError(f"cannot read image {r.source!r}: {e}") from None
                _add_member(tar, f"{key}.{ext}", data)
                if r.label is not None:
                    _add_member(tar, f"{key}.cls", str(class_index[r.label]).encode())
                if write_json:
                    meta = {"label": r.label, "source": r.source}
                    _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                bar.update(1)
        os.replace(tmp, out_dir / fname)
        shardlist.append({"url": fname, "nsamples": len(chunk)})
    bar.close()
    return shardlist


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddpm-shards",
        description="Pack images into shuffled WebDataset tar shards (OUT_DIR/NAME-000000.tar, ...)\n"
                    "and a manifest with per-shard sample counts (OUT_DIR/NAME-index.json).\n"
                    "The same SOURCE and --seed give byte-identical shards.",
        epilog="Examples:\n"
               "  ddpm-shards cifar10-jpg/train.tar data/cifar10 --shard-size 1000\n"
               "  ddpm-shards fashion-mnist/ data/fmnist --per-class 250 --no-json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", type=Path,
                   help="image folder (<class>/<file>), a tar of one, or IDX images (.gz file or "
                        "a directory holding <split>-images-idx3-ubyte.gz + labels)")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="where shards and manifest go")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N",
                   help="samples per shard (default 1000; the last shard holds the remainder)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the subset choice and the shuffle (default 0)")
    p.add_argument("--image-size", type=int, default=None, metavar="P",
                   help="resize shorter side + centre-crop to PxP and re-encode "
                        "(PNG for lossless sources, JPEG q95 for JPEG); default: keep bytes")
    p.add_argument("--name", default=None,
                   help="shard name prefix (default: SOURCE's stem, e.g. 'train')")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="take at most N images in all, balanced over classes")
    p.add_argument("--per-class", type=int, default=None, metavar="N",
                   help="take at most N images of each class")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="which IDX split to read from a directory (default train)")
    p.add_argument("--no-json", dest="write_json", action="store_false",
                   help="omit the KEY.json member (label name, source path)")
    p.add_argument("--force", action="store_true",
                   help="replace shards of the same name already in OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> dict:
    """Make the shards; returns the manifest."""
    for opt in ("shard_size", "image_size", "limit", "per_class"):
        value = getattr(args, opt)
        if value is not None and value < 1:
            raise UserError(f"--{opt.replace('_', '-')} must be >= 1, got {value}")
    records, default_name = open_source(args.source, args.split)
    name = args.name or default_name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(f"shard name {name!r} must be letters, digits, '_', '.', '-' (use --name)")
    if not records:
        raise UserError(f"SOURCE {str(args.source)!r} holds no images ({', '.join(IMAGE_EXTS)})")

    rng = np.random.default_rng(args.seed)
    labels = sorted({r.label for r in records if r.label is not None})
    if any(r.cls is not None for r in records):  # IDX: keep the file's label indices
        class_index = {r.label: r.cls for r in records if r.cls is not None}
    else:
        class_index = {c: i for i, c in enumerate(labels)}
    chosen = select(records, rng, limit=args.limit, per_class=args.per_class)

    out_dir = args.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"OUT_DIR {str(out_dir)!r} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    old = [p for p in out_dir.iterdir() if re.fullmatch(re.escape(name) + r"-\d{6}\.tar", p.name)]
    if old and not args.force:
        raise UserError(f"OUT_DIR {str(out_dir)!r} already holds {len(old)} '{name}-*.tar' shards "
                        "(use --force to replace them, or --name)")

    # Everything is written into a staging folder first; the old shards are replaced only once
    # every new shard and the index are complete, so a source that fails halfway costs nothing.
    staging = out_dir / f".{name}-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        try:
            shardlist = write_shards(chosen, staging, name, shard_size=args.shard_size,
                                     class_index=class_index, write_json=args.write_json,
                                     image_size=args.image_size, progress=not args.quiet)
        except (OSError, UserError) as e:
            kept = f"; the {len(old)} '{name}-*.tar' shards already in OUT_DIR are unchanged" if old else ""
            if isinstance(e, OSError):
                e = UserError(f"reading SOURCE {str(args.source)!r} failed ({e.strerror or e}: "
                              f"{getattr(e, 'filename', '') or ''})")
            raise UserError(f"{e}{kept}") from None
        manifest = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name,
                    "shardlist": shardlist}
        index = f"{name}-index.json"
        (staging / index).write_text(json.dumps(manifest, indent=1) + "\n")
        for f in [*(staging / s["url"] for s in shardlist), staging / index]:
            os.replace(f, out_dir / f.name)  # each file replaced atomically; the index last
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    new = {s["url"] for s in shardlist}
    for p in old:
        if p.name not in new:
            p.unlink()
    return manifest
