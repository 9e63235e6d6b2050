"""A/B of decode loops in ONE process: the cycle time of `dflash_cycles` from this
checkout (compiled static cycle, the same cycle eager, the general path) and, with
--other, another copy of the package (e.g. an earlier commit), alternating.

    git archive <commit> dflash_mlx | tar -x -C /tmp/old && mv /tmp/old/dflash_mlx /tmp/old/dflash_mlx_old
    PYTHONPATH=/tmp/old python benchmarks/ab_cycle.py --other dflash_mlx_old --shape 8b \
        --contexts 1024,16384 --rounds 3 [--env DFLASH_MATMUL=kernel]

The package uses relative imports, so a renamed copy imports side by side with this one.
Timings on the GPU machine move by tens of percent between processes; alternating A and
B on the same model, in the same process, takes that out of the comparison. Each round
measures the mlx_lm decode step and both loops' production cycle (median of the gaps
between cycles, `--cycles` cycles after warm-up).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cycle import build

from dflash_mlx.benchmark import decode_step_time


def cycle_ms(package, model, draft, prompt, cycles: int, block: int) -> tuple[float, float]:
    """(median ms per cycle after 5 warm-up cycles, ms of the first cycle: a compiled
    cycle's trace lands there)."""
    max_tokens = cycles * block + 64  # static buffers sized as a real generation's
    gen = package.generate.dflash_cycles(
        model, draft, prompt, max_tokens=max_tokens, block_size=block
    )
    stamps = []
    try:
        for i, _ in enumerate(gen):
            stamps.append(time.perf_counter())
            if i == cycles + 5:
                break
    finally:
        gen.close()
    gaps = [b - a for a, b in itertools.pairwise(stamps[5:])]
    return 1e3 * statistics.median(gaps), 1e3 * (stamps[2] - stamps[1])


def twin_draft(package, draft):
    """The same draft weights as a model of the other package."""
    config = package.config.DraftConfig.from_dict(draft.config.to_dict())
    other = package.drafter.DraftModel(config)
    other.load_weights(list(__import__("mlx.utils").utils.tree_flatten(draft.parameters())))
    return other


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", default=None, help="importable name of another package copy")
    p.add_argument("--shape", default="8b")
    p.add_argument("--bits", type=int, default=None, help="quantize the target (4 or 8)")
    p.add_argument("--contexts", default="1024,16384")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cycles", type=int, default=24)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--static-max", type=int, default=None, help="this checkout's static limit")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        help="NAME=VALUE: also run this checkout's compiled cycle with it set (a column each)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    this = importlib.import_module("dflash_mlx")
    for sub in ("generate", "config", "drafter"):
        importlib.import_module(f"dflash_mlx.{sub}")
    this.generate = sys.modules["dflash_mlx.generate"]
    other = None
    if args.other:
        other = importlib.import_module(args.other)
        for sub in ("generate", "config", "drafter"):
            importlib.import_module(f"{args.other}.{sub}")
        other.generate = sys.modules[f"{args.other}.generate"]
    model, draft = build(args.shape, mx.bfloat16, args.block_size, bits=args.bits)
    other_draft = twin_draft(other, draft) if other else None
    session = sys.modules["dflash_mlx.session"].VerifySession
    if args.static_max is not None:  # e.g. static caches at 16k for this checkout only
        sys.modules["dflash_mlx.session"].STATIC_MAX_POSITIONS["cuda"] = args.static_max
    rows = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        prompt = mx.random.randint(0, 1000, (ctx,)).astype(mx.int32)
        for r in range(args.rounds):
            row = {"context": ctx, "round": r}
            row["ar_ms"] = 1e3 * decode_step_time(model, prompt, steps=24)
            # This checkout: the compiled static cycle where static caches apply ...
            row["this_ms"], row["this_first_ms"] = cycle_ms(
                this, model, draft, prompt, args.cycles, args.block_size
            )
            # ... the same static cycle run eagerly (a draft that says it cannot be traced)
            draft.traceable = False
            try:
                row["eager_static_ms"], _ = cycle_ms(
                    this, model, draft, prompt, args.cycles, args.block_size
                )
            finally:
                del draft.traceable
            # ... and static caches off: the general path.
            can = session.can_go_static
            session.can_go_static = lambda self, positions=None: False
            try:
                row["general_ms"], _ = cycle_ms(
                    this, model, draft, prompt, args.cycles, args.block_size
                )
            finally:
                session.can_go_static = can
            for setting in args.env:  # e.g. DFLASH_MATMUL=kernel, alternating with the rest
                name, value = setting.split("=", 1)
                before = os.environ.get(name)
                os.environ[name] = value
                try:
                    row[f"{setting}_ms"], _ = cycle_ms(
                        this, model, draft, prompt, args.cycles, args.block_size
                    )
                finally:
                    os.environ.pop(name) if before is None else os.environ.update({name: before})
            if other:
                row["other_ms"], _ = cycle_ms(
                    other, model, other_draft, prompt, args.cycles, args.block_size
                )
            rows.append(row)
            ar = row["ar_ms"]
            cols = [k for k in row if k.endswith("_ms") and k not in ("ar_ms", "this_first_ms")]
            print(
                f"ctx {ctx:6d} round {r}: AR {ar:6.2f} ms | "
                + " | ".join(f"{k[:-3]} {row[k]:6.2f} ms ({row[k] / ar:4.2f}x)" for k in cols)
                + f" | first compiled cycle {row['this_first_ms']:7.1f} ms",
                flush=True,
            )
    if args.json:
        meta = {"shape": args.shape, "bits": args.bits, "block_size": args.block_size}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
