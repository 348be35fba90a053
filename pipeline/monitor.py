"""What the user watches: TensorBoard scalars and images, PNG sample grids, the progress bar.

Only the main process writes; on other ranks every method is a no-op.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def make_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 (H', W', C) image, `nrow` images per row (default ~square)."""
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.zeros((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid.transpose(1, 2, 0)


def save_png(path: str | Path, image_hwc: np.ndarray) -> None:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(img).save(tmp, format="PNG")
    tmp.replace(path)


class Throughput:
    """Images per second and data-wait fraction between two reads (host clock)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0
        self.data_wait_s = 0.0

    def add(self, images: int, data_wait_s: float) -> None:
        self.images += images
        self.data_wait_s += data_wait_s

    def read(self) -> tuple[float, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate, wait = self.images / dt, self.data_wait_s / dt
        self.reset()
        return rate, wait


class Monitor:
    def __init__(self, run_dir: str | Path, is_main: bool, max_steps: int, start_step: int):
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.writer = None
        self.bar = None
        if not is_main:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        # purge_step drops events logged after the checkpoint we resumed from, so a resumed
        # run's curves continue without duplicated steps.
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        desc="train", smoothing=0.1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def progress(self, step: int, **postfix) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def samples(self, step: int, images_uint8: torch.Tensor) -> Path | None:
        """Log a sample grid to TensorBoard and save it as run_dir/samples/step-NNNNNNNN.png."""
        if self.writer is None:
            return None
        grid = make_grid(images_uint8)
        path = self.run_dir / "samples" / f"step-{step:08d}.png"
        save_png(path, grid)
        self.writer.add_image("samples/ema", grid, step, dataformats="HWC")
        return path

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
