"""`pipeline.unet.UNet` (CONTRACT.md's Python API) lives in `pipeline.models.unet`."""
from pipeline.models.unet import UNet, count_parameters  # noqa: F401 (API)
