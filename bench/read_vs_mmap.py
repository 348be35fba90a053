"""Local shards read whole vs memory-mapped: the loader's rate either way, alternating in one run.

    python bench/read_vs_mmap.py                 # 10,000 images (CIFAR-10 JPEGs if present), 3 rounds
    python bench/read_vs_mmap.py --images 50000 --rounds 3 --json out.json

`pipeline.data.fetch.read_local` reads a local shard with one `read()`; a memory map (what the
loader did before) is swapped in for the "mmap" rounds. The loader, shards and measurement are
bench/data_speed.py's (`ours`, `rate`): one DataLoader worker, images/s after warm-up, and images per
CPU-second of the worker, which a shared machine disturbs much less than the wall rate.
"""
from __future__ import annotations

import argparse
import json
import mmap
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_speed  # noqa: E402  (puts the repository on sys.path)

from pipeline.data import fetch  # noqa: E402


def read_mmap(path: str):
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/ddpm-data-speed"))
    p.add_argument("--images", type=int, default=10_000, help="images per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    shards = data_speed.make_shards(a.work, 10_000, quick=False)
    read = fetch.read_local
    results = {"shards": str(shards), "images": a.images, "rounds": []}
    for r in range(a.rounds):
        row = {}
        for name, fn in (("mmap", read_mmap), ("read", read)):
            fetch.read_local = fn  # the worker is forked after this: it reads with `fn`
            row[name] = data_speed.rate(lambda: data_speed.ours(shards, 128, 1), a.images, 128, 1)
            print(f"round {r} {name}: {row[name]['images_per_s']:6d} images/s, "
                  f"{row[name]['images_per_worker_cpu_s']:6d} per worker CPU-s", flush=True)
        results["rounds"].append(row)
    fetch.read_local = read
    for name in ("mmap", "read"):
        cpu = [row[name]["images_per_worker_cpu_s"] for row in results["rounds"]]
        print(f"{name}: mean {sum(cpu) / len(cpu):.0f} images per worker CPU-s")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
