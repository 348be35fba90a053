"""In-loop evaluation through a real SIGKILL: the resumed run writes the same numbers for the same
steps as an uninterrupted one (its noise is keyed to the sample index, and it draws nothing from
the training RNG), and it neither skips nor repeats an evaluation in TensorBoard."""
import json
import sys

import pytest

from tiny_run import REPO, scalars

sys.path.insert(0, str(REPO / "scripts"))
from kill_soak import kill, latest, resumed_from, run, start, train_command, wait_for  # noqa: E402

from pipeline.eval import network  # noqa: E402

try:
    network.verified_network()
    NO_NETWORK = None
except network.NetworkError as e:
    NO_NETWORK = str(e)

STEPS = 6
EVAL = [f"train.max_steps={STEPS}", "ckpt.every_steps=2", "ckpt.keep_last=5", "eval.every_steps=2",
        "eval.metrics=[kid]", "eval.num_samples=4", "eval.sample_steps=2", "eval.batch_size=4"]


def _results(run_dir):
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in sorted((run_dir / "eval").glob("step-*.json"))}


@pytest.mark.skipif(NO_NETWORK is not None, reason=f"no FID network: {NO_NETWORK}")
def test_in_loop_eval_survives_a_sigkill_resume_with_the_same_numbers(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(train_command(straight, *EVAL), tmp_path / "straight.log", timeout_s=300) == 0, \
        (tmp_path / "straight.log").read_text()[-3000:]
    expected = _results(straight)
    assert sorted(expected) == [2, 4, 6]

    command = train_command(killed, *EVAL)
    proc = start(command, tmp_path / "first.log")
    try:
        assert wait_for(lambda: (latest(killed) or "") >= "step-00000004", proc, timeout_s=300), \
            (tmp_path / "first.log").read_text()[-3000:]
    finally:
        kill(proc)
    assert run(command, tmp_path / "resumed.log", timeout_s=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    assert resumed_from(tmp_path / "resumed.log") in ("step-00000004", "step-00000006"), log[-3000:]
    assert "eval (last at step" in log  # the registry restored the evaluator's state

    got = _results(killed)
    assert sorted(got) == [2, 4, 6]
    for step in (2, 4, 6):
        assert got[step]["kid"] == expected[step]["kid"], step
        assert got[step]["step"] == step
    assert len({expected[s]["kid"] for s in expected}) == 3  # the weights moved: the numbers differ
    tb = scalars(killed, "eval/kid")
    assert [s for s, _ in tb] == [2, 4, 6]
    assert [v for _, v in tb] == pytest.approx([v for _, v in scalars(straight, "eval/kid")], rel=1e-6)
