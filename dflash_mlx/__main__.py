"""`python -m dflash_mlx <command>`: the same front door as `dflash-mlx`."""

import sys

from .cli import main

sys.exit(main())
