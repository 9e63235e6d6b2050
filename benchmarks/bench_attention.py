"""Block attention on the GPU: the kernel vs mx.fast.scaled_dot_product_attention.

Run on the GPU machine (MLX CUDA), from the repository root:

    python benchmarks/bench_attention.py [--out benchmarks/results] [--quick]

bf16, batch 1, 32 query heads over 8 KV heads (GQA 4), causal, Lq in {1, 8, 16, 32},
S in {1k, 4k, 8k, 16k, 32k}, head_dim in {128, 256}. Each time is the median over
repeats of one evaluation of many independent calls, each reading its own K/V (sets
rotate so that K/V come from HBM, not L2); achieved bandwidth = K+V bytes / time.
A large device copy measures the memory ceiling (bytes read + written / time).
Writes attention_<device>.json and attention_<device>.md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_mlx.kernels import attention, source

L2_BYTES = 50 * 2**20


def timed(fn, n_calls: int, repeats: int = 7) -> float:
    """Median seconds per call of fn(i) over `repeats` evaluations of n_calls calls.

    The graph is built before the clock starts; the evaluation encodes and runs it.
    """
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


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device copy."""
    x = mx.random.normal((256 * 2**20,)).astype(mx.bfloat16)  # 512 MiB
    mx.eval(x)
    t = timed(lambda i: x + (i + 1), 4, repeats=5)
    return 2 * x.nbytes / t


def kv_sets(S: int, D: int, hkv: int, dtype) -> list[tuple[mx.array, mx.array]]:
    per = 2 * S * D * hkv * dtype.size
    n = max(2, math.ceil(4 * L2_BYTES / per))
    sets = []
    for i in range(n):
        k = mx.random.normal((1, hkv, S, D)).astype(dtype)
        v = mx.random.normal((1, hkv, S, D)).astype(dtype)
        sets.append((k, v))
    mx.eval(sets)
    return sets


def kernel_fn(q, sets, scale, causal, plan, factory):
    def fn(i):
        k, v = sets[i % len(sets)]
        return attention.launch(
            q, k, v, plan, scale=scale, causal=causal, window=None, backend="cuda", factory=factory
        )

    return fn


def sdpa_fn(q, sets, scale, causal):
    mask = "causal" if causal and q.shape[2] > 1 else None

    def fn(i):
        k, v = sets[i % len(sets)]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    return fn


def plain_loads_factory():
    base = attention._mlx_factory("cuda")

    def make(name, input_names, output_names, src, header, shared_memory):
        return base(
            name + "_plain",
            input_names,
            output_names,
            src,
            "#define DF_NO_LDMATRIX\n" + header,
            shared_memory,
        )

    return make


