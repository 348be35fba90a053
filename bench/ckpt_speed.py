"""Checkpoint save and load time for the 35.7M-parameter CIFAR-10 UNet (configs/cifar10.yaml).

    python bench/ckpt_speed.py [--config configs/cifar10.yaml] [--repeats 3] [--dir DIR] [--device cpu|cuda]

Builds the model, its EMA and AdamW state after one real step (batch of 2), then times what the
training loop does: `Checkpointer.save` (world size 1, no-op barrier) and a resume (verify with
CRC-32, read every file, load into model, EMA and optimizer). For scale it also times writing the
same number of bytes with plain write + fsync, the floor for any synchronous save, and the CRC-32
pass alone. Prints one JSON line per measurement; no assertions (numbers depend on the disk).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.ckpt import checkpointer as ck  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.dist.runtime import rng_state  # noqa: E402
from pipeline.factory import build_model  # noqa: E402


def build_state(cfg, device):
    """Model, EMA and AdamW (with its moments) as the training loop holds them after one step."""
    from ema_pytorch import EMA

    torch.manual_seed(0)
    net = build_model(cfg).to(device)
    ema = EMA(net, beta=cfg.ema.decay, update_after_step=0, update_every=1, include_online_model=False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr)
    x = torch.randn(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=device)
    t = torch.randint(0, cfg.diffusion.timesteps, (2,), device=device)
    net(x, t).square().mean().backward()
    optimizer.step()
    ema.update()
    return net, ema, optimizer


def save(checkpointer, step, net, ema, optimizer):
    checkpointer.save(step, weights={"model": net.state_dict(), "ema": ema.ema_model.state_dict()},
                      objects={"optimizer": optimizer.state_dict()},
                      train_state={"step": step, "images_seen": 0, "ema_step": int(ema.step), "world_size": 1},
                      rank_state={"rng": rng_state(), "data": {}})


def plain_write_s(path: Path, nbytes: int) -> float:
    """Write and fsync `nbytes` from memory: the floor of a synchronous save to this disk."""
    buf = bytearray(os.urandom(1 << 20)) * (nbytes >> 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs/cifar10.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where to write checkpoints (default: a temporary directory)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    cfg = load_config(args.config, [f"data.urls={REPO / 'data/demo'}"])  # shards are not read here
    device = torch.device(args.device)
    net, ema, optimizer = build_state(cfg, device)
    n_params = sum(p.numel() for p in net.parameters())
    work = Path(tempfile.mkdtemp(prefix="ckpt-speed-", dir=args.dir))
    checkpointer = ck.Checkpointer(work, keep_last=2, rank=0, world_size=1, barrier=lambda: None)

    def report(**rec):
        print(json.dumps(rec), flush=True)

    report(kind="info", params=n_params, device=str(device), torch=torch.__version__, dir=str(work))

    # Save: what a training step stalls for.
    save_s = []
    for i in range(args.repeats):
        start = time.perf_counter()
        save(checkpointer, i + 1, net, ema, optimizer)
        save_s.append(time.perf_counter() - start)
    ckpt = work / "checkpoints" / ck.step_name(args.repeats)
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    nbytes = sum(files.values())
    best = min(save_s)
    report(kind="save", seconds=[round(s, 3) for s in save_s], median_s=round(statistics.median(save_s), 3),
           bytes=nbytes, mb_per_s=round(nbytes / best / 1e6, 1), files=files)

    # The floor: the same bytes written and fsynced in one go; and the CRC-32 pass alone.
    floor_s = min(plain_write_s(work / "plain.bin", nbytes) for _ in range(args.repeats))
    start = time.perf_counter()
    for name in files:
        ck.file_crc32(ckpt / name)
    crc_s = time.perf_counter() - start
    report(kind="floor", plain_write_fsync_s=round(floor_s, 3), mb_per_s=round(nbytes / floor_s / 1e6, 1),
           crc32_s=round(crc_s, 3), save_over_floor=round(best / floor_s, 2))

    # Load: verify (sizes and CRC-32), read every file, load into the live objects.
    def load(path: Path) -> None:
        net.load_state_dict(ck.read_weights(path, "model"))
        ema.ema_model.load_state_dict(ck.read_weights(path, "ema"))
        optimizer.load_state_dict(ck.read_object(path, "optimizer.pt"))
        ck.read_object(path, ck.rank_file(0))
        ck.read_train_state(path)

    load_s = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        assert ck.newest_loadable(checkpointer, load) == ckpt
        load_s.append(time.perf_counter() - start)
    report(kind="load", seconds=[round(s, 3) for s in load_s], median_s=round(statistics.median(load_s), 3),
           mb_per_s=round(nbytes / min(load_s) / 1e6, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
