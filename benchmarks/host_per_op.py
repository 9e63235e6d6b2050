"""The host's cost of one device op in MLX, per kind of op: what a cycle of ~1000 ops pays.

    python benchmarks/host_per_op.py [--ops 400]

For each kind, a chain of --ops dependent ops on small arrays (so that the device is
never what the host waits for) is built (Python), then launched with mx.async_eval
(MLX encodes every op: kernel arguments, CUDA graph nodes and launches), then waited
for. Reported: microseconds per op for building and for the launch, the host's two
parts. Kinds: elementwise add, a compiled elementwise chain (one fused kernel a call),
bf16 matmul (16 x 512 x 512, cuBLAS), rms_norm, rope, a dynamic slice_update (a static
cache write), and a custom kernel (the block-attention kernel, both passes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_mlx.kernels import attention
from dflash_mlx.kernels.backend import gpu_backend
from dflash_mlx.kernels.source import make_plan


def kinds() -> dict:
    x = mx.random.normal((16, 512)).astype(mx.bfloat16)
    w = mx.random.normal((512, 512)).astype(mx.bfloat16) * 0.04
    nw = mx.ones((512,), dtype=mx.bfloat16)
    rope_x = mx.random.normal((1, 4, 16, 64)).astype(mx.bfloat16)
    buf = mx.zeros((1, 4, 256, 64), dtype=mx.bfloat16)
    at = mx.array([5], dtype=mx.int32)
    fused = mx.compile(lambda a: mx.tanh(a * 0.5 + 0.1) * a)
    mx.eval(x, w, nw, rope_x, buf, at)
    out = {
        "add": (x, lambda a: a + 1),
        "compiled elementwise": (x, fused),
        "matmul 16x512x512": (x, lambda a: a @ w),
        "rms_norm": (x, lambda a: mx.fast.rms_norm(a, nw, 1e-6)),
        "rope": (
            rope_x,
            lambda a: mx.fast.rope(a, 64, traditional=False, base=1e4, scale=1.0, offset=3),
        ),
        "slice_update (device offset)": (
            buf,
            lambda b: mx.slice_update(b, rope_x, at, axes=(2,)),
        ),
    }
    active = gpu_backend()
    if active is not None:
        backend, factory = active
        q = mx.random.normal((1, 8, 16, 128)).astype(mx.bfloat16)
        kv = mx.random.normal((1, 2, 512, 128)).astype(mx.bfloat16)
        mx.eval(q, kv)
        plan = make_plan(backend, 2, 1, 2, 4, 16, 512, 128, None)
        step = lambda a: attention.launch(
            a,
            kv,
            kv,
            plan,
            scale=0.088,
            causal=True,
            window=None,
            backend=backend,
            factory=factory,
        )
        out["custom kernel (block attention, 2 passes)"] = (q, step)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"mlx {mx.__version__} on {mx.default_device()}")
    for name, (x0, op) in kinds().items():
        builds, launches = [], []
        for r in range(args.repeats + 1):
            tic = time.perf_counter()
            y = x0
            for _ in range(args.ops):
                y = op(y)
            built = time.perf_counter()
            mx.async_eval(y)
            launched = time.perf_counter()
            mx.eval(y)
            if r:  # the first run compiles kernels
                builds.append(built - tic)
                launches.append(launched - built)
        per = lambda ts: 1e6 * statistics.median(ts) / args.ops
        print(f"{name:<44} build {per(builds):6.2f} us/op  launch {per(launches):6.2f} us/op")
    return 0


if __name__ == "__main__":
    sys.exit(main())