def derive_thresholds(rows: list[dict], margin: float = 1.05) -> dict:
    """{(D, lq_min, lq_max): fewest keys} from which the kernel beat SDPA by `margin` at
    every larger measured S. Each measured Lq gets its own entry; the Lq between two
    measured ones take the larger (more conservative) of their two thresholds."""
    out = {}
    lqs = sorted({r["Lq"] for r in rows})
    for D in sorted({r["D"] for r in rows}):
        thr = {}
        for lq in lqs:
            pts = sorted((r["S"], r["speedup"]) for r in rows if r["D"] == D and r["Lq"] == lq)
            thr[lq] = next(
                (S for S, _ in pts if all(sp >= margin for s2, sp in pts if s2 >= S)), None
            )
        for prev, lq in zip([None] + lqs[:-1], lqs):
            if thr[lq] is None:
                continue
            out[(D, lq, lq)] = thr[lq]
            if prev is not None and lq - prev > 1 and thr[prev] is not None:
                out[(D, prev + 1, lq - 1)] = max(thr[prev], thr[lq])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    args = ap.parse_args()
    if not mx.cuda.is_available():
        print("needs MLX's CUDA backend")
        return 1
    dtype, hq, hkv = mx.bfloat16, 32, 8
    lqs = (1, 8, 16, 32)
    ss = (1024, 4096, 8192, 16384, 32768)
    ds = (128, 256)
    if args.quick:
        lqs, ss, ds = (1, 16), (1024, 16384), (128,)
    device = mx.device_info().get("device_name", "gpu") if hasattr(mx, "device_info") else "gpu"
    ceiling = copy_bandwidth()
    print(f"device: {device}; copy bandwidth (read + write): {ceiling / 1e12:.2f} TB/s")
    factory = attention._mlx_factory("cuda")
    rows = []
    for D in ds:
        for S in ss:
            sets = kv_sets(S, D, hkv, dtype)
            kv_bytes = 2 * S * D * hkv * dtype.size
            n_calls = max(len(sets), 16)
            for lq in lqs:
                q = mx.random.normal((1, hq, lq, D)).astype(dtype)
                scale = D**-0.5
                causal = lq > 1
                plan = source.make_plan("cuda", dtype.size, 1, hkv, hq // hkv, lq, S, D, None)
                t_sdpa = timed(sdpa_fn(q, sets, scale, causal), n_calls)
                t_kern = timed(kernel_fn(q, sets, scale, causal, plan, factory), n_calls)
                row = {
                    "D": D,
                    "S": S,
                    "Lq": lq,
                    "sdpa_us": t_sdpa * 1e6,
                    "kernel_us": t_kern * 1e6,
                    "speedup": t_sdpa / t_kern,
                    "kernel_TBps": kv_bytes / t_kern / 1e12,
                    "sdpa_TBps": kv_bytes / t_sdpa / 1e12,
                    "kernel_frac_of_copy": kv_bytes / t_kern / ceiling,
                    "plan": {
                        "BN": plan.BN,
                        "WM": plan.WM,
                        "NBUF": plan.NBUF,
                        "nsplit": plan.nsplit,
                        "n_rb": plan.n_rb,
                    },
                }
                rows.append(row)
                print(
                    f"D={D:3d} S={S:6d} Lq={lq:2d}  sdpa {row['sdpa_us']:8.1f} us  "
                    f"kernel {row['kernel_us']:8.1f} us  x{row['speedup']:5.2f}  "
                    f"{row['kernel_TBps']:.2f} TB/s ({100 * row['kernel_frac_of_copy']:.0f}% of copy)"
                    f"  nsplit={plan.nsplit}",
                    flush=True,
                )
            del sets

    # Variants at the headline shape: tile size, split count, fragment loads.
    variants = []
    D, S, lq = 128, 16384, 16
    sets = kv_sets(S, D, hkv, dtype)
    q = mx.random.normal((1, hq, lq, D)).astype(dtype)
    kv_bytes = 2 * S * D * hkv * dtype.size
    base_plan = source.make_plan("cuda", dtype.size, 1, hkv, 4, lq, S, D, None)
    for name, fac, kw in [
        ("default", factory, {}),
        ("plain loads", plain_loads_factory(), {}),
        ("BN=64", factory, {"bn": 64}),
        ("BN=64, split 2x coarser", factory, {"bn": 64, "split_len": base_plan.split_len * 2}),
        ("split 2x finer", factory, {"split_len": max(256, base_plan.split_len // 2)}),
        ("split 2x coarser", factory, {"split_len": base_plan.split_len * 2}),
        ("WM=2", factory, {"wm": 2}),
    ]:
        plan = source.make_plan("cuda", dtype.size, 1, hkv, 4, lq, S, D, None, **kw)
        t = timed(kernel_fn(q, sets, D**-0.5, True, plan, fac), max(len(sets), 16))
        variants.append(
            {
                "name": name,
                "us": t * 1e6,
                "TBps": kv_bytes / t / 1e12,
                "nsplit": plan.nsplit,
                "BN": plan.BN,
            }
        )
        print(f"variant {name:18s} {t * 1e6:8.1f} us  {kv_bytes / t / 1e12:.2f} TB/s  {plan}")

    thresholds = derive_thresholds(rows)
    print("attention.THRESHOLDS['cuda'] entries from this run:", thresholds)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda_" + "".join(c if c.isalnum() else "_" for c in str(device)).strip("_").lower()
    result = {
        "device": str(device),
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "copy_TBps": ceiling / 1e12,
        "dtype": "bfloat16",
        "heads": f"{hq}/{hkv}",
        "command": "python benchmarks/bench_attention.py",
        "rows": rows,
        "variants": variants,
        "thresholds": {f"{d},{lo},{hi}": v for (d, lo, hi), v in thresholds.items()},
        "env": {k: v for k, v in os.environ.items() if k.startswith("DFLASH")},
    }
    (args.out / f"attention_{tag}.json").write_text(json.dumps(result, indent=1))
    md = [
        f"# Block attention vs mx.fast.scaled_dot_product_attention ({device})",
        "",
        (
            f"bf16, B=1, {hq} query / {hkv} KV heads, causal for Lq > 1; MLX {mx.__version__}; "
            f"copy ceiling {ceiling / 1e12:.2f} TB/s (read + write). "
            "`python benchmarks/bench_attention.py`"
        ),
        "",
        "| D | S | Lq | SDPA µs | kernel µs | speedup | kernel TB/s | % of copy BW |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        md.append(
            f"| {r['D']} | {r['S']} | {r['Lq']} | {r['sdpa_us']:.1f} | {r['kernel_us']:.1f} | "
            f"{r['speedup']:.2f}x | {r['kernel_TBps']:.2f} | {100 * r['kernel_frac_of_copy']:.0f}% |"
        )
    md += [
        "",
        "Variants at D=128, S=16384, Lq=16:",
        "",
        "| variant | µs | TB/s |",
        "| --- | --- | --- |",
    ]
    for v in variants:
        md.append(f"| {v['name']} | {v['us']:.1f} | {v['TBps']:.2f} |")
    (args.out / f"attention_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
