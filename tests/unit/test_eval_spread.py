"""Noise keyed to the sample index: the same samples and bits/dim terms for any batch or rank split."""
import numpy as np
import pytest
import torch

from pipeline.config import Config
from pipeline.diffusion import Diffusion, linear_betas
from pipeline.eval import bpd as bpd_mod
from pipeline.eval.generate import generate
from pipeline.eval.noise import BPD, SAMPLING, IndexedNoise
from pipeline.eval.spread import Ranks
from pipeline.factory import build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py


def tiny_model(seed=0):
    cfg = Config()
    cfg.data.image_size, cfg.data.channels = 8, 1
    cfg.model.channels, cfg.model.channel_mult, cfg.model.attention_resolutions = 8, [1, 2], [4]
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def test_noise_fn_that_replays_the_generator_gives_the_default_samples():
    # The hook draws in exactly the default path's order (x_T, then one z per step), so a noise_fn
    # replaying the same generator reproduces the default output bit for bit.
    diff = Diffusion(linear_betas(12))
    model = tiny_model()
    shape = (3, 1, 8, 8)
    for run in (lambda **kw: diff.p_sample_loop(model, shape, clip_denoised=True, **kw),
                lambda **kw: diff.ddim_sample_loop(model, shape, 4, eta=1.0, **kw)):
        default = run(generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        hooked = run(noise_fn=lambda s: torch.randn(s, generator=g))
        assert torch.equal(default, hooked)


def test_indexed_noise_rows_depend_on_their_index_only():
    a = IndexedNoise(7, [0, 1, 2, 3])
    b = IndexedNoise(7, [2, 0])
    first_a, first_b = a((4, 5)), b((2, 5))
    second_a, second_b = a((4, 5)), b((2, 5))
    assert torch.equal(first_a[[2, 0]], first_b) and torch.equal(second_a[[2, 0]], second_b)
    assert not torch.equal(first_a, second_a)  # successive draws continue each sample's stream
    assert not torch.equal(IndexedNoise(8, [0])((1, 5)), first_a[:1])  # the seed matters
    assert not torch.equal(IndexedNoise(7, [0], stream=BPD)((1, 5)), IndexedNoise(7, [0], stream=SAMPLING)((1, 5)))


def test_rank_shares_partition_the_indices():
    shares = [Ranks(r, 3).indices(10) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(10))
    assert shares[1].tolist() == [1, 4, 7]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generated_images_do_not_depend_on_batch_size_or_rank_split(sampler):
    diff = Diffusion(linear_betas(10))
    model = tiny_model()
    kw = dict(channels=1, image_size=8, sampler=sampler, steps=4, seed=3)
    whole = generate(model, diff, range(6), batch_size=6, **kw)
    batched = generate(model, diff, range(6), batch_size=4, **kw)
    split = np.empty_like(whole)
    for r in range(2):
        idx = Ranks(r, 2).indices(6)
        split[idx] = generate(model, diff, idx, batch_size=2, **kw)
    assert np.array_equal(whole, batched) and np.array_equal(whole, split)
    assert len({whole[i].tobytes() for i in range(6)}) == 6  # different noise, different images
    other = generate(model, diff, range(6), batch_size=6, **{**kw, "seed": 4})
    assert not np.array_equal(whole, other)


class StandInTerms:
    """A stand-in for pipeline.diffusion.vlb.bpd_terms: any deterministic function of x0 and the
    noise it draws (one draw per term, as the real one), shaped like the real output."""

    T = 8

    def __call__(self, x0, noise_fn):
        terms = torch.stack([(x0 + noise_fn(t, tuple(x0.shape))).pow(2).flatten(1).mean(1)
                             for t in range(self.T)], 1)  # vlb.NoiseFn's (t, shape)
        prior = x0.flatten(1).abs().mean(1)
        return type("BpdTerms", (), {"prior": prior, "terms": terms, "total": prior + terms.sum(1)})()


def test_bpd_rows_do_not_depend_on_batch_size_or_rank_split():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 1, 4, 4), dtype=np.uint8)
    fn = StandInTerms()
    whole = bpd_mod.bpd_rows(fn, images, list(range(6)), seed=1, batch_size=6)
    split = np.empty_like(whole)
    for r in range(2):
        idx = Ranks(r, 2).indices(6)
        split[idx] = bpd_mod.bpd_rows(fn, images[idx], idx, seed=1, batch_size=1)
    np.testing.assert_array_equal(whole, split)
    assert whole.shape == (6, 2 + StandInTerms.T)


def test_bpd_report_parts_add_up_to_the_total():
    rng = np.random.default_rng(1)
    terms = rng.uniform(0, 1, size=(5, 12))
    prior = rng.uniform(0, 0.1, size=5)
    rows = np.concatenate([(prior + terms.sum(1))[:, None], prior[:, None], terms], axis=1)
    rep = bpd_mod.bpd_report(rows)
    parts = rep["prior"] + rep["decoder"] + sum(rep[f"kl_q{q}"] for q in range(4))
    assert rep["bpd"] == pytest.approx(parts, rel=1e-12)
    assert rep["decoder"] == pytest.approx(terms[:, 0].mean())
    assert rep["kl_q0"] == pytest.approx(terms[:, 1:3].sum(1).mean())  # t = 1, 2 of 0..2
    assert rep["kl_q3"] == pytest.approx(terms[:, 9:12].sum(1).mean())
    assert len(rep["terms_mean"]) == 12
