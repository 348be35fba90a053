"""`python -m pipeline.train` (and `accelerate launch -m pipeline.train`) is `ddpm-train`."""
import sys

from pipeline.cli.train import main

sys.exit(main())
