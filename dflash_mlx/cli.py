"""`dflash-mlx <command>`: generate, convert, benchmark, train."""

import importlib
import sys

COMMANDS = {
    "generate": "dflash_mlx.generate",
    "convert": "dflash_mlx.convert",
    "benchmark": "dflash_mlx.benchmark",
    "train": "dflash_mlx.train",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: dflash-mlx {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    command = sys.argv.pop(1)
    sys.argv[0] = f"dflash-mlx {command}"
    return importlib.import_module(COMMANDS[command]).main()


if __name__ == "__main__":
    sys.exit(main())
