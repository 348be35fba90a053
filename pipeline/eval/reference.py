"""The reference features' cache: one file per everything they depend on.

Key: the shard list with each shard's sample count (and, for local shards, size and mtime), the
image size and channel count the images are decoded at, N, the network's sha256 and the
preprocessing convention. The file, ``<cache dir>/ref-<key>.npz``, holds the float32 features
(KID needs the rows, not just their mean and covariance) and the key's JSON, checked on load.
Written atomically, so a killed writer leaves no half file and concurrent runs cannot tear it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from pipeline.atomic import write_bytes_atomic

log = logging.getLogger("pipeline.eval")

KEY_VERSION = 1


def reference_key(shards_ident: list, *, image_size: int, channels: int, num: int,
                  network_sha256: str, convention: str) -> tuple[str, str]:
    """(short hex key, the canonical JSON it hashes)."""
    what = {"version": KEY_VERSION, "shards": shards_ident, "image_size": image_size,
            "channels": channels, "num": num, "network_sha256": network_sha256,
            "convention": convention}
    text = json.dumps(what, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20], text


def cache_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"ref-{key}.npz"


def load_features(path: Path, key_json: str) -> np.ndarray | None:
    """The cached features, or None when there is no usable file (missing, unreadable, other key)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key_json:
                log.warning("reference cache %s was made for another key; recomputing", path)
                return None
            return np.array(z["features"])
    except (OSError, ValueError, KeyError) as e:
        log.warning("reference cache %s is unreadable (%s); recomputing", path, type(e).__name__)
        return None


def save_features(path: Path, features: np.ndarray, key_json: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, features=np.asarray(features, dtype=np.float32), key=np.array(key_json))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue())
