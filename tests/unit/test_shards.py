"""ddpm-shards: real image folders, tars and IDX files in, WebDataset shards + manifest out."""

import gzip
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli.shards import main
from shardkit import make_folder

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def read_out(out: Path, name: str) -> tuple[dict, list[list[dict]]]:
    """The manifest and, per shard, its samples as {key, ext: bytes, ...} in tar order."""
    manifest = json.loads((out / f"{name}-index.json").read_text())
    shards = []
    for entry in manifest["shardlist"]:
        samples = {}
        with tarfile.open(out / entry["url"]) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
        shards.append(list(samples.values()))
    return manifest, shards


def run(*argv) -> int:
    return main([str(a) for a in argv] + ["--quiet"])


def test_folder_shards_hold_every_image_once_with_labels(tmp_path):
    files = make_folder(tmp_path / "src")
    assert run(tmp_path / "src", tmp_path / "out", "--shard-size", 5, "--seed", 3) == 0
    manifest, shards = read_out(tmp_path / "out", "src")
    assert manifest["__kind__"] == "wids-shard-index-v1" and manifest["wids_version"] == 1
    assert [s["url"] for s in manifest["shardlist"]] == ["src-000000.tar", "src-000001.tar",
                                                         "src-000002.tar"]
    assert [s["nsamples"] for s in manifest["shardlist"]] == [len(s) for s in shards] == [5, 5, 2]
    classes = {"ant": 0, "cat": 1, "dog": 2}
    seen = []
    for sample in (s for shard in shards for s in shard):
        meta = json.loads(sample["json"])
        cls, data = files[meta["source"]]
        ext = meta["source"].rsplit(".", 1)[1]
        assert sample[ext] == data  # original bytes kept
        assert meta["label"] == cls and int(sample["cls"]) == classes[cls]
        seen.append(meta["source"])
    assert sorted(seen) == sorted(files)


def test_same_seed_same_bytes_other_seed_other_order(tmp_path):
    make_folder(tmp_path / "src")
    for out, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run(tmp_path / "src", tmp_path / out, "--seed", seed, "--shard-size", 4) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    def order(out):
        return [json.loads(s["json"])["source"] for shard in read_out(tmp_path / out, "src")[1]
                for s in shard]
    assert order("a") != order("c") and sorted(order("a")) == sorted(order("c"))


def test_stock_webdataset_reads_the_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    files = make_folder(tmp_path / "src")
    assert run(tmp_path / "src", tmp_path / "out", "--shard-size", 5, "--name", "pets") == 0
    urls = sorted(str(p) for p in (tmp_path / "out").glob("pets-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == len(files)
    for s in samples:
        image = s.get("jpg", s.get("png"))
        assert isinstance(image, Image.Image)
        assert isinstance(s["cls"], int) and s["json"]["label"] in ("ant", "cat", "dog")


def make_idx(directory: Path, n=30, rows=5, cols=7, prefix="train") -> tuple[np.ndarray, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, rows, cols), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, rows, cols) + images.tobytes())
    with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return images, labels


@pytest.mark.parametrize("point_at", ["directory", "file"])
def test_idx_images_become_lossless_png_with_labels(tmp_path, point_at):
    images, labels = make_idx(tmp_path / "tiny-mnist")
    source = tmp_path / "tiny-mnist"
    if point_at == "file":
        source = source / "train-images-idx3-ubyte.gz"
    assert run(source, tmp_path / "out", "--shard-size", 8, "--no-json") == 0
    manifest, shards = read_out(tmp_path / "out", "tiny-mnist")
    assert [s["nsamples"] for s in manifest["shardlist"]] == [8, 8, 8, 6]
    found = []
    for sample in (s for shard in shards for s in shard):
        assert set(sample) == {"__key__", "png", "cls"}
        img = Image.open(io.BytesIO(sample["png"]))
        assert img.mode == "L"
        arr = np.asarray(img)
        matches = [i for i in range(len(images)) if np.array_equal(images[i], arr)]
        assert len(matches) == 1 and int(sample["cls"]) == labels[matches[0]]
        found.append(matches[0])
    assert sorted(found) == list(range(len(images)))


