"""Why --block-size auto picks each width: the policy's view at every cycle.

    python benchmarks/trace_auto.py [--contexts 128,4k] [--n-prompts 4] [--max-tokens 128]

Demo pair, the prompts of bench_auto.py (trailing tokens of the held-out long texts), one
warm-up generation per context, then each prompt once with auto (greedy). Per cycle: the
width chosen, every width's expected tokens E(w) and estimated seconds C(w) as the policy
weighed them, the accepted drafts and the cycle's wall time. Summary per context: the
widths chosen, and for drafting cycles narrower than the block, what made them win over
the block size: E(B)/E(w) (tokens) against C(B)/C(w) (cost), as the file measured them and
as corrected by then.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import mlx.core as mx
from bench_auto import long_texts  # same prompts as the benchmark (benchmarks/ on the path)

from dflash_mlx import demo, load, load_draft
from dflash_mlx.benchmark import parse_contexts
from dflash_mlx.block_policy import AutoPolicy, make_policy
from dflash_mlx.generate import dflash_cycles


class Traced:
    """An AutoPolicy whose every choice and observation is recorded."""

    def __init__(self, policy: AutoPolicy):
        self.policy, self.max_width, self.cycles = policy, policy.max_width, []

    def choose(self) -> int:
        p = self.policy
        rates = p.acceptance.rates()
        E = p.expected(rates)
        view = {w: (E[w], p.estimate(w)) for w in p.widths}
        file = {w: p.costs.at(w, p.context) for w in p.widths}
        width = p.choose()
        self.cycles.append({"width": width, "view": view, "file": file, "context": p.context})
        return width

    def observe(self, width: int, accepted: int, seconds: float | None) -> None:
        for c in self.cycles:  # read in the order chosen (the next may be chosen already)
            if c["width"] == width and "accepted" not in c:
                c["accepted"], c["seconds"] = accepted, seconds
                break
        self.policy.observe(width, accepted, seconds)


def summary(cycles: list[dict], B: int) -> dict:
    chosen = Counter(c["width"] for c in cycles)
    narrow = [c for c in cycles if 1 < c["width"] < B]
    tokens = [c["view"][B][0] / c["view"][c["width"]][0] for c in narrow]
    cost = [c["view"][B][1] / c["view"][c["width"]][1] for c in narrow]
    cost_file = [c["file"][B] / c["file"][c["width"]] for c in narrow]
    med = lambda xs: round(statistics.median(xs), 3) if xs else None
    timed = {}
    for w in sorted(chosen):
        s = [c["seconds"] for c in cycles if c["width"] == w and c.get("seconds")]
        a = [c["accepted"] + 1 for c in cycles if c["width"] == w and "accepted" in c]
        timed[w] = {
            "cycles": chosen[w],
            "median_ms": round(1e3 * statistics.median(s), 3) if s else None,
            "mean_tokens": round(statistics.mean(a), 2) if a else None,
        }
    return {
        "widths": timed,
        "narrow_cycles": len(narrow),
        "E(B)/E(w)": med(tokens),
        "C(B)/C(w) corrected": med(cost),
        "C(B)/C(w) file": med(cost_file),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="128,4k")
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, tokenizer = load(str(demo.TARGET))
    draft = load_draft(str(demo.DRAFT))
    encoded = [tokenizer.encode(t) for t in long_texts(demo.TARGET.parent / "eval_long.jsonl")]
    out = {}
    for n_ctx in parse_contexts(args.contexts):
        prompts = [ids[-n_ctx:] for ids in encoded if len(ids) >= n_ctx][: args.n_prompts]
        runs = []
        for i, ids in enumerate([prompts[0], *prompts]):  # the first: warm-up
            policy = Traced(make_policy(model, draft, "auto", True, len(ids)))
            for _ in dflash_cycles(
                model, draft, mx.array(ids), max_tokens=args.max_tokens, policy=policy
            ):
                pass
            if i:
                runs.append(policy.cycles)
        cycles = [c for run in runs for c in run]
        out[n_ctx] = {"summary": summary(cycles, draft.block_size), "runs": runs}
        print(n_ctx, json.dumps(out[n_ctx]["summary"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
