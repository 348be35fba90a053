"""Networks: the Ho et al. (2020) UNet and its layers."""
from pipeline.models.unet import UNet  # noqa: F401 (API)
