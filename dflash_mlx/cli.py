"""`dflash-mlx <command>` and `python -m dflash_mlx <command>`: one front door."""

from __future__ import annotations

import importlib
import sys

from . import __version__

# command -> (module with a main(argv) -> int, what it does)
COMMANDS = {
    "generate": ("dflash_mlx.generate", "generate text with a target and its DFlash draft"),
    "convert": ("dflash_mlx.convert", "convert a published DFlash draft checkpoint to MLX"),
    "train": ("dflash_mlx.train", "train a DFlash draft for an mlx-lm target"),
    "benchmark": (
        "dflash_mlx.benchmark",
        "DFlash vs the target alone and mlx_lm speculative decoding",
    ),
    "cache_prompt": ("dflash_mlx.cache_prompt", "save a prompt's cache for --prompt-cache-file"),
    "calibrate": ("dflash_mlx.calibrate", "time the kernels against the stock ops, once"),
    "serve": ("dflash_mlx.serve", "an OpenAI-compatible HTTP server"),
}

USAGE = f"usage: dflash-mlx [-h] [--version] {{{','.join(COMMANDS)}}} ..."


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        USAGE,
        "",
        "DFlash speculative decoding for MLX and mlx-lm (greedy output equals the target's own).",
        "",
        "commands:",
        *(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help  show this help message and exit",
        "  --version   show the version and exit",
        "",
        "`dflash-mlx COMMAND --help` describes a command's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        print("dflash-mlx: error: give a command", file=sys.stderr)
        return 2
    first = argv[0]
    if first in ("-h", "--help"):
        print(_help())
        return 0
    if first == "--version":
        print(f"dflash-mlx {__version__}")
        return 0
    if first not in COMMANDS:
        print(USAGE, file=sys.stderr)
        print(
            f"dflash-mlx: error: unknown command '{first}' (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    module_name = COMMANDS[first][0]
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                print(f"error: '{first}' is not available in this install", file=sys.stderr)
            else:
                print(f"error: '{first}' needs the '{e.name}' package", file=sys.stderr)
            return 1
        sys.argv[0] = f"dflash-mlx {first}"
        return module.main(argv[1:])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
