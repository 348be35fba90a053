"""Training data: URLs and counts (`urls`), tar reading (`tario`), decoding (`decode`), the epoch
deal (`deal`), the per-worker stream and the resumable loader (`loader`), shard writing (`write`).
What a batch source implements is written in `protocol.BatchSource`."""
from pipeline.data.decode import decode_image  # noqa: F401 (API)
from pipeline.data.loader import build_loader, to_model_input  # noqa: F401 (API)
from pipeline.data.urls import load_shard_counts, resolve_urls  # noqa: F401 (API)
from pipeline.errors import DataError  # noqa: F401 (API)
