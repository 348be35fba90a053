"""A distributed DDPM training pipeline: WebDataset shards -> Accelerate/DeepSpeed -> EMA UNet."""

__version__ = "0.1.0"
