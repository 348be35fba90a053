"""What the preemption tests share: a training run small enough for seconds on 2 cores, a way to see
how far a running process has got, and the weights comparison."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


# configs/demo.yaml shrunk: an 8-channel two-level UNet on the demo shards, one worker, no sample
# grids. The one list every test's tiny run starts from.
TINY = [f"data.urls={REPO / 'data/demo'}", "data.num_workers=1", "model.channels=8", "model.channel_mult=[1,2]",
        "model.attention_resolutions=[14]", "train.micro_batch_size=16", "log.sample_every_steps=0"]


def tiny_cfg(run_dir, *overrides):
    """The tiny run as a Config, for in-process tests: warm-up 10, scalars every 5 steps."""
    from pipeline.config import load_config

    return load_config(REPO / "configs/demo.yaml", [
        f"run_dir={run_dir}", *TINY, "optim.warmup_steps=10", "log.every_steps=5",
        "log.num_samples=4", "log.sample_steps=5", *overrides])


def tiny_overrides(run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """The tiny run as command-line overrides: progress every 2 steps, no checkpoints but the final
    one (and a stop's)."""
    return [f"run_dir={run_dir}", *TINY, "log.every_steps=2", f"train.max_steps={max_steps}",
            "ckpt.every_steps=1000", "ckpt.keep_last=5", *extra]


def scalars(run_dir, tag):
    """(step, value) of a TensorBoard scalar, read back from the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def weights(ckpt_dir, name):
    return load_file(Path(ckpt_dir) / f"{name}.safetensors")


def run_cli(*args, cwd=REPO, timeout=300):
    """`python -m MODULE ARGS` in a fresh interpreter (what a console script runs)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


_BAR = re.compile(r"\|\s*(\d+)/(\d+) \[")  # tqdm's "| 6/40 [" on rank 0's stderr


def steps_done(text: str) -> int:
    """The highest step the progress bar in `text` has shown (0 if none yet)."""
    return max((int(m.group(1)) for m in _BAR.finditer(text)), default=0)


class OutputReader:
    """Collects a process's stderr in a thread, so a test can wait for progress and still read it all."""

    def __init__(self, stream):
        self._chunks: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for chunk in iter(lambda: stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096), b""):
            self._chunks.append(chunk.decode(errors="replace"))

    def text(self) -> str:
        return "".join(self._chunks)

    def wait_for_step(self, step: int, timeout_s: float, alive=lambda: True) -> None:
        deadline = time.monotonic() + timeout_s
        while steps_done(self.text()) < step:
            assert time.monotonic() < deadline, f"no progress to step {step} in {timeout_s} s:\n{self.text()[-3000:]}"
            assert alive(), f"process ended before step {step}:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def join(self) -> str:
        self._thread.join(timeout=30)
        return self.text()


def final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = Path(run_dir) / "checkpoints" / (Path(run_dir) / "checkpoints/latest").read_text().strip()
    return {name: load_file(ckpt / f"{name}.safetensors") for name in ("model", "ema")}


def assert_same_weights(a: Path, b: Path) -> None:
    """Online and EMA weights of the newest checkpoints of two runs are equal, bit for bit."""
    wa, wb = final_weights(a), final_weights(b)
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        differ = [k for k in wa[name] if not torch.equal(wa[name][k], wb[name][k])]
        assert not differ, f"{name} weights differ between {a} and {b}: {differ[:5]}"
