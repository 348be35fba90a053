"""DeepSpeed JSON configs: checked against the run's config, then completed from it.

The run's config is the one source of truth for batch arithmetic, precision and clipping:
global batch = train.micro_batch_size x train.grad_accum_steps x world size. A DeepSpeed JSON may
say "auto" (or leave out) these keys, or repeat the same numbers; anything else is refused at
start-up with a one-line ConfigError naming the file and key.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Config, ConfigError

# JSON key -> (config key, value from the config). train_batch_size needs the world size: see check_world.
_BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": ("train.micro_batch_size", lambda c: c.train.micro_batch_size),
    "gradient_accumulation_steps": ("train.grad_accum_steps", lambda c: c.train.grad_accum_steps),
    "gradient_clipping": ("optim.grad_clip", lambda c: float(c.optim.grad_clip)),
}
# Accelerate fills these from `model.config.hidden_size`, which the UNet does not have.
_HIDDEN_SIZE_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def _same(got, want) -> bool:
    return got == "auto" or (isinstance(got, (int, float)) and not isinstance(got, bool) and got == want)


def load(path: str | Path, cfg: Config) -> dict:
    """The DeepSpeed config in `path`, refused if it disagrees with `cfg`, with every "auto" we own filled."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed: '{path}' does not exist")
    try:
        ds = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: must be a JSON object")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == 3:
        raise ConfigError(f"{path}: zero_optimization.stage 3 is not supported (the EMA and checkpoints need whole "
                          f"parameters on every rank); use stage 1 or 2 (configs/deepspeed/zero2.json)")
    if stage not in (0, 1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1 or 2, got {stage!r}")
    for key in _HIDDEN_SIZE_KEYS:
        if zero.get(key) == "auto":
            raise ConfigError(f"{path}: zero_optimization.{key} cannot be \"auto\" for this model; give a number "
                              f"(e.g. 500000000)")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove the '{key}' section; AdamW and the LR schedule come from optim.* "
                              f"in the run's config")

    out = dict(ds)
    for key, (cfg_key, value) in _BATCH_KEYS.items():
        want = value(cfg)
        got = ds.get(key, "auto")
        if not _same(got, want):
            raise ConfigError(f"{path}: {key} is {got!r} but {cfg_key} is {want}; set it to \"auto\" or {want}")
        out[key] = want

    # Precision: a section may be absent, "auto", or agree with train.mixed_precision.
    mp = cfg.train.mixed_precision
    for section, name in (("bf16", "bf16"), ("fp16", "fp16")):
        enabled = ds.get(section, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (mp == name):
            raise ConfigError(f"{path}: {section}.enabled is {str(enabled).lower()} but train.mixed_precision is "
                              f"'{mp}'; set it to \"auto\" or {str(mp == name).lower()}")
        out[section] = {**ds.get(section, {}), "enabled": mp == name}
    out["zero_optimization"] = {**zero, "stage": stage}
    # Our optimizer is a plain torch AdamW, which ZeRO shards like any other.
    out["zero_allow_untested_optimizer"] = True
    return out


def check_world(ds: dict, path: str | Path, global_batch_size: int, world_size: int) -> None:
    """train_batch_size, if given as a number, must be micro x accum x world (known once processes start)."""
    got = ds.get("train_batch_size", "auto")
    if not _same(got, global_batch_size):
        raise ConfigError(f"{path}: train_batch_size is {got!r} but micro_batch_size x grad_accum_steps x "
                          f"world_size is {global_batch_size} on {world_size} process(es); set it to \"auto\"")
