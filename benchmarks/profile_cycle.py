"""Where a DFlash cycle's host time goes: cProfile of the real decode loop.

    python benchmarks/profile_cycle.py --shape 8b --context 1024 --cycles 24 [--top 30]

Builds the random-weight target/draft of bench_cycle.py, prefills `context` tokens,
then profiles `--cycles` cycles of `dflash_mlx.generate.dflash_cycles` (after warm-up
cycles) and prints the functions with the most time of their own (host time: Python
graph building, MLX dispatch, and the sync, which shows as `eval`/`item`/`tolist`),
with the wall time per cycle alongside.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cycle import build

from dflash_mlx.generate import dflash_cycles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8b")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--cycles", type=int, default=24)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    model, draft = build(args.shape, mx.bfloat16, args.block_size)
    prompt = mx.random.randint(0, 1000, (args.context,)).astype(mx.int32)  # any vocab
    gen = dflash_cycles(model, draft, prompt, max_tokens=1 << 30, block_size=args.block_size)
    for _ in range(6):  # prefill + warm-up cycles (kernel compilation, graph caches)
        next(gen)
    profiler = cProfile.Profile()
    tic = time.perf_counter()
    profiler.enable()
    for _ in range(args.cycles):
        next(gen)
    profiler.disable()
    wall = (time.perf_counter() - tic) / args.cycles
    gen.close()
    s = io.StringIO()
    stats = pstats.Stats(profiler, stream=s)
    total = sum(v[2] for v in stats.stats.values()) / args.cycles
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    print(
        f"shape {args.shape} context {args.context}: {1e3 * wall:.2f} ms per cycle (wall, "
        f"under the profiler), {1e3 * total:.2f} ms of it in profiled Python/C calls"
    )
    print(s.getvalue())


if __name__ == "__main__":
    main()
