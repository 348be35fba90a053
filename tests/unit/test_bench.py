"""The speed benchmark runs on CPU at tiny sizes, and the fast path does not change the math."""
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_train_speed_quick_runs_every_section(tmp_path):
    out = tmp_path / "r.jsonl"
    p = subprocess.run([sys.executable, str(REPO / "bench/train_speed.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    for kind in ["info", "flops", "ours", "match", "loop", "done"]:
        assert kind in kinds, kinds
    assert not [r for r in rows if "error" in r or "skipped" in r], rows
    assert all(r["img_s"] > 0 for r in rows if r["kind"] in ("ours", "loop"))
    loop = next(r for r in rows if r["kind"] == "loop")
    assert 0 <= loop["data_wait_frac"] < 1


def test_fast_path_loss_matches_eager_fp32(fresh_accelerate):
    """bf16 autocast + torch.compile (the GPU default) vs eager fp32, same seed: same losses within bf16 tolerance.

    The UNet's output layer starts at zero, so the first losses agree trivially; 6 steps at a high
    learning rate move the weights far enough for the comparison to mean something.
    """
    from train_speed import our_step_bench

    from pipeline.config import load_config

    cfg = load_config(REPO / "configs/demo.yaml", ["model.channels=8", "model.channel_mult=[1,2]",
                                                     "model.attention_resolutions=[14]"])
    cpu = torch.device("cpu")
    kw = dict(steps=1, warm=6, device=cpu, record_losses=True)
    ref = our_step_bench(cfg, 8, amp=False, compile_mode=None, **kw)["losses"]
    assert ref[-1] < ref[0], "the reference did not train"
    # channels_last=True: the GPU's layout, so our GroupNorm/upsample run compiled under autocast too.
    for channels_last in (False, True):
        fast = our_step_bench(cfg, 8, amp=True, compile_mode="default", channels_last=channels_last, **kw)["losses"]
        rel = [abs(a - b) / abs(a) for a, b in zip(ref, fast)]
        # bf16 keeps 8 mantissa bits (relative precision 2^-8 = 0.4%) per operation; 2% over a few steps.
        assert max(rel) < 2e-2, (channels_last, ref, fast)
        assert max(rel) > 0, "fast path identical to fp32: autocast did not engage"


def test_norm_bench_direct_variant_is_group_norm():
    """The micro-bench compares formulations of one function: the alternative must compute it."""
    from train_speed import _group_norm_direct

    from pipeline.models.unet import GroupNorm

    norm = GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 32, 6, 6) * 2 + 1).contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.group_norm(x, 8, norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(_group_norm_direct(norm, x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=1e-5)
