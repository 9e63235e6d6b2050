"""--block-size auto against mlx_lm from one prefilled context, round after round.

    python benchmarks/auto_from_cache.py [--context 4096] [--rounds 3] [--max-tokens 128]

Demo pair; the third long held-out text's last --context tokens are prefilled once
(a DFlash prompt cache, kept in the cache directory: a 4k prefill takes ~50 s on a
2-core CPU) and every round decodes --max-tokens greedily from a copy of it, mlx_lm
then auto, so the two share the machine's state of the moment. Per round: tok/s of
both (after the first token), auto's cycles per width (count, median and summed wall
time as the loop timed them) and its width trace (width:tokens). Tokens are compared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections import defaultdict

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache

from dflash_mlx import demo, load, load_draft
from dflash_mlx.block_policy import make_policy
from dflash_mlx.calibrate import cache_dir
from dflash_mlx.generate import dflash_cycles
from dflash_mlx.session import (
    load_prompt_cache,
    make_prompt_cache,
    prefill_prompt_cache,
    save_prompt_cache,
)


def copy(cache: list[KVCache]) -> list[KVCache]:
    out = []
    for c in cache:
        fresh = KVCache()
        keys, values, offset = c.state
        fresh.state = (keys * 1, values * 1, offset)
        out.append(fresh)
    mx.eval([c.keys for c in out] + [c.values for c in out])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    model, tokenizer = load(str(demo.TARGET))
    draft = load_draft(str(demo.DRAFT))
    path = demo.TARGET.parent / "eval_long.jsonl"
    texts = [json.loads(line)["prompt"] for line in path.open() if line.strip()]
    long = [ids for ids in map(tokenizer.encode, texts) if len(ids) > args.context]
    ids = long[min(2, len(long) - 1)][-args.context - 1 :]
    file = cache_dir() / f"auto_from_cache-{args.context}.safetensors"
    if file.exists():
        base, _ = load_prompt_cache(str(file), model, draft)
    else:
        start = time.perf_counter()
        base = make_prompt_cache(model, draft)
        prefill_prompt_cache(model, draft, mx.array(ids[:-1]), base)
        file.parent.mkdir(parents=True, exist_ok=True)
        save_prompt_cache(str(file), base, model, draft)
        print(f"prefilled {args.context} tokens in {time.perf_counter() - start:.1f} s")
    last, n, n_target = mx.array(ids[-1:]), args.max_tokens, len(model.layers)

    for r in range(args.rounds):
        stamps, ref = [time.perf_counter()], []
        steps = generate_step(last, model, max_tokens=n, prompt_cache=copy(base[:n_target]))
        for y, _ in steps:
            ref.append(int(y))
            stamps.append(time.perf_counter())
        mlx_tps = (n - 1) / (stamps[-1] - stamps[1])

        policy = make_policy(model, draft, "auto", True, args.context)
        times, observe = defaultdict(list), policy.observe

        def timed(width, accepted, seconds, times=times, observe=observe):
            times[width].append(seconds)
            observe(width, accepted, seconds)

        policy.observe = timed
        stamps, got, trace = [time.perf_counter()], [], []
        cache = copy(base)
        for c in dflash_cycles(model, draft, last, max_tokens=n, policy=policy, prompt_cache=cache):
            got += c.tokens
            stamps.append(time.perf_counter())
            trace.append(f"{c.width}:{len(c.tokens)}")
        auto_tps = (len(got) - 1) / (stamps[-1] - stamps[2])
        widths = {
            w: f"{len(t)} x {1e3 * statistics.median(s for s in t if s):.1f} ms"
            f" = {1e3 * sum(s for s in t if s):.0f} ms"
            for w, t in sorted(times.items())
            if any(t)
        }
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        print(
            f"round {r}: mlx_lm {mlx_tps:.1f} tok/s | auto {auto_tps:.1f} tok/s "
            f"({auto_tps / mlx_tps:.2f}x, first token {1e3 * gaps[0]:.0f} ms) | same tokens "
            f"{'yes' if got == ref else 'NO'} | cycles {widths}",
            flush=True,
        )
        print("   ", " ".join(trace[1:]))


if __name__ == "__main__":
    main()
