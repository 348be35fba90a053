"""ddpm-export: a run's weights in a form other code loads without this pipeline's training stack.

    ddpm-export RUN_DIR OUT_DIR
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.errors import UserError, cli_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ddpm-export",
        description="Write consolidated fp32 model.safetensors and ema.safetensors plus config.yaml from the "
                    "newest checkpoint of a run that verifies (CRC-checked, falling back to older ones); "
                    "`ddpm-sample OUT_DIR` reads the result.")
    parser.add_argument("run_dir", type=Path, help="run directory (with config.yaml and checkpoints/)")
    parser.add_argument("out_dir", type=Path, help="directory to write the export into (created if needed)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from pipeline.export.native import export

    try:
        ckpt = export(args.run_dir, args.out_dir)
    except OSError as e:
        raise UserError(f"cannot write the export into {args.out_dir}: {e.strerror or e}") from None
    print(f"exported {ckpt} to {args.out_dir} (model.safetensors, ema.safetensors, config.yaml; fp32)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return cli_main("ddpm-export", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
