"""The objective's config keys: defaults, documented, and the refused combinations (one line each)."""
import pytest

from pipeline.config import Config, ConfigError, field_docs, load_config

KEYS = ["diffusion.prediction", "diffusion.variance", "diffusion.loss", "diffusion.hybrid_lambda",
        "diffusion.snr_gamma", "diffusion.rescale_zero_terminal_snr", "diffusion.timestep_sampler"]


def test_defaults_are_the_paper_ddpm():
    d = Config().diffusion
    assert (d.prediction, d.variance, d.loss, d.hybrid_lambda, d.snr_gamma, d.rescale_zero_terminal_snr,
            d.timestep_sampler) == ("eps", "fixed_large", "simple", 0.001, 0.0, False, "uniform")
    docs = field_docs()
    assert all(docs.get(k) for k in KEYS)


@pytest.mark.parametrize("overrides", [
    ["diffusion.prediction=v", "diffusion.variance=learned_range", "diffusion.loss=hybrid",
     "diffusion.timestep_sampler=loss_second_moment", "diffusion.snr_gamma=5", "diffusion.rescale_zero_terminal_snr=true"],
    ["diffusion.prediction=x0", "diffusion.variance=fixed_small", "diffusion.loss=vlb",
     "diffusion.timestep_sampler=loss_second_moment"],
    ["diffusion.variance=learned_range", "diffusion.loss=vlb"],
])
def test_sensible_combinations_load(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize("overrides, key, words", [
    (["diffusion.variance=learned_range"], "diffusion.variance", "never trained by diffusion.loss=simple"),
    (["diffusion.loss=hybrid"], "diffusion.loss", "trains only a learned variance"),
    (["diffusion.loss=vlb", "diffusion.snr_gamma=5"], "diffusion.snr_gamma", "has none"),
    (["diffusion.timestep_sampler=loss_second_moment"], "diffusion.timestep_sampler", "diffusion.loss=vlb or hybrid"),
    (["diffusion.rescale_zero_terminal_snr=true"], "diffusion.rescale_zero_terminal_snr", "diffusion.prediction=v"),
    (["diffusion.prediction=epsilon"], "diffusion.prediction", "eps, x0, v"),
    (["diffusion.variance=learned"], "diffusion.variance", "fixed_small, fixed_large, learned_range"),
    (["diffusion.timestep_sampler=importance"], "diffusion.timestep_sampler", "loss_second_moment"),
    (["diffusion.snr_gamma=-1"], "diffusion.snr_gamma", ">= 0"),
    (["diffusion.variance=learned_range", "diffusion.loss=hybrid", "diffusion.hybrid_lambda=0"],
     "diffusion.hybrid_lambda", "> 0"),
])
def test_nonsense_is_refused_with_one_line(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert msg.startswith(key + ":") and words in msg and "\n" not in msg
