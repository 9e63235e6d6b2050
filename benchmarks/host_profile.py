"""Where the host's time goes in the production loop, per cycle (Python's cProfile).

    python benchmarks/host_profile.py [--shape 8b] [--bits 4] [--context 1024]

Random-weight target + draft of that shape (bench_cycle.build), the real loop
(generate.dflash_cycles, fixed block), profiled over --cycles cycles after a warm-up.
cProfile counts MLX's C++ entry points as their own rows, so the table separates the
host's wait for the device (`eval` in the loop's read) from its own work: replaying
the compiled cycle (`CompiledCycle.__call__`), launching it (`async_eval`), and the
loop's Python. Milliseconds per cycle.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cycle import build

from dflash_mlx.generate import dflash_cycles


def run(model, draft, prompt, cycles: int, block: int) -> None:
    gen = dflash_cycles(model, draft, prompt, max_tokens=(cycles + 2) * block, block_size=block)
    try:
        for i, _ in enumerate(gen):
            if i == cycles:
                break
    finally:
        gen.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8b")
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cycles", type=int, default=40)
    p.add_argument("--top", type=int, default=16)
    args = p.parse_args()
    model, draft = build(args.shape, mx.bfloat16, args.block_size, args.bits)
    prompt = mx.random.randint(0, draft.mask_token_id, (args.context,)).astype(mx.int32)
    run(model, draft, prompt, 8, args.block_size)  # traces, kernel checks
    prof = cProfile.Profile()
    tic = time.perf_counter()
    prof.enable()
    run(model, draft, prompt, args.cycles, args.block_size)
    prof.disable()
    wall = time.perf_counter() - tic
    stats = pstats.Stats(prof)
    print(
        f"{args.shape} bits={args.bits} ctx {args.context}: {1e3 * wall / args.cycles:.2f} ms/cycle"
    )
    print(f"{'ms/cycle self':>14} {'ms/cycle cum':>13} {'calls/cycle':>12}  function")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.top]
    for (file, line, name), (_, calls, tottime, cumtime, _) in rows:
        where = f"{Path(file).name}:{line}({name})" if file != "~" else name
        print(
            f"{1e3 * tottime / args.cycles:14.3f} {1e3 * cumtime / args.cycles:13.3f} "
            f"{calls / args.cycles:12.1f}  {where}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
