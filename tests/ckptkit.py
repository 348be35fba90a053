"""Forged checkpoints: what an attacker with write access to a run directory could leave there."""
import json
import os

from pipeline.ckpt import checkpointer as ck


class RunsCode:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def forge(ckpt, name, data):
    """Replace a file and rewrite MANIFEST.json to match, as an attacker with write access would."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / ck.MANIFEST).read_text())
    manifest["files"][name] = len(data)
    manifest["crc32"][name] = ck.file_crc32(ckpt / name)
    (ckpt / ck.MANIFEST).write_text(json.dumps(manifest))
