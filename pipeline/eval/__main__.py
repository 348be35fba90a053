"""`python -m pipeline.eval` / `accelerate launch -m pipeline.eval`: the same as `ddpm-eval`."""
import sys

from pipeline.cli.eval import main

sys.exit(main())
