"""Exports: consolidated fp32 safetensors (native)."""
