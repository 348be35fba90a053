"""The in-loop evaluation object: its schedule, outputs, state, and that it leaves training's RNG alone."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import load_config
from pipeline.eval import network
from pipeline.eval.inloop import InLoopEval, result_path, scalars
from pipeline.factory import build_model

REPO = Path(__file__).resolve().parents[2]

try:
    network.verified_network()
    NO_NETWORK = None
except network.NetworkError as e:
    NO_NETWORK = str(e)


class Monitor:
    def __init__(self):
        self.logged = []

    def scalars(self, step, values):
        self.logged.append((step, values))


def _cfg(tmp_path, *extra):
    return load_config(REPO / "configs/demo.yaml", [f"run_dir={tmp_path}", f"data.urls={REPO / 'data/demo'}",
                                                    "model.channels=8", "model.channel_mult=[1,2]",
                                                    "model.attention_resolutions=[14]", *extra])


RUNTIME = SimpleNamespace(rank=0, world_size=1, is_main=True, device=torch.device("cpu"))


def test_off_by_default_and_does_nothing(tmp_path):
    ev = InLoopEval(_cfg(tmp_path), RUNTIME)
    assert not ev.due(0) and ev.maybe_run(1000, None, Monitor()) is None
    assert not (tmp_path / "eval").exists()


def test_bad_network_fails_at_start_up(tmp_path):
    from pipeline.errors import UserError

    cfg = _cfg(tmp_path, "eval.every_steps=2", f"eval.network_path={tmp_path / 'missing.pt'}")
    with pytest.raises(UserError, match="missing.pt"):
        InLoopEval(cfg, RUNTIME)


@pytest.mark.skipif(NO_NETWORK is not None, reason=f"no FID network: {NO_NETWORK}")
def test_schedule_outputs_state_and_rng(tmp_path):
    cfg = _cfg(tmp_path, "eval.every_steps=2", "eval.metrics=[kid]", "eval.num_samples=4", "eval.sample_steps=2")
    ev = InLoopEval(cfg, RUNTIME)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    monitor = Monitor()
    assert ev.maybe_run(1, model, monitor) is None  # not a multiple of every_steps
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = ev.maybe_run(2, model, monitor)
    assert torch.equal(torch.get_rng_state(), before)  # training's RNG stream is untouched
    assert first["step"] == 2 and first["num"] == 4
    assert json.loads(result_path(tmp_path, 2).read_text())["kid"] == first["kid"]
    assert monitor.logged == [(2, {"eval/kid": first["kid"], "eval/kid_std": first["kid_std"]})]
    assert ev.maybe_run(2, model, monitor) is None  # done already
    # A restarted evaluator restored from the state: step 2 is not repeated; one restored from a
    # state saved before step 2's evaluation repeats it with the same number (and the cache).
    again = InLoopEval(cfg, RUNTIME)
    again.load_state_dict(ev.state_dict())
    assert again.maybe_run(2, model, monitor) is None
    fresh = InLoopEval(cfg, RUNTIME)
    fresh.load_state_dict({"last_step": 0})
    redo = fresh.maybe_run(2, model, monitor)
    assert redo["kid"] == first["kid"] and redo["reference"]["from_cache"]


def test_scalars_of_a_full_result():
    res = {"fid": 3.0, "kid": 0.1, "kid_std": 0.01, "bpd": 3.5,
           "bpd_breakdown": {"bpd": 3.5, "prior": 0.01, "decoder": 1.0, "kl_q0": 1.0, "kl_q1": 0.9, "kl_q2": 0.5,
                             "kl_q3": 0.09, "terms_mean": [0.0]}}
    tags = scalars(res)
    assert tags["eval/fid"] == 3.0 and tags["eval/bpd_decoder"] == 1.0 and tags["eval/bpd_kl_q3"] == 0.09
    assert len(tags) == 10


def test_bpd_in_the_loop_logs_the_bound_and_its_parts(tmp_path):
    # Needs no FID network. T = 50 keeps all T terms of 2 images quick.
    cfg = _cfg(tmp_path, "eval.every_steps=2", "eval.metrics=[bpd]", "eval.num_samples=2", "diffusion.timesteps=50")
    ev = InLoopEval(cfg, RUNTIME)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    monitor = Monitor()
    first = ev.maybe_run(2, model, monitor)
    parts = first["bpd_breakdown"]
    assert len(parts["terms_mean"]) == 50 and 0 < first["bpd"] < 100
    assert first["bpd"] == pytest.approx(parts["prior"] + parts["decoder"] + sum(parts[f"kl_q{q}"] for q in range(4)))
    (step, logged), = monitor.logged
    assert step == 2 and logged["eval/bpd"] == first["bpd"] and logged["eval/bpd_decoder"] == parts["decoder"]
    redo = InLoopEval(cfg, RUNTIME)
    redo.load_state_dict({"last_step": 0})
    assert redo.maybe_run(2, model, Monitor())["bpd"] == first["bpd"]  # the same step, the same number
