"""ddpm-shards: pack images into shuffled WebDataset tar shards plus a manifest (see
`pipeline.data.write` for the sources and the output layout)."""
from __future__ import annotations

import sys
from typing import Sequence

from pipeline.errors import cli_main


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.data.write import build_parser, run

    args = build_parser().parse_args(argv)

    def body() -> int:
        manifest = run(args)
        total = sum(s["nsamples"] for s in manifest["shardlist"])
        print(f"wrote {total} samples in {len(manifest['shardlist'])} shards to "
              f"{args.out_dir / (manifest['name'] + '-index.json')}")
        return 0

    return cli_main("ddpm-shards", body)


if __name__ == "__main__":
    sys.exit(main())
