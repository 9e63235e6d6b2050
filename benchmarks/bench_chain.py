"""Verify-width matmuls as a forward runs them: each layer's inputs depend on the last.

    python benchmarks/bench_chain.py [--layers 36] [--rows 1,8,16] [--json F]
        [--kinds bf16,q4g64] [--variants "nsplit=1;nw=8,unroll=2"]

`bench_matmul.py` evaluates many independent matmuls in one graph, which MLX's CUDA
backend runs concurrently: throughput, not what a forward pays. Here each of 36
Qwen3-8B-shaped layers computes q, k, v from its input, o from (q, k, v), gate and up
from its input, down from gate * up, and the next input from their sum, so every matmul
waits for the one before, as in a target forward (a few elementwise ops per layer, the
same on every path). Paths: stock (mx.matmul / mx.quantized_matmul), the skinny kernel
(DFLASH_MATMUL=kernel's `matmul.launch`, CUDA only), and both with q/k/v and gate/up
fused (fuse.py's layout: `fused`, `fused-kernel`, what a verify runs). Kinds: bf16, and
qBgG for B-bit weights in groups of G (default bf16 and q4g64); ms per forward, median
of repeats. --variants adds fused-kernel paths whose plans take those
`matmul.make_plan` overrides, to tune the kernel's tiling where it runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matmul import kernel, make_weights, stock

from dflash_mlx.kernels import matmul

H, KV, FFN = 4096, 1024, 12288
SHAPES = {"q": (H, H), "k": (KV, H), "v": (KV, H), "o": (H, H), "gate": (FFN, H), "up": (FFN, H)}
SHAPES |= {"down": (H, FFN), "qkv": (H + 2 * KV, H), "gate_up": (2 * FFN, H)}


def overrides(text: str) -> dict[str, int]:
    """'nw=8,unroll=2' -> {'nw': 8, 'unroll': 2} (plan overrides on the command line)."""
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def median_ms(build: Callable[[], mx.array], repeats: int) -> float:
    """Median wall ms to evaluate the graph `build()` returns (built outside the timing),
    after one warm-up evaluation (compiles, allocations)."""
    mx.eval(build())
    times = []
    for _ in range(repeats):
        out = build()
        tic = time.perf_counter()
        mx.eval(out)
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def kind_spec(kind: str) -> tuple[mx.Dtype, int, int]:
    """(activation dtype, bits, group size) of 'bf16' or 'q4g64'-style names."""
    if kind == "bf16":
        return mx.bfloat16, 0, 0
    bits, gs = kind[1:].split("g")
    return mx.bfloat16, int(bits), int(gs)


def layer_weights(kind: str, fused: bool) -> dict:
    dtype, bits, gs = kind_spec(kind)
    names = ["qkv", "o", "gate_up", "down"] if fused else ["q", "k", "v", "o", "gate", "up", "down"]
    return {n: make_weights(*SHAPES[n], dtype, bits, gs, 1)[0] for n in names}


def forward(
    x: mx.array, layers: list[dict], kind: str, path: str, overrides: dict | None = None
) -> mx.array:
    _, bits, gs = kind_spec(kind)
    M = x.shape[0]
    plans = {}

    def mm(a, name, w):
        if "kernel" not in path:
            return stock(a, w, bits, gs)
        key = (name, M)
        if key not in plans:
            plan = matmul.make_plan("cuda", *SHAPES[name], bits, a.dtype.size, m=M, **overrides)
            plans[key] = plan
        return kernel(a, w, bits, gs, plans[key])

    for w in layers:
        if "qkv" in w:
            qkv = mm(x, "qkv", w["qkv"])
            q, k, v = qkv[:, :H], qkv[:, H : H + KV], qkv[:, H + KV :]
            gu = mm(x, "gate_up", w["gate_up"])
            g, u = gu[:, :FFN], gu[:, FFN:]
        else:
            q, k, v = mm(x, "q", w["q"]), mm(x, "k", w["k"]), mm(x, "v", w["v"])
            g, u = mm(x, "gate", w["gate"]), mm(x, "up", w["up"])
        attn = (q.reshape(M, H // KV, KV) * k[:, None] + v[:, None]).reshape(M, H)
        x = x + mm(attn, "o", w["o"]) + mm(g * u, "down", w["down"])
    return x


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path)
    p.add_argument("--kinds", default="bf16,q4g64")
    p.add_argument("--variants", default="", help="';'-separated make_plan overrides")
    args = p.parse_args()
    variants = {"kernel": {}, "fused-kernel": {}}
    for text in filter(None, args.variants.split(";")):
        variants[f"fused-kernel[{text}]"] = overrides(text)
    paths = ["stock", "fused"] + (list(variants) if mx.cuda.is_available() else [])
    rows = [int(r) for r in args.rows.split(",")]
    results = {"mlx": mx.__version__, "device": str(mx.default_device()), "rows": []}
    for kind in args.kinds.split(","):
        dtype = kind_spec(kind)[0]
        weights = {
            fused: [layer_weights(kind, fused) for _ in range(args.layers)]
            for fused in (False, True)
        }
        for m in rows:
            x = (mx.random.normal((m, H)) * 0.1).astype(dtype)
            line = {}
            for path in paths:
                layers = weights[path.startswith("fused")]
                over = variants.get(path)
                build = lambda: forward(x, layers, kind, path, over)  # noqa: B023 (used now)
                line[path] = median_ms(build, args.repeats)
                results["rows"].append({"kind": kind, "M": m, "path": path, "ms": line[path]})
            print(f"{kind:6s} M={m:2d}: " + " | ".join(f"{k} {v:.2f} ms" for k, v in line.items()))
        del weights
        mx.clear_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
