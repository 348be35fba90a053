"""bench/eval_speed.py runs every row it promises and reports positive rates."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.eval import network

REPO = Path(__file__).resolve().parents[2]

try:
    network.verified_network()
    NO_NETWORK = None
except network.NetworkError as e:
    NO_NETWORK = str(e)


@pytest.mark.skipif(NO_NETWORK is not None, reason=f"no FID network: {NO_NETWORK}")
@pytest.mark.slow  # a subprocess loading torch and the network, ~15 s on a busy 2-core machine
def test_eval_speed_quick_runs_every_row(tmp_path):
    out = tmp_path / "rows.jsonl"
    p = subprocess.run([sys.executable, str(REPO / "bench/eval_speed.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["info", "sampling", "features", "kid_stats"]
    assert all(r["per_s"] > 0 for r in rows if r["kind"] in ("sampling", "features"))
    assert "features" in p.stdout and "per s" in p.stdout
