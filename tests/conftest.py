"""Shared fixtures. (Helpers: add fixtures below; keep this file small.)"""
import pytest


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
