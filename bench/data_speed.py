"""Data loading speed: our shard stream against stock loaders, on the same JPEG files, one run.

    python bench/data_speed.py                      # 10,000 CIFAR-10 JPEGs, 1 worker each
    python bench/data_speed.py --workers 2 --images 20000
    python bench/data_speed.py --quick              # synthetic JPEGs, seconds (what the tests run)

Every loader turns the same 32x32 JPEG files into uint8 batches (B, 3, 32, 32) in DataLoader
worker processes; the rate is measured in the training process, after the first two batches
(worker start-up), so with --workers 1 it is the per-worker rate. Also reported: images per
CPU-second of the workers, which a busy (shared) machine disturbs much less than the wall rate.

  ours         pipeline.data.build_loader on the shards (simplejpeg, batches built in the worker)
  webdataset   stock webdataset: WebDataset(urls).decode("pil").to_tuple("jpg"), PIL -> uint8
               tensor per sample, default collation into batches, split by worker
  imagefolder  torchvision's ImageFolder + DataLoader re-implemented in a few lines (torchvision is
               not installed on the CPU machine): a Dataset over the extracted <class>/<file>.jpg
               files whose __getitem__ opens the file with PIL, converts to RGB and makes a uint8
               tensor (what ImageFolder with transforms.PILToTensor does); shuffled, batched by
               collation. Where torchvision imports, the real one runs too
               (imagefolder_torchvision).

Resume: the time from `load_state_dict` to the first batch of a fresh loader, at an early and a
late position (several epochs in), next to what skipping to that position by replaying the
stream would cost at the measured rate.

Shards: --shards DIR (with an index), else made once with ddpm-shards from the CIFAR-10 tar into
/tmp/ddpm-data-speed/ (or, for --quick, from synthetic JPEGs).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.loader import build_loader  # noqa: E402
from pipeline.cli.shards import main as ddpm_shards  # noqa: E402

CIFAR_TAR = REPO.parent / "shared" / "datasets" / "cifar10-jpg" / "train.tar"


# ----------------------------------------------------------------------------- inputs

def make_shards(work: Path, images: int, quick: bool) -> Path:
    out = work / ("quick-shards" if quick else f"cifar-{images}-nojson")
    if (out / "train-index.json").exists() or (out / "synthetic-index.json").exists():
        return out
    if quick or not CIFAR_TAR.exists():
        src = work / "synthetic"
        rng = np.random.default_rng(0)
        for i in range(images):
            cls = src / f"c{i % 10}"
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                cls / f"{i:05d}.jpg", quality=75)
        args = [str(src), str(out), "--name", "synthetic"]
    else:
        args = [str(CIFAR_TAR), str(out), "--limit", str(images)]
    # --no-json: .jpg and .cls only, so the stock loader decodes no metadata it does not need
    assert ddpm_shards(args + ["--shard-size", str(max(64, images // 10)), "--no-json", "--quiet"]) == 0
    return out


def extract_folder(shards: list[str], out: Path) -> Path:
    """The shards' JPEG files as an ImageFolder tree <class>/<key>.jpg (same bytes)."""
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    for url in shards:
        with tarfile.open(url) as tar:
            members = {m.name: m for m in tar}
            for name, m in members.items():
                if name.endswith(".jpg"):
                    key = name[:-4]
                    cls = tar.extractfile(members[key + ".cls"]).read().decode()
                    (tmp / cls).mkdir(parents=True, exist_ok=True)
                    (tmp / cls / name).write_bytes(tar.extractfile(m).read())
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------- baselines

def _pil_to_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W), as PILToTensor


class FolderDataset(torch.utils.data.Dataset):
    """torchvision.datasets.ImageFolder's behaviour: sorted classes, pil_loader, a transform."""

    def __init__(self, root: Path):
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [(str(f), i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return _pil_to_uint8(img), target


def stock_webdataset(urls: list[str], batch: int, workers: int):
    import webdataset as wds

    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker, empty_check=False)
          .decode("pil").to_tuple("jpg", "cls").map_tuple(_pil_to_uint8, int).repeat())
    return iter(torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers))


def imagefolder(root: Path, batch: int, workers: int):
    ds = FolderDataset(root)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True,
                                         drop_last=True, persistent_workers=workers > 0)

    def endless():
        while True:
            yield from loader
    return endless()


def torchvision_imagefolder(root: Path, batch: int, workers: int):
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(str(root), transform=transforms.PILToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True,
                                         drop_last=True, persistent_workers=workers > 0)

    def endless():
        while True:
            yield from loader
    return endless()


def ours(shards: Path, batch: int, workers: int):
    return build_loader(str(shards), image_size=32, channels=3, micro_batch_size=batch,
                        num_workers=workers, seed=0)


