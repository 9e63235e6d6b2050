"""The host's cost of one device op in MLX, per kind of op: what a cycle of ~1000 ops pays.

    python benchmarks/host_per_op.py [--ops 400]

For each kind, a chain of --ops dependent ops on small arrays (so that the device is
never what the host waits for) is built (Python), then launched with mx.async_eval
(MLX encodes every op: kernel arguments, CUDA graph nodes and launches), then waited
for. Reported: microseconds per op for building and for the launch, the host's two
parts. Kinds: elementwise add, a compiled elementwise chain (one fused kernel a call),
bf16 matmul (16 x 512 x 512, cuBLAS), rms_norm, rope, a dynamic slice_update and a
put_along_axis (a static cache write), custom kernels (block attention, both passes;
the q/k/v kernel, independent calls), and the same rms_norm / matmul / add ops replayed
from one compiled function (what a compiled cycle pays per kernel).
"""

from __future__ import annotations

import argparse
import os
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
    rows = (at + mx.arange(16, dtype=mx.int32)).reshape(1, 1, 16, 1)

    def layers(a):  # 10 x 3 kernels, none of them fusable with its neighbours
        for _ in range(10):
            a = a + mx.fast.rms_norm(a, nw, 1e-6) @ w
        return a

    stack = mx.compile(layers)
    mx.eval(x, w, nw, rope_x, buf, at, rows)
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
        "put_along_axis (device offset)": (
            buf,
            lambda b: mx.put_along_axis(b, rows, rope_x, axis=2),
        ),
        "eager (rms_norm, matmul, add) per kernel": (x, layers, 30),
        "compiled (rms_norm, matmul, add) per kernel": (x, stack, 30),
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
        from dflash_mlx.kernels import qkv

        layout = qkv.Layout(8, 2, 128, qkv.Rotary(13.2877, None, 1.0), nw[:128], nw[:128], 1e-6)
        y = mx.random.normal((1, 16, 12 * 128)).astype(mx.bfloat16)
        mx.eval(y)
        heads = lambda a: qkv._launch(y, layout, at, backend, factory)[1]
        out["custom kernel (q/k/v heads, independent)"] = (y, heads, 1, False)
        out["rms_norm (independent)"] = (x, lambda a: mx.fast.rms_norm(x, nw, 1e-6), 1, False)
        out.update(source_sizes(backend, factory, x))
        from dflash_mlx.kernels import matmul

        os.environ[matmul.SWITCH_ENV] = "kernel"  # the kernel for bf16 too (A/B)
        xs = mx.random.normal((16, 4096)).astype(mx.bfloat16)
        ws = (mx.random.normal((4096, 4096)) * 0.02).astype(mx.bfloat16)
        mx.eval(xs, ws)
        out["matmul 16x4096x4096 (cuBLAS)"] = (xs, lambda a: a @ ws.T)
        out["matmul 16x4096x4096 (skinny kernel)"] = (xs, lambda a: matmul.skinny_matmul(a, ws))
        stock = mx.compile(lambda a: a @ ws.T)
        kernel = mx.compile(lambda a: matmul.skinny_matmul(a, ws))
        out["compiled matmul 16x4096x4096 (cuBLAS)"] = (xs, stock)
        out["compiled matmul 16x4096x4096 (skinny kernel)"] = (xs, kernel)
    return out


def source_sizes(backend, factory, x) -> dict:
    """One tiny custom kernel built with headers of growing length (the prelude as
    written, compacted, padded with a comment): what the host pays per byte of source."""
    from dflash_mlx.kernels.source import _DIR, compact

    raw = (_DIR / f"prelude_{backend}.h").read_text()
    headers = {
        "no header": "",
        f"prelude as written, {len(raw) // 1000} KB": raw,
        f"prelude compacted, {len(compact(raw)) // 1000} KB": compact(raw),
        f"prelude + comment, {(len(raw) + 60000) // 1000} KB": raw + "//" + "x" * 60000 + "\n",
    }
    if backend == "cuda":
        body = "const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;\n"
    else:
        body = "const uint i = thread_position_in_grid.x;\n"
    body += "if (i < 16 * 512) { out[i] = inp[i] + (T)1; }\n"
    out = {}
    for label, header in headers.items():
        kern = factory(f"df_tiny_{len(header)}", ["inp"], ["out"], body, header, 0)
        launch = lambda a, kern=kern: kern(
            inputs=[a],
            template=[("T", a.dtype)],
            grid=(16 * 512, 1, 1),
            threadgroup=(256, 1, 1),
            output_shapes=[a.shape],
            output_dtypes=[a.dtype],
        )[0]
        out[f"custom kernel (tiny, {label})"] = (x, launch)
        step = mx.compile(lambda a, launch=launch: launch(launch(a)))
        out[f"compiled custom kernel (tiny, {label})"] = (x, step, 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"mlx {mx.__version__} on {mx.default_device()}")
    for name, (x0, op, *how) in kinds().items():
        per_call, chained = (how + [1, True])[:2] if how else (1, True)
        calls = max(1, args.ops // per_call)
        builds, launches = [], []
        for r in range(args.repeats + 1):
            tic = time.perf_counter()
            y = x0
            outs = []
            for _ in range(calls):
                y = op(y)
                if not chained:
                    outs.append(y)
            y = outs if outs else y
            built = time.perf_counter()
            mx.async_eval(y)
            launched = time.perf_counter()
            mx.eval(y)
            if r:  # the first run compiles kernels
                builds.append(built - tic)
                launches.append(launched - built)
        per = lambda ts, n=calls * per_call: 1e6 * statistics.median(ts) / n
        print(f"{name:<44} build {per(builds):6.2f} us/op  launch {per(launches):6.2f} us/op")
    return 0


if __name__ == "__main__":
    sys.exit(main())
