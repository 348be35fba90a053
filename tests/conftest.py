"""Shared fixtures. Tests are laid out like the package's layers:

- tests/unit/: one module at a time, in process, seconds: `pytest -m "not slow"` runs these;
- tests/integration/: real training runs, real multi-process accelerate (gloo), DeepSpeed, HTTP;
- tests/system/: whole commands under faults: SIGKILL, preemption, real SLURM daemons, golden weights.

Everything under integration/ and system/ is marked `slow`; CI runs all of it.
"""
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # the shared helpers (tiny_run, shardkit, slurm_cluster) for every layer


def pytest_collection_modifyitems(config, items):
    for item in items:
        layer = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        if layer in ("integration", "system"):
            item.add_marker(pytest.mark.slow)


def _reset_accelerate():
    # Accelerate keeps process-wide singletons; a second Accelerator in the same test process
    # must start from a clean state, as a new process would.
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """Reset accelerate's singletons before the test; call it to reset again mid-test."""
    _reset_accelerate()
    yield _reset_accelerate
    _reset_accelerate()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run the module's tests with one torch thread: small elementwise ops on 2 shared cores are
    ~30x slower with 2 OpenMP threads. Use with ``pytestmark = pytest.mark.usefixtures(...)``.

    It lives here, not in a tests/unit/conftest.py: a second module named ``conftest`` would shadow
    this one for the tests that ``from conftest import _reset_accelerate``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
