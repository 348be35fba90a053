"""The data stream's building blocks on real tar shards: shard lists, sample counts, tar reading
as WebDataset reads it, decoding, and the device-side conversion."""

import gzip
import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import DataError, build_loader, decode_image, resolve_urls, to_model_input
from pipeline.cli.shards import main as ddpm_shards
from pipeline.data.urls import load_shard_counts
from pipeline.data.tario import read_shard
from shardkit import encode, id_image, id_shards, ids, write_shard, write_tar

REPO = Path(__file__).resolve().parents[2]


def epoch_ids(loader, total: int) -> list[int]:
    """Ids of one epoch from a one-stream loader with micro_batch_size 1."""
    return [ids(next(loader))[0] for _ in range(total)]


# ----------------------------------------------------------------------------- shard lists

def test_resolve_urls_brace_glob_list_dir_index(tmp_path):
    urls, _ = id_shards(tmp_path / "d", [1, 1, 1, 1], index=True)
    d = tmp_path / "d"
    assert resolve_urls(f"{d}/part-{{000000..000003}}.tar") == urls
    assert resolve_urls(f"{d}/part-00000[12].tar") == urls[1:3]
    assert resolve_urls(str(d)) == urls
    assert resolve_urls(d) == urls
    assert resolve_urls(str(d / "part-index.json")) == urls
    assert resolve_urls([f"{d}/part-000003.tar", f"{d}/part-{{000000..000001}}.tar"]) == \
        [urls[3], urls[0], urls[1]]
    assert resolve_urls(["pipe:cat x.tar", "https://h/x-{0..1}.tar"]) == \
        ["pipe:cat x.tar", "https://h/x-0.tar", "https://h/x-1.tar"]


@pytest.mark.parametrize("pattern", ["part-{000000..000009}.tar", "nothing-*.tar", "nodir/x.tar",
                                     "missing-index.json"])
def test_resolve_urls_names_missing_pattern(tmp_path, pattern):
    id_shards(tmp_path / "d", [1, 1])
    with pytest.raises(DataError) as e:
        resolve_urls(str(tmp_path / "d" / pattern))
    assert str(tmp_path / "d") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="no \\*.tar"):
        resolve_urls(str(tmp_path))  # a directory without shards


def test_counts_come_from_an_index_or_one_header_scan(tmp_path, caplog):
    sizes = [3, 7, 1, 5]
    scanned, _ = id_shards(tmp_path / "scan", sizes)
    indexed, _ = id_shards(tmp_path / "idx", sizes, index=True)
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        assert load_shard_counts(scanned, 0.05)[1].tolist() == sizes
    assert "counting the samples of 4 shards" in caplog.text
    caplog.clear()
    # a stale index is believed (no scan): the loader reports what differs when it reads
    lie = json.loads((tmp_path / "idx" / "part-index.json").read_text())
    lie["shardlist"][1]["nsamples"] = 9
    (tmp_path / "idx" / "part-index.json").write_text(json.dumps(lie))
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        assert load_shard_counts(str(tmp_path / "idx"), 0.05)[1].tolist() == [3, 9, 1, 5]
        assert load_shard_counts(str(tmp_path / "idx" / "part-index.json"), 0.05)[1].tolist() == \
            [3, 9, 1, 5]
    assert "counting" not in caplog.text


def test_ddpm_shards_output_is_read_through_its_index(tmp_path, caplog):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(7):
            (src / cls / f"{i}.png").write_bytes(id_image(i + (100 if cls == "b" else 1)))
    assert ddpm_shards([str(src), str(tmp_path / "out"), "--shard-size", "4", "--quiet"]) == 0
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        loader = build_loader(str(tmp_path / "out"), image_size=8, channels=1,
                              micro_batch_size=1, num_workers=0, seed=0)
    assert "counting" not in caplog.text  # the manifest gave the counts
    assert sorted(epoch_ids(loader, 14)) == list(range(1, 8)) + list(range(100, 107))


# ----------------------------------------------------------------------------- shards by others

