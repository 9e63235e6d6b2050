"""Convert a published DFlash draft checkpoint to MLX, from a source checkout:
`python convert.py --help` (installed: `dflash-mlx convert --help`, the same command)."""

import sys

from dflash_mlx.convert import main

if __name__ == "__main__":
    sys.exit(main(prog="python convert.py"))
