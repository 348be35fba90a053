"""The training data stream, on real tar shards written here."""

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import DataError, ShardStream, build_loader, resolve_urls, to_model_input


def png(arr: np.ndarray, mode=None, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def id_image(i: int, size=8) -> bytes:
    """A gray PNG whose every pixel is `i`: batches then tell which samples they hold."""
    return png(np.full((size, size), i, dtype=np.uint8))


def write_shard(path: Path, samples) -> str:
    """samples: [(key, {ext: bytes})] -> a tar shard at `path`."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def id_shards(directory: Path, sizes) -> tuple[list[str], int]:
    """Shards of id images (ids 1..N, unique over all shards) with the given sample counts."""
    directory.mkdir(exist_ok=True)
    urls, next_id = [], 1
    for n, size in enumerate(sizes):
        samples = [(f"s{n}_{i}", {"png": id_image(next_id + i), "cls": b"0"}) for i in range(size)]
        urls.append(write_shard(directory / f"part-{n:06d}.tar", samples))
        next_id += size
    return urls, next_id - 1


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0, 0, 0].tolist()


# ----------------------------------------------------------------------------- resolve_urls

def test_resolve_urls_brace_glob_list_dir(tmp_path):
    urls, _ = id_shards(tmp_path / "d", [1, 1, 1, 1])
    d = tmp_path / "d"
    assert resolve_urls(f"{d}/part-{{000000..000003}}.tar") == urls
    assert resolve_urls(f"{d}/part-00000[12].tar") == urls[1:3]
    assert resolve_urls(str(d)) == urls
    assert resolve_urls(d) == urls
    assert resolve_urls([f"{d}/part-000003.tar", f"{d}/part-{{000000..000001}}.tar"]) == \
        [urls[3], urls[0], urls[1]]
    assert resolve_urls(["pipe:cat x.tar", "https://h/x-{0..1}.tar"]) == \
        ["pipe:cat x.tar", "https://h/x-0.tar", "https://h/x-1.tar"]


@pytest.mark.parametrize("pattern", ["part-{000000..000009}.tar", "nothing-*.tar", "nodir/x.tar"])
def test_resolve_urls_names_missing_pattern(tmp_path, pattern):
    id_shards(tmp_path / "d", [1, 1])
    with pytest.raises(DataError) as e:
        resolve_urls(str(tmp_path / "d" / pattern))
    assert str(tmp_path / "d") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="no \\*.tar"):
        resolve_urls(str(tmp_path))  # a directory without shards


# ----------------------------------------------------------------------------- decoding

def test_mixed_modes_and_sizes_become_requested_shape(tmp_path):
    rng = np.random.default_rng(0)
    rgb32 = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    samples = [
        ("rgb", {"png": png(rgb32)}),
        ("gray", {"png": png(gray)}),
        ("jpeg", {"jpg": png(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), fmt="JPEG")}),
        ("rgba", {"png": png(rng.integers(0, 256, (64, 48, 4), dtype=np.uint8), mode="RGBA")}),
        ("pal", {"png": _palette_png()}),
        ("graypeg", {"jpeg": png(gray, fmt="JPEG"), "json": b"{}"}),
    ]
    urls = [write_shard(tmp_path / "a.tar", samples)]
    for channels in (3, 1):
        stream = ShardStream(urls, image_size=32, channels=channels, batch_size=1, seed=0)
        got = {}
        for _, _, key, image in stream.samples(0, 1):
            if key in got:
                break
            got[key] = image
        assert sorted(got) == sorted(k for k, _ in samples)
        for key, image in got.items():
            assert image.dtype == np.uint8 and image.shape == (channels, 32, 32), key
        if channels == 3:
            assert np.array_equal(got["rgb"], rgb32.transpose(2, 0, 1))  # same size: untouched
            assert np.array_equal(got["gray"][0], got["gray"][2])       # gray -> RGB
        else:
            expected = np.asarray(Image.fromarray(rgb32).convert("L"))
            assert np.array_equal(got["rgb"][0], expected)               # RGB -> L

    loader = build_loader(urls, image_size=16, channels=1, micro_batch_size=4, num_workers=0,
                          seed=0)
    batch = next(loader)
    assert batch.dtype == torch.uint8 and batch.shape == (4, 1, 16, 16) and batch.is_contiguous()


def _palette_png() -> bytes:
    img = Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20) % 200).convert("P")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- distribution

SIZES = [5, 3, 8, 1, 6, 4, 2, 7, 3]  # uneven on purpose


def epoch_items(stream: ShardStream, s: int, num_streams: int, epoch: int = 0):
    out = []
    for e, url, key, image in stream.samples(s, num_streams):
        if e > epoch:
            return out
        if e == epoch:
            out.append((url, key, int(image[0, 0, 0])))


@pytest.mark.parametrize("sizes", [SIZES, [4, 9, 2]], ids=["more-shards", "fewer-shards"])
def test_each_epoch_sees_every_sample_once_across_ranks_and_workers(tmp_path, sizes):
    urls, total = id_shards(tmp_path / "d", sizes)
    world_size, num_workers = 2, 2
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            for worker in range(num_workers):
                stream = ShardStream(urls, image_size=8, channels=1, batch_size=2, seed=5,
                                     rank=rank, world_size=world_size)
                items = epoch_items(stream, rank * num_workers + worker,
                                    world_size * num_workers, epoch)
                assert items, "every stream yields"
                seen += items
        assert sorted(i for _, _, i in seen) == list(range(1, total + 1))
    # and the order differs between epochs
    stream = ShardStream(urls, image_size=8, channels=1, batch_size=2, seed=5)
    assert epoch_items(stream, 0, 1, 0) != epoch_items(
        ShardStream(urls, image_size=8, channels=1, batch_size=2, seed=5), 0, 1, 1)


def test_two_ranks_of_two_workers_through_the_real_loader(tmp_path, caplog):
    """batch size 1: batch k comes from worker k % 2, so each stream's epoch can be demuxed."""
    urls, total = id_shards(tmp_path / "d", SIZES)
    world_size, num_workers, seed = 2, 2, 11
    seen = []
    for rank in range(world_size):
        loader = build_loader(urls, image_size=8, channels=1, micro_batch_size=1,
                              num_workers=num_workers, seed=seed, rank=rank, world_size=world_size)
        batches = [ids(next(loader))[0] for _ in range(2 * (total + 2))]
        for worker in range(num_workers):
            s = rank * num_workers + worker
            plan = loader.dataset.shard_plan(0, s, world_size * num_workers)
            count = sum(SIZES[shard] for shard, _, _ in plan)
            seen += batches[worker::num_workers][:count]
    assert sorted(seen) == list(range(1, total + 1))


def test_fewer_shards_than_streams_warns_and_does_not_hang(tmp_path, caplog):
    urls, total = id_shards(tmp_path / "d", [6])
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        loaders = [build_loader(urls, image_size=8, channels=1, micro_batch_size=1, num_workers=2,
                                seed=0, rank=r, world_size=2) for r in range(2)]
    assert "only 1 shards for 4 streams" in caplog.text
    seen = []
    for rank, loader in enumerate(loaders):
        batches = [ids(next(loader))[0] for _ in range(8)]
        for worker in range(2):
            (_, part, parts), = loader.dataset.shard_plan(0, rank * 2 + worker, 4)
            seen += batches[worker::2][:len(range(part, total, parts))]
    assert sorted(seen) == list(range(1, total + 1))


# ----------------------------------------------------------------------------- to_model_input

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


# ----------------------------------------------------------------------------- bad data

def test_corrupt_images_and_broken_shards_are_skipped_and_counted(tmp_path, caplog):
    d = tmp_path / "d"
    urls, total = id_shards(d, [3, 4])
    good_jpeg = png(np.zeros((8, 8, 3), dtype=np.uint8), fmt="JPEG")
    urls.append(write_shard(d / "bad-samples.tar", [
        ("ok", {"png": id_image(total + 1)}),
        ("corrupt", {"jpg": good_jpeg[: len(good_jpeg) // 2] + b"\x00" * 7}),
        ("garbage", {"png": b"not an image at all"}),
        ("noimage", {"cls": b"3", "json": b"{}"}),
    ]))
    whole = (d / "part-000001.tar").read_bytes()
    (d / "truncated.tar").write_bytes(whole[: len(whole) // 2 + 100])
    (d / "notatar.tar").write_bytes(b"hello world" * 100)
    urls += [str(d / "truncated.tar"), str(d / "notatar.tar")]

    stream = ShardStream(urls, image_size=8, channels=1, batch_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        items = epoch_items(stream, 0, 1)
    assert sorted(i for _, _, i in items) == list(range(1, total + 2))
    state = stream.state_dict()
    assert state["skipped_samples"] == 3 and state["failed_shards"] == 2
    for name in ("corrupt", "garbage", "noimage", "truncated.tar", "notatar.tar", "bad-samples.tar"):
        assert name in caplog.text

    loader = build_loader(urls, image_size=8, channels=1, micro_batch_size=2, num_workers=1,
                          seed=0)
    for _ in range(total):  # two epochs
        next(loader)
    stats = loader.stats()
    assert stats["skipped_samples"] >= 3 and stats["failed_shards"] >= 2


def test_an_epoch_without_samples_is_an_error_not_a_hang(tmp_path):
    d = tmp_path / "d"
    urls, _ = id_shards(d, [3])
    whole = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(whole[:700])
    for workers in (0, 1):
        loader = build_loader(urls, image_size=8, channels=1, micro_batch_size=1,
                              num_workers=workers, seed=0)
        with pytest.raises(DataError) as e:
            next(loader)
        message = str(e.value)
        assert "part-000000.tar" in message and "no readable sample" in message
        assert "\n" not in message and "Traceback" not in message
        with pytest.raises(DataError, match="no readable sample"):
            next(loader)  # stays failed


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resumes_the_exact_next_batches(tmp_path, num_workers):
    urls, total = id_shards(tmp_path / "d", SIZES)
    kwargs = dict(image_size=8, channels=1, micro_batch_size=3, num_workers=num_workers, seed=7,
                  rank=1, world_size=2)
    straight = build_loader(urls, **kwargs)
    k, more = 7, 2 * total // 3  # enough to cross shard and epoch ends
    before = [next(straight) for _ in range(k)]
    state = json.loads(json.dumps(straight.state_dict()))  # plain data: fits any checkpoint
    after = [next(straight) for _ in range(more)]

    resumed = build_loader(urls, **kwargs)
    resumed.load_state_dict(state)
    again = [next(resumed) for _ in range(more)]
    assert [ids(b) for b in again] == [ids(b) for b in after]
    assert all(torch.equal(a, b) for a, b in zip(again, after))
    assert [ids(b) for b in before] != [ids(b) for b in after[:k]]

    # a fresh loader with no state starts from the beginning, and the global RNG is left alone
    torch.manual_seed(0)
    fresh = build_loader(urls, **kwargs)
    assert [ids(next(fresh)) for _ in range(k)] == [ids(b) for b in before]
    fresh.load_state_dict(fresh.state_dict())
    next(fresh)  # restarts the workers
    drawn = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(3))

    if num_workers:
        for change in ({"num_workers": 1}, {"rank": 0}):
            other = build_loader(urls, **{**kwargs, **change})
            with pytest.raises(DataError, match="cannot resume"):
                other.load_state_dict(state)
