"""Exports: consolidated fp32 safetensors (native), a diffusers pipeline folder (diffusers),
and the model card both carry (card)."""
