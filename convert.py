"""Convert a published DFlash draft checkpoint to MLX: see `python convert.py --help`."""

import sys

from dflash_mlx.convert import main

if __name__ == "__main__":
    sys.exit(main())
