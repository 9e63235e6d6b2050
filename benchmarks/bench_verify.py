"""End to end: one verify forward of a Qwen3-8B-shaped target, kernel vs stock.

Run on the GPU machine (MLX CUDA), from the repository root:

    python benchmarks/bench_verify.py [--out benchmarks/results] [--contexts 4096 16384]

The target is mlx_lm's qwen3 model built from a ModelArgs with Qwen3-8B's shapes
(36 layers, hidden 4096, 32 / 8 heads of 128, MLP 12288, vocab 151936) and random
bf16 weights. Its KV cache is filled with random keys / values to the context length;
each sample is one 16-token forward (a DFlash verify) then a trim back. Stock:
mlx_lm's own attention; kernel: the same call inside verify_attention(model) with
DFLASH_BLOCK_ATTENTION=kernel. Samples of the two alternate; medians reported.
Writes verify_<device>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lm.models import qwen3
from mlx_lm.models.cache import make_prompt_cache

from dflash_mlx.kernels import SWITCH_ENV, verify_attention

QWEN3_8B = {
    "model_type": "qwen3",
    "hidden_size": 4096,
    "num_hidden_layers": 36,
    "intermediate_size": 12288,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}


def build_model(layers: int) -> qwen3.Model:
    args = qwen3.ModelArgs(**{**QWEN3_8B, "num_hidden_layers": layers})
    model = qwen3.Model(args)
    model.set_dtype(mx.bfloat16)
    # Materialise layer by layer so the fp32 initial values never all coexist.
    for layer in model.model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def fill_cache(model, context: int):
    cache = make_prompt_cache(model)
    a = model.args
    for c in cache:
        k = mx.random.normal((1, a.num_key_value_heads, context, a.head_dim)).astype(mx.bfloat16)
        v = mx.random.normal((1, a.num_key_value_heads, context, a.head_dim)).astype(mx.bfloat16)
        c.update_and_fetch(k, v)
        mx.eval(c.keys, c.values)
    return cache


def verify_once(model, cache, ids, routed: bool) -> float:
    mx.synchronize()
    t0 = time.perf_counter()
    if routed:
        with verify_attention(model):
            logits = model(ids, cache=cache)
    else:
        logits = model(ids, cache=cache)
    mx.eval(logits)
    mx.synchronize()
    dt = time.perf_counter() - t0
    for c in cache:
        c.trim(ids.shape[1])
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--samples", type=int, default=15)
    args = ap.parse_args()
    os.environ[SWITCH_ENV] = "kernel"
    device = mx.device_info().get("device_name", "gpu")
    mx.random.seed(0)
    model = build_model(args.layers)
    ids = mx.random.randint(0, QWEN3_8B["vocab_size"], (1, args.block))
    rows = []
    for context in args.contexts:
        cache = fill_cache(model, context)
        for routed in (False, True, False, True):  # warm-up: compile, cache growth
            verify_once(model, cache, ids, routed)
        stock, kernel = [], []
        for _ in range(args.samples):
            stock.append(verify_once(model, cache, ids, False))
            kernel.append(verify_once(model, cache, ids, True))
        # Same logits either way (to bf16 rounding of the attention outputs).
        ref = model(ids, cache=cache)
        for c in cache:
            c.trim(args.block)
        with verify_attention(model):
            got = model(ids, cache=cache)
        for c in cache:
            c.trim(args.block)
        rel = (
            mx.linalg.norm((got - ref).astype(mx.float32)) / mx.linalg.norm(ref.astype(mx.float32))
        ).item()
        row = {
            "context": context,
            "block": args.block,
            "stock_ms": 1e3 * statistics.median(stock),
            "kernel_ms": 1e3 * statistics.median(kernel),
            "logits_rel_diff": rel,
        }
        row["speedup"] = row["stock_ms"] / row["kernel_ms"]
        rows.append(row)
        print(
            f"context {context:6d}: stock {row['stock_ms']:.2f} ms  kernel {row['kernel_ms']:.2f} ms"
            f"  x{row['speedup']:.2f}  logits rel diff {rel:.1e}",
            flush=True,
        )
        del cache
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda_" + "".join(c if c.isalnum() else "_" for c in str(device)).strip("_").lower()
    result = {
        "device": str(device),
        "mlx": mx.__version__,
        "model": "Qwen3-8B shapes, random bf16 weights, mlx_lm qwen3",
        "layers": args.layers,
        "command": "python benchmarks/bench_verify.py",
        "rows": rows,
    }
    (args.out / f"verify_{tag}.json").write_text(json.dumps(result, indent=1))
    md = [
        f"# Verify forward, Qwen3-8B shapes ({device})",
        "",
        (
            f"{args.layers} layers, random bf16 weights, {args.block}-token forward on a filled KV cache; "
            f"median of {args.samples}; MLX {mx.__version__}. `python benchmarks/bench_verify.py`"
        ),
        "",
        "| context | stock ms | kernel ms | speedup | logits rel. diff |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        md.append(
            f"| {r['context']} | {r['stock_ms']:.2f} | {r['kernel_ms']:.2f} | {r['speedup']:.2f}x "
            f"| {r['logits_rel_diff']:.1e} |"
        )
    (args.out / f"verify_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