# ----------------------------------------------------------------------------- measuring

def rate(make, images: int, batch: int, workers: int) -> dict:
    """Images/s over `images` images after two warm-up batches (worker start-up), and images per
    CPU-second of the workers (their whole life, start-up included; on a busy machine the wall
    rate falls with the CPU share the workers get, this one much less)."""
    cpu_before = os.times()
    batches = make()
    first = next(batches)
    x = first[0] if isinstance(first, (list, tuple)) else first
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (3, 32, 32), (x.dtype, x.shape)
    next(batches)
    n, start = 0, time.perf_counter()
    while n < images:
        n += batch
        next(batches)
    seconds = time.perf_counter() - start
    result = {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds)}
    if workers:
        del batches, first, x  # stops and reaps the workers, so that their CPU time is counted
        gc.collect()
        cpu_after = os.times()
        worker_cpu_s = (cpu_after.children_user - cpu_before.children_user
                        + cpu_after.children_system - cpu_before.children_system)
        # the workers made the warm-up, the measured and up to 2 prefetched batches per worker
        made = n + (3 + 2 * workers) * batch
        result["images_per_worker_cpu_s"] = round(made / max(worker_cpu_s, 1e-9))
    return result


def resume_time(shards: Path, batch: int, workers: int, at_batches: int, rate_per_s: float) -> dict:
    loader = ours(shards, batch, workers)
    for _ in range(at_batches):
        next(loader)
    state = loader.state_dict()
    expected = next(loader)
    loader.close()
    fresh = ours(shards, batch, workers)
    start = time.perf_counter()
    fresh.load_state_dict(state)
    got = next(fresh)
    seconds = time.perf_counter() - start
    assert torch.equal(got, expected), "resumed batch differs"
    return {"at_batch": at_batches, "epoch": round(fresh.stats()["epoch"], 2),
            "seconds": round(seconds, 3),
            "replay_seconds": round(at_batches * batch / rate_per_s, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="shard directory with an index (default: make them)")
    p.add_argument("--work", type=Path, default=Path("/tmp/ddpm-data-speed"),
                   help="where shards and the extracted folder go")
    p.add_argument("--images", type=int, default=10_000, help="images in the shards (default 10000)")
    p.add_argument("--measure", type=int, default=None,
                   help="images per measurement (default: all of them, once)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (1: per-worker rate)")
    p.add_argument("--quick", action="store_true", help="tiny synthetic data: a smoke run")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.batch = min(a.images, 640), min(a.batch, 32)
    measure = a.measure or a.images
    a.work.mkdir(parents=True, exist_ok=True)
    shards = a.shards or make_shards(a.work, a.images, a.quick)
    urls = sorted(str(u) for u in shards.glob("*.tar"))
    folder = extract_folder(urls, a.work / f"folder-{shards.name}")

    results = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
               f"{os.cpu_count()} CPUs", "python": platform.python_version(),
               "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
               "workers": a.workers, "batch": a.batch, "shards": str(shards), "rates": {}}
    loaders = [("ours", lambda: ours(shards, a.batch, a.workers)),
               ("webdataset", lambda: stock_webdataset(urls, a.batch, a.workers)),
               ("imagefolder", lambda: imagefolder(folder, a.batch, a.workers))]
    try:  # the real one, where torchvision is installed
        import torchvision  # noqa: F401
        loaders.append(("imagefolder_torchvision",
                        lambda: torchvision_imagefolder(folder, a.batch, a.workers)))
    except ImportError:
        pass
    for name, make in loaders:
        r = results["rates"][name] = rate(make, measure, a.batch, a.workers)
        print(f"{name:24s} {r['images_per_s']:7d} images/s ({r['images_per_s'] / max(1, a.workers):.0f} "
              f"per worker; {r.get('images_per_worker_cpu_s', 0)} per worker CPU-second)", flush=True)
    ours_rate = results["rates"]["ours"]["images_per_s"]
    per_epoch = a.images // a.batch
    results["resume"] = [resume_time(shards, a.batch, a.workers, at, ours_rate)
                         for at in (2, 3 * per_epoch + per_epoch // 2)]
    for r in results["resume"]:
        print(f"resume at batch {r['at_batch']:5d} (epoch {r['epoch']:.2f}): {r['seconds']:.3f} s "
              f"to the first batch (replaying would take {r['replay_seconds']:.2f} s)", flush=True)
    stock = max(r["images_per_s"] for k, r in results["rates"].items() if k != "ours")
    results["speedup_vs_best_stock"] = round(ours_rate / stock, 2)
    print(f"ours / best stock: {results['speedup_vs_best_stock']:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
