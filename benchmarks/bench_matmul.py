"""Skinny verify matmuls on the GPU: the kernel vs mx.matmul / mx.quantized_matmul.

Run on the GPU machine, from the repository root:

    python benchmarks/bench_matmul.py --json benchmarks/results/matmul_<device>.json [--quick]

Qwen3-8B's linear shapes (hidden 4096: q/o 4096x4096, k/v 1024x4096, gate/up
12288x4096, down 4096x12288), bf16 and 4-bit group 64, at M = 1, 4, 8, 16, 32 rows;
then the 36 layers' matmuls (252 distinct weights, one evaluation) at 1 and 16 rows,
the issue's target being the 16-row pass <= 1.1x the 1-row pass; then a few tiling
variants at 16 rows. Every configuration is first checked against the fp32 product on
the CPU (marked FAIL in the table and the JSON if it disagrees; the stock op's own
error is recorded too); each time is the median of repeated evaluations of many calls,
after a warm-up, with weights rotated through more memory than L2 holds. The matmuls
of one evaluation are independent, and MLX's CUDA graph runs them concurrently: these
are throughputs, not what a forward's sequential matmuls cost (bench_chain.py). Exit status 1
if any check failed or any step raised (the rest still runs and is written).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_mlx.kernels import matmul

L2_BYTES = 50 * 2**20
SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (12288, 4096), "down": (4096, 12288)}
LAYER = ["q/o", "k/v", "k/v", "q/o", "gate/up", "gate/up", "down"]  # q k v o gate up down
# The same layer with q/k/v and gate/up each one matrix (one launch, N summed): stock only.
FUSED = {"qkv": (6144, 4096), "gate+up": (24576, 4096), **SHAPES}
LAYER_FUSED = ["qkv", "q/o", "gate+up", "down"]
ROWS = (1, 4, 8, 16, 32)
KINDS = {"bf16": (mx.bfloat16, 0, 0), "q4g64": (mx.bfloat16, 4, 64)}
TOL = 1e-2  # relative error vs the fp32 product on the CPU (bf16 output rounding: ~2e-3)


def timed(fn, n_calls: int, repeats: int = 7) -> float:
    """Median seconds per call of fn(i) over `repeats` evaluations of n_calls calls."""
    mx.eval([fn(i) for i in range(n_calls)])  # warm-up: compile, allocate
    mx.synchronize()
    samples = []
    for _ in range(repeats):
        outs = [fn(i) for i in range(n_calls)]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        samples.append((time.perf_counter() - t0) / n_calls)
    return statistics.median(samples)


def make_weights(n: int, k: int, dtype, bits: int, gs: int, copies: int) -> list[tuple]:
    out = []
    for _ in range(copies):
        w = (mx.random.normal((n, k)) * 0.02).astype(dtype)
        out.append(mx.quantize(w, group_size=gs, bits=bits) if bits else (w,))
        mx.eval(out[-1])
    return out


def weight_bytes(n: int, k: int, dtype, bits: int, gs: int) -> int:
    if not bits:
        return n * k * dtype.size
    return n * k * bits // 8 + 2 * (n * k // gs) * dtype.size


def stock(x, w, bits, gs):
    if bits:
        return mx.quantized_matmul(x, *w, transpose=True, group_size=gs, bits=bits)
    return x @ w[0].T


def kernel(x, w, bits, gs, plan):
    if bits:
        return matmul.launch(
            x,
            w[0],
            plan,
            scales=w[1],
            biases=w[2],
            group_size=gs,
            bits=bits,
            backend="cuda",
            factory=matmul._mlx_factory("cuda"),
        )
    return matmul.launch(x, w[0], plan, backend="cuda", factory=matmul._mlx_factory("cuda"))


def reference(x, w, bits, gs):
    """The product in fp32 on the CPU, from the same (quantized) weights."""
    with mx.stream(mx.cpu):
        xf = x.astype(mx.float32)
        if bits:
            s, b = (a.astype(mx.float32) for a in w[1:])
            return mx.quantized_matmul(xf, w[0], s, b, transpose=True, group_size=gs, bits=bits)
        return xf @ w[0].astype(mx.float32).T


def rel_err(a, b) -> float:
    with mx.stream(mx.cpu):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def bench_shape(name, kind, m, sets, plan, n_calls):
    dtype, bits, gs = KINDS[kind]
    n, k = SHAPES[name]
    x = mx.random.normal((m, k)).astype(dtype)
    mx.eval(x)
    ref = reference(x, sets[0], bits, gs)
    out = kernel(x, sets[0], bits, gs, plan)
    mx.eval(out)
    err = rel_err(out, ref)
    stock_err = rel_err(stock(x, sets[0], bits, gs), ref)
    ok = math.isfinite(err) and err < TOL
    t_stock = timed(lambda i: stock(x, sets[i % len(sets)], bits, gs), n_calls)
    t_kernel = timed(lambda i: kernel(x, sets[i % len(sets)], bits, gs, plan), n_calls)
    nbytes = weight_bytes(n, k, dtype, bits, gs)
    return {
        "shape": name,
        "N": n,
        "K": k,
        "kind": kind,
        "M": m,
        "plan": {
            "nw": plan.nw,
            "rt": plan.rt,
            "wk": plan.wk,
            "unroll": plan.unroll,
            "nsplit": plan.nsplit,
            "k_split": plan.k_split,
        },
        "check_err": err,
        "stock_err": stock_err,
        "ok": ok,
        "stock_us": t_stock * 1e6,
        "kernel_us": t_kernel * 1e6,
        "speedup": t_stock / t_kernel,
        "kernel_tb_s": nbytes / t_kernel / 1e12,
        "stock_tb_s": nbytes / t_stock / 1e12,
    }


def bench_layers(kind, rows, n_layers, repeats=5, fused=False):
    """36 layers' matmuls: 252 distinct weights, one evaluation per pass (with `fused`,
    also the stock pass over 144 fused ones: q/k/v and gate/up each one matrix)."""
    dtype, bits, gs = KINDS[kind]
    weights = []
    for _ in range(n_layers):
        for name in LAYER:
            n, k = SHAPES[name]
            weights.append((name, make_weights(n, k, dtype, bits, gs, 1)[0]))
    fused_weights = []
    for _ in range(n_layers if fused else 0):
        for name in LAYER_FUSED:
            n, k = FUSED[name]
            fused_weights.append((name, make_weights(n, k, dtype, bits, gs, 1)[0]))
    plans = {
        (name, m): matmul.make_plan("cuda", *SHAPES[name], bits, dtype.size, m=m)
        for name in SHAPES
        for m in rows
    }
    xs = {}
    for m in rows:
        for k in {k for _, k in SHAPES.values()}:
            xs[(m, k)] = mx.random.normal((m, k)).astype(dtype)
    mx.eval(xs)

    def run(m, path):
        ys = []
        for name, w in fused_weights if path == "fused" else weights:
            x = xs[(m, FUSED[name][1])]
            if path in ("stock", "fused"):
                ys.append(stock(x, w, bits, gs))
            else:
                ys.append(kernel(x, w, bits, gs, plans[(name, m)]))
        return ys

    out = {}
    for m in rows:
        for path in ("stock", "kernel") + (("fused",) if fused else ()):
            mx.eval(run(m, path))
            mx.synchronize()
            samples = []
            for _ in range(repeats):
                ys = run(m, path)
                mx.synchronize()
                t0 = time.perf_counter()
                mx.eval(ys)
                mx.synchronize()
                samples.append(time.perf_counter() - t0)
            out[f"{path}_{m}_ms"] = statistics.median(samples) * 1e3
    mx.clear_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and calls (a smoke run)")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--layers-only", action="store_true", help="only the layers' pass, + fused")
    args = ap.parse_args()
    if not mx.cuda.is_available():
        print("needs MLX's CUDA backend (on a Mac: python -m dflash_mlx.calibrate)")
        return 1
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    device = str(info.get("device_name", "gpu"))
    print(f"device: {device}; MLX {mx.__version__}")
    rows, shapes = ROWS, list(SHAPES)
    n_calls = 40
    if args.quick:
        rows, shapes, n_calls = (1, 16), ["q/o", "k/v"], 10
    results = {
        "device": device,
        "mlx": mx.__version__,
        "host": platform.node(),
        "shapes": [],
        "layers": {},
        "variants": [],
        "errors": [],
    }

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))

    hdr = f"{'shape':8s} {'kind':6s} {'M':>3s} {'plan':>14s} {'stock us':>9s} {'kernel us':>9s} {'x':>6s} {'TB/s':>5s}  check"
    print(hdr)
    for kind, (dtype, bits, gs) in KINDS.items():
        for name in shapes if not args.layers_only else []:
            n, k = SHAPES[name]
            try:
                sets = make_weights(
                    n,
                    k,
                    dtype,
                    bits,
                    gs,
                    max(2, math.ceil(4 * L2_BYTES / weight_bytes(n, k, dtype, bits, gs))),
                )
                for m in rows:
                    plan = matmul.make_plan("cuda", n, k, bits, dtype.size, m=m)
                    r = bench_shape(name, kind, m, sets, plan, n_calls)
                    results["shapes"].append(r)
                    p = f"{plan.nw}w{plan.rt}r{plan.unroll}u{plan.nsplit}s"
                    print(
                        f"{name:8s} {kind:6s} {m:3d} {p:>14s} {r['stock_us']:9.1f} "
                        f"{r['kernel_us']:9.1f} {r['speedup']:6.2f} {r['kernel_tb_s']:5.2f}  "
                        f"{'ok' if r['ok'] else 'FAIL'} {r['check_err']:.1e}",
                        flush=True,
                    )
                del sets
                mx.clear_cache()
            except Exception as e:  # noqa: BLE001 - record and go on: one GPU call
                traceback.print_exc()
                results["errors"].append(f"{name} {kind}: {type(e).__name__}: {e}")
            save()

    n_layers = args.layers if not args.quick else 4
    print(f"\n{n_layers} layers' matmuls (7 per layer, distinct weights), ms per pass:")
    for kind in KINDS:
        try:
            t = bench_layers(kind, (1, 16), n_layers, fused=args.layers_only)
            t["kernel16_over_stock1"] = t["kernel_16_ms"] / t["stock_1_ms"]
            t["kernel16_over_kernel1"] = t["kernel_16_ms"] / t["kernel_1_ms"]
            t["stock16_over_stock1"] = t["stock_16_ms"] / t["stock_1_ms"]
            results["layers"][kind] = t
            print(
                f"  {kind}: stock 1 row {t['stock_1_ms']:.2f}, 16 rows {t['stock_16_ms']:.2f} | "
                f"kernel 1 row {t['kernel_1_ms']:.2f}, 16 rows {t['kernel_16_ms']:.2f} | "
                f"kernel16/stock1 {t['kernel16_over_stock1']:.2f} (target <= 1.1), "
                f"kernel16/kernel1 {t['kernel16_over_kernel1']:.2f}"
                + (
                    f" | fused stock 1 row {t['fused_1_ms']:.2f}, 16 rows {t['fused_16_ms']:.2f}"
                    if "fused_1_ms" in t
                    else ""
                ),
                flush=True,
            )
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            results["errors"].append(f"layers {kind}: {type(e).__name__}: {e}")
        save()

    if args.layers_only:
        save()
        return 0
    print("\ntiling variants at 16 rows (nw, rt row tiles, wk along K, unroll, nsplit):")
    # (nw, rt, wk, unroll, nsplit); None: the plan's choice. wk > 1: simdgroups along K
    # summed in threadgroup memory (fewer or no split-K sum passes).
    variants = [
        (4, 1, 1, 4, None),
        (2, 1, 1, 4, None),
        (8, 1, 1, 4, None),
        (4, 1, 1, 2, None),
        (4, 1, 1, 8, None),
        (4, 1, 1, 4, 1),
        (4, 1, 1, 4, "2x"),
        (4, 2, 1, 2, None),
        (4, 2, 1, 4, None),
        (2, 1, 4, 4, None),
        (2, 1, 4, 4, 1),
        (1, 1, 8, 4, 1),
        (4, 1, 2, 4, None),
        (2, 2, 4, 2, None),
        (2, 2, 4, 2, 1),
    ]
    for kind, (dtype, bits, gs) in KINDS.items():
        for name in ["q/o", "k/v"] if args.quick else ["q/o", "k/v", "gate/up", "down"]:
            n, k = SHAPES[name]
            try:
                sets = make_weights(
                    n,
                    k,
                    dtype,
                    bits,
                    gs,
                    max(2, math.ceil(4 * L2_BYTES / weight_bytes(n, k, dtype, bits, gs))),
                )
                for nw, rt, wk, unroll, nsplit in variants:
                    if nsplit == "2x":
                        nsplit = 2 * matmul.make_plan("cuda", n, k, bits, dtype.size, m=16).nsplit
                    p = matmul.make_plan(
                        "cuda",
                        n,
                        k,
                        bits,
                        dtype.size,
                        m=16,
                        nw=nw,
                        rt=rt,
                        wk=wk,
                        unroll=unroll,
                        nsplit=nsplit,
                    )
                    r = bench_shape(name, kind, 16, sets, p, n_calls)
                    results["variants"].append(r)
                    print(
                        f"  {name:8s} {kind:6s} nw={p.nw} rt={p.rt} wk={p.wk} unroll={p.unroll} "
                        f"nsplit={p.nsplit:2d}: "
                        f"{r['kernel_us']:8.1f} us ({r['kernel_tb_s']:.2f} TB/s) "
                        f"{'ok' if r['ok'] else 'FAIL'}",
                        flush=True,
                    )
                del sets
                mx.clear_cache()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                results["errors"].append(f"variants {name} {kind}: {type(e).__name__}: {e}")
            save()

    print("\nfastest variant at 16 rows per shape (vs the default plan, the first variant):")
    for kind in KINDS:
        for name in SHAPES:
            rs = [r for r in results["variants"] if r["kind"] == kind and r["shape"] == name]
            rs = [r for r in rs if r["ok"]]
            if not rs:
                continue
            best = min(rs, key=lambda r: r["kernel_us"])
            print(
                f"  {name:8s} {kind:6s} {best['plan']}: {best['kernel_us']:.1f} us "
                f"({rs[0]['kernel_us'] / best['kernel_us']:.2f}x the default)"
            )

    # Candidate entries for matmul.MEASURED: rows where the kernel won by >= 5% at every shape.
    cand = []
    for kind in KINDS:
        wins = [
            m
            for m in rows
            if all(
                r["speedup"] >= 1.05 and r["ok"]
                for r in results["shapes"]
                if r["kind"] == kind and r["M"] == m
            )
            and any(r["kind"] == kind and r["M"] == m for r in results["shapes"])
        ]
        if wins:
            cand.append((matmul.weight_kind(KINDS[kind][0], KINDS[kind][1]), min(wins), max(wins)))
    results["measured_candidates"] = cand
    print(f"\ncandidate matmul.MEASURED['cuda'] entries (kind, m_min, m_max): {cand}")
    failed = [r for r in results["shapes"] + results["variants"] if not r["ok"]]
    print(f"checks: {len(failed)} failed; errors: {len(results['errors'])}")
    save()
    return 1 if failed or results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
