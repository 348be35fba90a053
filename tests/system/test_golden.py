"""The redesign changes no number: today's code trains the weights the pre-redesign code made.

The reference is the pre-redesign code itself (commit META["commit"], 4c6b47b), taken from git
history and run on this machine with the same commands. Bit-exactness holds only for one torch
build, one CPU and one thread count: the same torch on an AMD and an Intel AVX512 CPU gives weights
that differ in the 7th digit, so weights made on one machine cannot be the reference on another.
tests/golden/ keeps the weights 4c6b47b made on the machine meta.json names, for a clone without
that history; they are used only on that kind of machine, and otherwise the test skips, saying why.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_run import REPO, final_weights

GOLDEN = REPO / "tests" / "golden"
META = json.loads((GOLDEN / "meta.json").read_text())


def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _stored_golden_mismatch() -> str | None:
    here = (torch.__version__, torch.backends.cpu.get_cpu_capability(), _cpu_vendor())
    made = (META["torch"], META["cpu_capability"], META["cpu_vendor"])
    return None if here == made else f"tests/golden/ was made with torch {made[0]} on {made[1]} {made[2]}; here {here}"


def _train(code: Path, run_dir: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(META["omp_num_threads"]), "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "pipeline.train", "configs/demo.yaml", f"run_dir={run_dir}", *META["common"], *extra]
    p = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def _old_code(dest: Path) -> Path | None:
    """The pre-redesign tree, extracted from git history; None in a clone without it."""
    commit = META["commit"]
    if shutil.which("git") is None:
        return None
    have = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    if have.returncode != 0:
        return None
    archive = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(REPO), "archive", "--format=tar", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """What the pre-redesign code made: final weights of both runs, and the fp32 run's directory
    as it was at its step-6 checkpoint (for the resume test)."""
    old = _old_code(tmp_path_factory.mktemp("old-code"))
    if old is None:
        reason = _stored_golden_mismatch()
        if reason is not None:
            pytest.skip(f"no commit {META['commit']} in this clone's history, and {reason}")
        return {
            "fp32": {n: load_file(GOLDEN / "fp32-step12" / f"{n}.safetensors") for n in ("model", "ema")},
            "bf16": {n: load_file(GOLDEN / "bf16-accum2-step6" / f"{n}.safetensors") for n in ("model", "ema")},
            "fp32_run_at_step6": GOLDEN / "fp32-run",
        }
    runs = tmp_path_factory.mktemp("old-runs")
    _train(old, runs / "fp32", *META["fp32"])
    _train(old, runs / "bf16", *META["bf16"])
    at6 = runs / "fp32-at-step6"
    shutil.copytree(runs / "fp32", at6, ignore=shutil.ignore_patterns("step-00000012", "tb"))
    (at6 / "checkpoints" / "latest").write_text("step-00000006\n")
    return {"fp32": final_weights(runs / "fp32"), "bf16": final_weights(runs / "bf16"), "fp32_run_at_step6": at6}


def _assert_equal(got: dict, want: dict, what: str) -> None:
    for name in ("model", "ema"):
        assert got[name].keys() == want[name].keys()
        differ = [k for k in want[name] if not torch.equal(got[name][k], want[name][k])]
        assert not differ, f"{name} weights differ from the pre-redesign {what} run: {differ[:5]}"


def test_fp32_run_gives_the_pre_redesign_weights(tmp_path, reference):
    _train(REPO, tmp_path / "run", *META["fp32"])
    _assert_equal(final_weights(tmp_path / "run"), reference["fp32"], "fp32")


def test_bf16_accumulated_run_gives_the_pre_redesign_weights(tmp_path, reference):
    _train(REPO, tmp_path / "run", *META["bf16"])
    _assert_equal(final_weights(tmp_path / "run"), reference["bf16"], "bf16")


def test_a_checkpoint_written_before_the_redesign_resumes_to_the_same_weights(tmp_path, reference):
    run = tmp_path / "old-run"
    shutil.copytree(reference["fp32_run_at_step6"], run)
    _train(REPO, run, *META["fp32"])
    _assert_equal(final_weights(run), reference["fp32"], "fp32")
