"""Device time of the q/k/v kernel (kernels/qkv.py) against the stock ops it replaces.

    python benchmarks/qkv_anatomy.py [--rows 16] [--iters 20]

Qwen3-8B's attention shape (32 query heads, 8 KV heads, head dim 128, bf16): 36 calls
chained as a verify makes them (each layer's product is new), device us per call
(CUPTI, through PyTorch's profiler). Variants patch the kernel body to leave a stage
out (the sines, the frequencies, the norm); `stock` is mlx-lm's sequence (split, copies,
rms_norm twice, rope twice) for the same product.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_kernels import kernel_events

from dflash_mlx.kernels import qkv
from dflash_mlx.kernels.backend import mlx_factory

HQ, HKV, D, LAYERS = 32, 8, 128, 36
PATCHES = {
    "no-trig": [
        ("df_cos(theta)", "(1.0f + theta * 1e-30f)"),
        ("df_sin(theta)", "(theta * 1e-30f)"),
    ],
    "no-freq": [("df_exp2(-(float(i) / float(D / 2)) * log2_base)", "(1.0f / float(i + 1))")],
    "store-only": [("x[j] = df_to_float(src[j * 32 + lane]);", "x[j] = float(lane + j);")],
}


def factory(variant: str):
    base = mlx_factory("cuda", True)

    def make(name, inputs, outputs, source, header, smem):
        for old, new in PATCHES.get(variant, []):
            if old not in source:
                raise SystemExit(f"patch {variant!r} no longer matches the kernel body")
            source = source.replace(old, new)
        return base(f"{name}_{variant.replace('-', '_')}", inputs, outputs, source, header, smem)

    return make


def stock(y: mx.array, layout: qkv.Layout, offset: mx.array):
    """mlx-lm's Qwen3 attention from the fused product to the cache write's inputs."""
    B, L, _ = y.shape
    q, k, v = mx.split(y, [HQ * D, (HQ + HKV) * D], axis=-1)
    q = mx.fast.rms_norm(q.reshape(B, L, HQ, D), layout.q_norm, 1e-6).transpose(0, 2, 1, 3)
    k = mx.fast.rms_norm(k.reshape(B, L, HKV, D), layout.k_norm, 1e-6).transpose(0, 2, 1, 3)
    rope = lambda x: mx.fast.rope(x, D, traditional=False, base=1e6, scale=1.0, offset=offset)
    return rope(q), rope(k), v.reshape(B, L, HKV, D).transpose(0, 2, 1, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    keys = mx.random.split(mx.random.key(0), 3)
    w = lambda k: mx.random.uniform(0.5, 1.5, (D,), key=k).astype(mx.bfloat16)
    layout = qkv.Layout(
        HQ, HKV, D, qkv.Rotary(math.log2(1e6), None, 1.0), w(keys[0]), w(keys[1]), 1e-6
    )
    plain = qkv.Layout(HQ, HKV, D, layout.rotary)
    ys = [
        mx.random.normal((1, args.rows, (HQ + 2 * HKV) * D), key=mx.random.key(i)).astype(
            mx.bfloat16
        )
        for i in range(LAYERS)
    ]
    offset = mx.array(1024, dtype=mx.int32)
    mx.eval(ys, offset)
    runs = {"stock": lambda: [stock(y, layout, offset) for y in ys]}
    for variant in ["default", *PATCHES]:
        f = factory(variant)
        runs[variant] = lambda f=f: [qkv._launch(y, layout, offset, "cuda", f) for y in ys]
    f = factory("default")
    runs["no-norm"] = lambda: [qkv._launch(y, plain, offset, "cuda", f) for y in ys]
    print(f"rows {args.rows}: device us per layer (kernels per layer)")
    for name, build in runs.items():
        mx.eval(build())
        events = kernel_events(lambda build=build: mx.eval(build()), args.iters)
        per_call = sum(e["dur"] for e in events) / (args.iters * LAYERS)
        count = len(events) / (args.iters * LAYERS)
        longest = statistics.mean(sorted(e["dur"] for e in events)[-LAYERS:]) if events else 0
        print(f"  {name:12s} {per_call:7.2f} us  ({count:.1f} kernels, slowest {longest:.1f} us)")


if __name__ == "__main__":
    main()
