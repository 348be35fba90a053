"""Checkpoints: the atomic save/verify protocol, the run directory, DeepSpeed ZeRO files."""
