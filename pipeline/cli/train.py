"""ddpm-train: train (or resume) the run in the config's run_dir.

    ddpm-train CONFIG.yaml [key.sub=value ...] [--dry-run]
    accelerate launch [flags] -m pipeline.train CONFIG.yaml [key.sub=value ...]
"""
from __future__ import annotations

import argparse
import sys

from pipeline.errors import cli_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ddpm-train",
        description="Train (or resume) a DDPM on WebDataset shards. Re-running with the same run_dir resumes "
                    "from its newest complete checkpoint.",
        epilog="Example: ddpm-train configs/demo.yaml train.max_steps=2000 run_dir=runs/demo. "
               "Keys and defaults: ddpm-train --help-config.")
    parser.add_argument("config", nargs="?", help="YAML config file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, parameter count and global batch, then exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key with default and meaning")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after --dry-run


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import describe, load_config
    from pipeline.dist import preempt

    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    if args.config is None:
        print("ddpm-train: error: give a config file, e.g. ddpm-train configs/demo.yaml", file=sys.stderr)
        return 2

    def body() -> int:
        from pipeline.train.trainer import train

        cfg = load_config(args.config, args.overrides)
        preempt.install(cfg.train.stop_signal)  # before DataLoader workers fork, so they inherit it
        try:
            train(cfg, dry_run=args.dry_run)
        except preempt.Preempted as e:
            print(f"ddpm-train: {e}", file=sys.stderr)
            return preempt.EXIT_PREEMPTED
        except KeyboardInterrupt:
            print("ddpm-train: interrupted; re-run the same command to resume from the last checkpoint",
                  file=sys.stderr)
            return 130
        return 0

    return cli_main("ddpm-train", body)


if __name__ == "__main__":
    sys.exit(main())
