"""mlx_lm vs DFlash with a fixed block vs DFlash --block-size auto, at several contexts.

    python benchmarks/bench_auto.py --contexts 128,1k,4k --max-tokens 128 \\
        --out benchmarks/results/auto_cpu

Prompts: the trailing N tokens of each held-out long text (the demo pair's
`eval_long.jsonl`, or --prompts FILE with {"prompt": text} lines), for each context N.
Every method decodes the same prompts greedily after one warm-up run per context (first
use of a shape compiles kernels; auto measures its costs once, outside the timing), then
--repeats rounds over all prompts, the methods interleaved prompt by prompt.
tok/s is generation tokens over generation time (prefill excluded), as mlx_lm reports
it, median over prompts and rounds; tau is tokens per target forward (plain steps count as one).
The tokens of all three methods are compared: DFlash is lossless, so they must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
from mlx_lm import stream_generate as mlx_lm_stream_generate

from dflash_mlx import demo, load, load_draft, stream_generate
from dflash_mlx.benchmark import parse_contexts


def run_mlx_lm(model, tokenizer, prompt: list[int], n: int) -> dict:
    tokens, last = [], None
    for last in mlx_lm_stream_generate(model, tokenizer, prompt, max_tokens=n):
        tokens.append(last.token)
    return {"tokens": tokens, "tps": last.generation_tps, "tau": 1.0, "widths": {}}


def run_dflash(model, draft, tokenizer, prompt: list[int], n: int, block_size) -> dict:
    tokens, widths, last = [], Counter(), None
    for last in stream_generate(
        model, draft, tokenizer, prompt, max_tokens=n, block_size=block_size
    ):
        tokens.append(last.token)
        widths[last.cycles] = last.block_size
    return {
        "tokens": tokens,
        "tps": last.generation_tps,
        "tau": last.acceptance_length,
        "widths": dict(Counter(w for c, w in widths.items() if c)),
    }


def long_texts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.open() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(demo.TARGET))
    p.add_argument("--draft-model", default=str(demo.DRAFT))
    p.add_argument("--prompts", default=str(demo.TARGET.parent / "eval_long.jsonl"))
    p.add_argument("--contexts", default="128,1k,4k")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--block-size", type=int, default=None, help="fixed block (default: draft's)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed rounds of every method over the prompts (all kept: median)",
    )
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)

    model, tokenizer = load(args.model)
    draft = load_draft(args.draft_model)
    fixed = args.block_size or draft.block_size
    texts = long_texts(Path(args.prompts))
    encoded = [tokenizer.encode(t) for t in texts]
    methods = {
        "mlx_lm": lambda q, n: run_mlx_lm(model, tokenizer, q, n),
        f"fixed-{fixed}": lambda q, n: run_dflash(model, draft, tokenizer, q, n, fixed),
        "auto": lambda q, n: run_dflash(model, draft, tokenizer, q, n, "auto"),
    }
    device = str(mx.default_device())
    info = mx.device_info() if mx.default_device() == mx.gpu else {}
    rows = []
    start = time.perf_counter()
    for n_ctx in parse_contexts(args.contexts):
        prompts = [ids[-n_ctx:] for ids in encoded if len(ids) >= n_ctx][: args.n_prompts]
        if not prompts:
            print(f"no prompt has {n_ctx} tokens; skipped", file=sys.stderr)
            continue
        row = {"context": n_ctx, "prompts": len(prompts)}
        for run in methods.values():  # warm-up: kernels and traces for this context
            run(prompts[0], args.max_tokens)
        # Timed rounds interleave the methods prompt by prompt, in a rotating order, so
        # that the machine's drift (tens of percent on the GPU machine) falls on all.
        runs = {name: [] for name in methods}
        names = list(methods)
        for rep in range(args.repeats):
            for i, q in enumerate(prompts):
                shift = (rep + i) % len(names)
                for name in names[shift:] + names[:shift]:
                    runs[name].append(methods[name](q, args.max_tokens))
        reference = [r["tokens"] for r in runs["mlx_lm"]]
        for name, results in runs.items():
            widths = Counter()
            for r in results:
                widths.update(r["widths"])
            row[name] = {
                "tps": statistics.median(r["tps"] for r in results),
                "tau": statistics.mean(r["tau"] for r in results),
                "same_tokens": [r["tokens"] for r in results] == reference,
                "block_sizes": dict(sorted(widths.items())),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "device": device,
        "device_name": str(info.get("device_name", "")),
        "mlx": mx.__version__,
        "max_tokens": args.max_tokens,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    table = format_table(result, f"fixed-{fixed}")
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out + ".md").write_text(table)
    return 0


def format_table(result: dict, fixed: str) -> str:
    head = (
        f"`{result['command']}` ({result['device']} {result['device_name']}, MLX "
        f"{result['mlx']}, {result['max_tokens']} new tokens, greedy, median tok/s over prompts)"
    )
    columns = (
        f"| context | mlx_lm tok/s | {fixed} tok/s (tau) | auto tok/s (tau) | auto / mlx_lm "
        f"| auto / {fixed} | auto block sizes (cycles) | same tokens |"
    )
    lines = [head, "", columns, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        base, fx, auto = r["mlx_lm"], r[fixed], r["auto"]
        sizes = " ".join(f"{w}:{c}" for w, c in auto["block_sizes"].items())
        same = all(r[m]["same_tokens"] for m in ("mlx_lm", fixed, "auto"))
        lines.append(
            f"| {r['context']} | {base['tps']:.1f} | {fx['tps']:.1f} ({fx['tau']:.2f}) "
            f"| {auto['tps']:.1f} ({auto['tau']:.2f}) | {auto['tps'] / base['tps']:.2f}x "
            f"| {auto['tps'] / fx['tps']:.2f}x | {sizes} | {'yes' if same else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