def test_keys_and_fields_are_grouped_as_webdataset_groups_them(tmp_path):
    wds = pytest.importorskip("webdataset")
    jpg = encode(np.full((8, 8, 3), 200, dtype=np.uint8), fmt="JPEG")
    png = id_image(7)
    members = [  # img2dataset, ShardWriter with dotted keys, directories, upper case, junk
        ("000010000.jpg", jpg), ("000010000.txt", b"a caption"), ("000010000.json", b"{}"),
        ("dir/sub.file.jpg", jpg), ("dir/sub.cls", b"3"),
        ("a.b.c.webp", encode(np.zeros((8, 8, 3), dtype=np.uint8), fmt="WEBP")),
        ("README", b"not a sample"), (".hidden.jpg", jpg), ("x/.h.png", png),
        ("captiononly.txt", b"no image here"), ("UPPER.JPEG", jpg), ("__meta__/x.jpg", jpg),
        ("both.png", png), ("both.jpg", jpg),  # jpg wins: it comes first in IMAGE_EXTS
    ]
    url = write_tar(tmp_path / "others.tar", members)
    theirs = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
              for s in wds.WebDataset(url, shardshuffle=False)]
    ours = read_shard(url).samples
    assert [key for key, *_ in ours] == [key for key, _ in theirs]
    assert [ext for _, ext, *_ in ours] == ["jpg", "jpg", "webp", "png", None, "jpeg", "jpg"]
    assert ours[4][4] == ("txt",)  # the fields of a sample without image, for the log


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, "gzip"])
def test_long_names_pax_headers_and_gzip_shards(tmp_path, fmt):
    long_dir = "d" * 150 + "/ünïcode"
    members = [(f"{long_dir}/{i:03d}.png", id_image(i)) for i in range(1, 6)]
    url = write_tar(tmp_path / "x.tar", members, fmt=tarfile.GNU_FORMAT if fmt == "gzip" else fmt)
    if fmt == "gzip":
        raw = (tmp_path / "x.tar").read_bytes()
        (tmp_path / "x.tar").write_bytes(gzip.compress(raw))
    shard = read_shard(url)
    assert shard.problem is None
    assert [key for key, *_ in shard.samples] == [f"{long_dir}/{i:03d}" for i in range(1, 6)]
    loader = build_loader(url, image_size=8, channels=1, micro_batch_size=1, num_workers=0, seed=0)
    assert sorted(epoch_ids(loader, 5)) == [1, 2, 3, 4, 5]


def test_labels_and_extra_members_are_optional(tmp_path):
    samples = [("a", {"png": id_image(1)}),
               ("b", {"png": id_image(2), "cls": b"1", "json": b"{}", "txt": b"caption"}),
               ("c", {"jpeg": encode(np.zeros((8, 8), dtype=np.uint8), fmt="JPEG")})]
    url = write_shard(tmp_path / "x.tar", samples)
    loader = build_loader(url, image_size=8, channels=1, micro_batch_size=3, num_workers=0, seed=0)
    assert sorted(ids(next(loader))) == [0, 1, 2]
    assert loader.stats()["skipped_samples"] == 0


# ----------------------------------------------------------------------------- decoding

def test_mixed_modes_and_sizes_become_the_requested_shape():
    rng = np.random.default_rng(0)
    rgb32 = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    images = {
        "rgb": ("png", encode(rgb32)),
        "gray": ("png", encode(gray)),
        "jpeg": ("jpg", encode(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), fmt="JPEG")),
        "big_jpeg": ("jpg", encode(rng.integers(0, 256, (128, 96, 3), dtype=np.uint8), fmt="JPEG")),
        "rgba": ("png", encode(rng.integers(0, 256, (64, 48, 4), dtype=np.uint8), mode="RGBA")),
        "pal": ("png", _palette_png()),
        "graypeg": ("jpeg", encode(gray, fmt="JPEG")),
        "webp": ("webp", encode(rgb32, fmt="WEBP")),
    }
    for channels in (3, 1):
        got = {k: decode_image(data, ext, 32, channels) for k, (ext, data) in images.items()}
        for key, image in got.items():
            assert image.dtype == np.uint8 and image.shape == (32, 32, channels), key
        if channels == 3:
            assert np.array_equal(got["rgb"], rgb32)                      # same size: untouched
            assert np.array_equal(got["gray"][..., 0], got["gray"][..., 2])  # gray -> RGB
        else:
            expected = np.asarray(Image.fromarray(rgb32).convert("L"))
            assert np.array_equal(got["rgb"][..., 0], expected)           # RGB -> L


def _palette_png() -> bytes:
    img = Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20) % 200).convert("P")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_batches_leave_the_workers_as_uint8(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    url = write_shard(tmp_path / "x.tar", [(f"k{i}", {"png": encode(rgb)}) for i in range(8)])
    loader = build_loader(url, image_size=16, channels=3, micro_batch_size=4, num_workers=1,
                          seed=0)
    batch = next(loader)
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 16, 16)
    assert torch.equal(batch[0], torch.from_numpy(rgb).permute(2, 0, 1))
    x = to_model_input(batch, "cpu", random_flip=False)
    assert torch.allclose(x[0], torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1)


def test_to_model_input_range_and_seeded_flips():
    batch = torch.randint(0, 256, (64, 3, 4, 5), dtype=torch.uint8)
    batch[0] = 0
    batch[1] = 255
    x = to_model_input(batch, "cpu", random_flip=False)
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert x[0].eq(-1).all() and x[1].eq(1).all() and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x, batch.float() / 127.5 - 1)
    a = to_model_input(batch, "cpu", generator=torch.Generator().manual_seed(3))
    b = to_model_input(batch, "cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(a[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


# ----------------------------------------------------------------------------- the benchmark

def test_data_speed_benchmark_runs_quick(tmp_path):
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(REPO / "bench/data_speed.py"), "--quick",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"ours", "webdataset", "imagefolder"} <= set(result["rates"])
    assert all(r["images_per_s"] > 0 for r in result["rates"].values())
    assert [r["at_batch"] for r in result["resume"]] == [2, 70]  # early, and 3.5 epochs in
