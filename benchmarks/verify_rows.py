"""Why DFlash's greedy tokens can differ from mlx_lm's on a GPU in bf16: the same
positions' logits from one B-row verify forward against B one-row decode steps.

    python benchmarks/verify_rows.py --model dflash_mlx/demo_pair/target \
        --draft dflash_mlx/demo_pair/draft --prompts dflash_mlx/demo_pair/eval_prompts.jsonl

For each prompt: mlx_lm's greedy tokens and DFlash's (fixed block), the first position
where they differ and both sides' top-2 margin there; then, on mlx_lm's own sequence,
the target's logits of B positions computed as one B-token forward vs B single-token
forwards (bf16 and float32): max |difference| and how many argmaxes differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash_mlx import load_draft, stream_generate


def top2_margin(logprobs: mx.array) -> float:
    top = mx.sort(logprobs.astype(mx.float32).reshape(-1))[-2:]
    return (top[1] - top[0]).item()


def rows_vs_steps(model, ids: list[int], start: int, B: int) -> tuple[float, int, float]:
    """Logits of positions start … start+B-1 of `ids`: one B-row forward vs B one-row
    forwards on a cache holding ids[:start]. (max |diff|, argmax mismatches, smallest
    top-2 margin among the mismatching rows)."""

    def cache_at_start():
        cache = make_prompt_cache(model)
        model(mx.array(ids[:start])[None], cache=cache)
        return cache

    block = mx.array(ids[start : start + B])[None]
    rows = model(block, cache=cache_at_start())[0].astype(mx.float32)
    cache = cache_at_start()
    steps = mx.concatenate([model(block[:, i : i + 1], cache=cache)[0] for i in range(B)]).astype(
        mx.float32
    )
    diff = mx.abs(rows - steps).max().item()
    mismatch = (mx.argmax(rows, -1) != mx.argmax(steps, -1)).tolist()
    margins = [top2_margin(steps[i]) for i, m in enumerate(mismatch) if m]
    return diff, sum(mismatch), min(margins) if margins else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-prompts", type=int, default=4)
    p.add_argument("-m", "--max-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    model, tokenizer = load(args.model)
    draft = load_draft(args.draft)
    lines = Path(args.prompts).read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines][: args.max_prompts]
    B = args.block_size
    for n, text in enumerate(prompts):
        prompt = tokenizer.encode(text)
        ref, ref_lp = [], []
        for (tok, lp), _ in zip(generate_step(mx.array(prompt), model), range(args.max_tokens)):
            ref.append(int(tok))
            ref_lp.append(lp)
        got, got_lp = [], []
        for r in stream_generate(
            model, draft, tokenizer, prompt, max_tokens=args.max_tokens, block_size=B
        ):
            got.append(r.token)
            got_lp.append(r.logprobs)
        first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        line = f"prompt {n}: {len(prompt)} tokens; "
        if first is None:
            line += f"DFlash == mlx_lm for all {len(ref)} tokens"
        else:
            line += (
                f"first difference at token {first} (mlx_lm {ref[first]}, DFlash {got[first]}); "
                f"top-2 margin there: mlx_lm {top2_margin(ref_lp[first]):.4f}, "
                f"DFlash {top2_margin(got_lp[first]):.4f}"
            )
        print(line, flush=True)
        ids = prompt + ref
        for dtype in (mx.bfloat16, mx.float32):
            model.set_dtype(dtype)
            worst = [rows_vs_steps(model, ids, s, B) for s in range(len(prompt), len(ids) - B, B)]
            print(
                f"  {dtype!s:14s} {B}-row forward vs {B} one-row steps over {len(worst)} "
                f"blocks: max |logit diff| {max(w[0] for w in worst):.4g}, argmax differs at "
                f"{sum(w[1] for w in worst)} of {len(worst) * B} positions "
                f"(smallest top-2 margin there {min(w[2] for w in worst):.4g})",
                flush=True,
            )
        model.set_dtype(mx.bfloat16)


if __name__ == "__main__":
    main()
