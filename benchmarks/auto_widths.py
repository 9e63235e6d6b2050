"""What each width of `--block-size auto` delivered: per prompt, the cycles auto ran at
each width, their tokens and wall time, against the policy's own cost estimate.

    python benchmarks/auto_widths.py --context 4096 --prompts 2,3

Prompts as `bench_auto.py` makes them (the trailing N tokens of the demo pair's
`eval_long.jsonl`). A width whose tok/s is below the plain steps' (width 1) lost time.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

from dflash_mlx import block_policy, demo, load, load_draft
from dflash_mlx.generate import dflash_cycles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--prompts", default="0,1,2,3", help="indices among the long texts")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    model, tokenizer = load(str(demo.TARGET))
    draft = load_draft(str(demo.DRAFT))
    path = Path(demo.TARGET).parent / "eval_long.jsonl"
    texts = [json.loads(line)["prompt"] for line in path.open() if line.strip()]
    encoded = [tokenizer.encode(t) for t in texts]
    prompts = [ids[-args.context :] for ids in encoded if len(ids) >= args.context]
    log: list[tuple[int, int, float | None, float]] = []
    observe = block_policy.AutoPolicy.observe

    def logged(self, width, accepted, seconds):
        log.append((width, accepted, seconds, self.seconds(width)))
        return observe(self, width, accepted, seconds)

    block_policy.AutoPolicy.observe = logged
    for i in [int(x) for x in args.prompts.split(",")]:
        log.clear()
        for _ in dflash_cycles(model, draft, mx.array(prompts[i]), max_tokens=args.max_tokens):
            pass
        per = defaultdict(lambda: [0, 0.0, 0, 0.0])
        for width, accepted, seconds, estimate in log:
            if seconds is not None:
                row = per[width]
                row[0] += 1 + accepted
                row[1] += seconds
                row[2] += 1
                row[3] += estimate
        print(f"prompt {i}: " + " ".join(f"{w}:{a}" if w > 1 else "." for w, a, _, _ in log))
        for w in sorted(per):
            tokens, seconds, n, estimate = per[w]
            print(
                f"  width {w:2d}: {n:3d} cycles, {tokens / n:5.2f} tokens a cycle, "
                f"{1e3 * seconds / n:6.1f} ms a cycle (policy's estimate {1e3 * estimate / n:6.1f}), "
                f"{tokens / seconds:6.1f} tok/s"
            )


if __name__ == "__main__":
    main()
