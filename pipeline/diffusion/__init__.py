"""The DDPM forward process, its posterior, the samplers, the objectives (what the model predicts and
how it is trained) and the variational bound in bits/dim (tensors in, tensors out)."""
from pipeline.diffusion.gaussian import (  # noqa: F401 (API)
    BetaSchedule, Diffusion, VarianceType, cosine_betas, linear_betas, make_betas, rescale_zero_terminal_snr,
)
from pipeline.diffusion.objectives import Loss, Objective, Prediction, Variance  # noqa: F401 (API)
from pipeline.diffusion.timesteps import (  # noqa: F401 (API)
    LossSecondMomentSampler, UniformSampler, build_timestep_sampler,
)
from pipeline.diffusion.vlb import BpdTerms, bpd_terms  # noqa: F401 (API)