def test_idx_test_split_and_fashion_names(tmp_path):
    make_idx(tmp_path / "fashion-mnist", n=12, prefix="t10k")
    assert run(tmp_path / "fashion-mnist", tmp_path / "out", "--split", "test") == 0
    _, shards = read_out(tmp_path / "out", "fashion-mnist")
    labels = {int(s["cls"]): json.loads(s["json"])["label"] for s in shards[0]}
    assert labels[0] == "T-shirt/top" and labels[9] == "Ankle boot"
    assert run(tmp_path / "fashion-mnist", tmp_path / "out2") == 2  # no train split here


def test_limit_and_per_class_are_balanced(tmp_path):
    make_folder(tmp_path / "src", counts={"a": 6, "b": 4, "c": 2})

    def label_counts(out):
        _, shards = read_out(tmp_path / out, "src")
        labels = [json.loads(s["json"])["label"] for shard in shards for s in shard]
        return {c: labels.count(c) for c in sorted(set(labels))}
    assert run(tmp_path / "src", tmp_path / "lim", "--limit", 7) == 0
    assert label_counts("lim") == {"a": 3, "b": 2, "c": 2}
    assert run(tmp_path / "src", tmp_path / "per", "--per-class", 3) == 0
    assert label_counts("per") == {"a": 3, "b": 3, "c": 2}


def test_image_size_reencodes_to_square(tmp_path):
    make_folder(tmp_path / "src")
    assert run(tmp_path / "src", tmp_path / "out", "--image-size", 8) == 0
    _, shards = read_out(tmp_path / "out", "src")
    for sample in shards[0]:
        source_ext = json.loads(sample["json"])["source"].rsplit(".", 1)[1]
        ext = "jpg" if source_ext == "jpg" else "png"
        assert Image.open(io.BytesIO(sample[ext])).size == (8, 8)


def test_tar_source_keeps_bytes_and_strips_top_directory(tmp_path):
    files = make_folder(tmp_path / "train")
    with tarfile.open(tmp_path / "train.tar", "w") as tar:
        tar.add(tmp_path / "train", arcname="train")
    assert run(tmp_path / "train.tar", tmp_path / "out", "--shard-size", 100) == 0
    _, shards = read_out(tmp_path / "out", "train")
    by_source = {json.loads(s["json"])["source"]: s for s in shards[0]}
    assert sorted(by_source) == sorted(f"train/{rel}" for rel in files)
    for rel, (cls, data) in files.items():
        sample = by_source[f"train/{rel}"]
        assert sample[rel.rsplit(".", 1)[1]] == data
        assert json.loads(sample["json"])["label"] == cls


@pytest.mark.parametrize("make_bad", [
    lambda p: p / "missing",
    lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt",
    lambda p: (p / "empty").mkdir() or p / "empty",
    lambda p: (p / "broken.tar").write_bytes(b"\0" * 100 + b"x" * 1000) and p / "broken.tar",
])
def test_bad_source_is_a_one_line_error(tmp_path, capsys, make_bad):
    source = make_bad(tmp_path)
    assert run(source, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-shards: error: ") and "\n" not in err
    assert "Traceback" not in err


def test_existing_shards_need_force(tmp_path, capsys):
    make_folder(tmp_path / "src")
    assert run(tmp_path / "src", tmp_path / "out", "--shard-size", 2) == 0
    assert run(tmp_path / "src", tmp_path / "out", "--shard-size", 6) == 2
    assert "--force" in capsys.readouterr().err
    assert run(tmp_path / "src", tmp_path / "out", "--shard-size", 6, "--force") == 0
    assert len(list((tmp_path / "out").glob("src-*.tar"))) == 2


@pytest.mark.skipif(not (DATASETS / "cifar10-jpg" / "train.tar").exists(),
                    reason=f"real datasets not present at {DATASETS}")
def test_cifar10_train_tar_subset(tmp_path):
    wds = pytest.importorskip("webdataset")
    source = DATASETS / "cifar10-jpg" / "train.tar"
    assert run(source, tmp_path, "--limit", 50, "--shard-size", 20) == 0
    manifest, shards = read_out(tmp_path, "train")
    assert [s["nsamples"] for s in manifest["shardlist"]] == [20, 20, 10]
    labels = [json.loads(s["json"])["label"] for shard in shards for s in shard]
    assert {labels.count(c) for c in set(labels)} == {5} and len(set(labels)) == 10
    urls = [str(tmp_path / s["url"]) for s in manifest["shardlist"]]
    images = [s["jpg"] for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")]
    assert len(images) == 50 and all(im.size == (32, 32) for im in images)
