"""Plain steps (width 1) of the decode loop against mlx_lm's own step, in one process:
all plain, and in runs of 4 between drafting cycles of width 5 (as --block-size auto
runs them on a CPU at long context).

    python benchmarks/plain_steps.py [--context 4096] [--rounds 3]

Demo pair, the third long held-out text's last --context tokens; ms per step as the
median gap between yields (mlx_lm: generate_step's tokens; ours: the loop's own timing
of each width-1 cycle, ScriptPolicy), after warm-up steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step

from dflash_mlx import demo, load, load_draft
from dflash_mlx.block_policy import ScriptPolicy
from dflash_mlx.generate import dflash_cycles


def mlx_lm_ms(model, prompt: mx.array, n: int = 40) -> float:
    stamps = [time.perf_counter() for _ in generate_step(prompt, model, max_tokens=n)]
    return 1e3 * statistics.median(b - a for a, b in itertools.pairwise(stamps[5:]))


def loop_ms(model, draft, prompt: mx.array, script: list[int]) -> dict[int, float]:
    policy = ScriptPolicy(list(script))
    cycles = dflash_cycles(model, draft, prompt, max_tokens=sum(script) + 1, policy=policy)
    for i, _ in enumerate(cycles):
        if i == len(script):
            break
    cycles.close()
    return {w: 1e3 * statistics.median(t[3:] or t) for w, t in sorted(policy.times.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model, tokenizer = load(str(demo.TARGET))
    draft = load_draft(str(demo.DRAFT))
    path = demo.TARGET.parent / "eval_long.jsonl"
    texts = [json.loads(line)["prompt"] for line in path.open() if line.strip()]
    long = [ids for ids in map(tokenizer.encode, texts) if len(ids) >= args.context]
    prompt = mx.array(long[min(2, len(long) - 1)][-args.context :])
    for r in range(args.rounds):
        step = mlx_lm_ms(model, prompt)
        plain = loop_ms(model, draft, prompt, [1] * 40)
        runs = loop_ms(model, draft, prompt, ([1] * 4 + [5]) * 8)
        print(
            f"round {r}: mlx_lm step {step:.1f} ms | all plain {plain[1]:.1f} ms | "
            f"runs of 4: plain {runs[1]:.1f} ms, width 5 {runs[5]:.1f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
