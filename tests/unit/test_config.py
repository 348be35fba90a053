"""The config tree: YAML + overrides, validation that names the key, and every field documented."""
import dataclasses

import pytest
import yaml

from pipeline.config import Config, ConfigError, all_keys, field_docs, load_config, to_yaml

CONTRACT_KEYS = [
    "run_dir", "data.urls", "data.image_size", "data.channels", "data.num_workers",
    "model.channels", "model.channel_mult", "model.num_res_blocks", "model.attention_resolutions", "model.dropout",
    "diffusion.timesteps", "diffusion.beta_schedule", "diffusion.beta_start", "diffusion.beta_end",
    "optim.lr", "optim.warmup_steps", "optim.grad_clip", "optim.weight_decay", "ema.decay",
    "train.max_steps", "train.micro_batch_size", "train.grad_accum_steps", "train.mixed_precision", "train.seed",
    "ckpt.every_steps", "ckpt.keep_last", "log.every_steps", "log.sample_every_steps",
]


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_contract_keys_exist_and_are_documented():
    keys = all_keys()
    for k in CONTRACT_KEYS:
        assert k in keys
    docs = field_docs()
    missing = [k for k in keys if not docs.get(k)]
    assert not missing, f"fields without a docstring: {missing}"


def test_precedence_defaults_file_cli(tmp_path):
    p = write(tmp_path, {"optim": {"lr": 1e-3}, "train": {"max_steps": 10}})
    cfg = load_config(p, ["train.max_steps=20", "model.channel_mult=[1,2]", "optim.weight_decay=1e-4",
                          "data.urls=a.tar", "train.mixed_precision=no"])
    assert cfg.optim.lr == 1e-3                  # file beats default
    assert cfg.train.max_steps == 20             # CLI beats file
    assert cfg.model.channel_mult == [1, 2]
    assert cfg.optim.weight_decay == 1e-4        # `1e-4` is a string to YAML; coerced to float
    assert cfg.data.urls == ["a.tar"]            # a single pattern becomes a list
    assert cfg.train.mixed_precision == "no"     # YAML's bare `no` is a bool; coerced back
    assert cfg.ema.decay == Config().ema.decay   # untouched default


def test_shipped_configs_load():
    for name in ["demo", "cifar10", "lsun256"]:
        cfg = load_config(f"configs/{name}.yaml")
        assert isinstance(cfg, Config)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("configs/cifar10.yaml", ["train.seed=7"])
    again = load_config(write(tmp_path, yaml.safe_load(to_yaml(cfg))))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("data, needle", [
    ({"optim": {"learning_rat": 1}}, "unknown key 'optim.learning_rat'; did you mean 'optim.lr'"),
    ({"optim": {"warmup": 1}}, "did you mean 'optim.warmup_steps'"),
    ({"trian": {"max_steps": 1}}, "unknown key 'trian'"),
    ({"train": {"max_steps": "many"}}, "train.max_steps: expected int, got 'many'"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size: must be >= 1"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision"),
    ({"data": {"channels": 2}}, "data.channels: must be 1 or 3"),
    ({"data": {"image_size": 30}}, "data.image_size: 30 cannot be halved 3 times"),
    ({"model": {"attention_resolutions": [5]}}, "model.attention_resolutions: 5 is not a feature-map size"),
    ({"diffusion": {"beta_schedule": "quadratic"}}, "diffusion.beta_schedule"),
    ({"ema": {"decay": 1.5}}, "ema.decay: must be in [0, 1)"),
    ({"optim": {"lr": -1.0}}, "optim.lr: must be > 0"),
])
def test_bad_config_names_the_key(tmp_path, data, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.max_step'; did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
