"""The DDPM forward process, its posterior, and the samplers (tensors in, tensors out)."""
from pipeline.diffusion.gaussian import (  # noqa: F401 (API)
    BetaSchedule, Diffusion, VarianceType, cosine_betas, linear_betas, make_betas,
)
