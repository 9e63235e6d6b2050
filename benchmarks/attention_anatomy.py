"""Where a block-attention call's device time goes: the kernel with one stage left out.

    python benchmarks/attention_anatomy.py [--cases 1536:1024,24576:16384] [--json F]
    ncu --clock-control none -k regex:dflash_block_attention --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats python3 benchmarks/attention_anatomy.py --ncu

Each case is buffer rows : valid keys, as a static verify calls the kernel (valid length
on the device, the plan made for the buffer; bf16, 8 KV heads, GQA 4, D 128, 16 queries,
36 dependent calls). Variants patch the shared kernel body (benchmark-only copies, under
their own kernel names): `no-load` (K/V tiles never copied: compute on stale tiles),
`no-compute` (tiles copied, no products), `no-tiles` (queries in, results out, no keys); `host-split` is the kernel with each
split taking the plan's split_len of the buffer (before splits shared the valid keys).
Differences of device time (CUPTI, through PyTorch's profiler) place the time: loads,
math, fixed cost. SDPA rows for reference: cuDNN over the valid keys only (the eager
path's call, host length) and over the whole buffer with a mask (a static call's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_chain import median_ms, overrides
from profile_kernels import kernel_events
from sweep_attention import HKV, HQ, D, chain, kv_layers

from dflash_mlx.kernels.backend import mlx_factory
from dflash_mlx.kernels.source import make_plan

_LOAD = """            df_copy16_async(kdst, k + ko + d0);
            df_copy16_async(vdst, v + vo + d0);"""
_COMPUTE = "    if (warp_active) {\n      // S = Q K^T"
_TILES = "const int n_tiles = k_end > k_begin ? (k_end - k_begin + BN - 1) / BN : 0;"
_QLOAD = """      DF_UNROLL for (int kk = 0; kk < D / 16; ++kk) {
        df_frag_a<T> a;
        df_load_a(a, qw + kk * 16, LDK, df_lane);"""
_QREGS = """      if (tc == 0) {
        DF_UNROLL for (int kk = 0; kk < D / 16; ++kk) {
          df_load_a(qa[kk], qw + kk * 16, LDK, df_lane);
        }
      }
      DF_UNROLL for (int kk = 0; kk < D / 16; ++kk) {
        df_frag_a<T>& a = qa[kk];"""
_LOOP = "for (int step = 0; step < 2 * (n_tiles + 1); ++step) {"
PATCHES = {  # name: [(old, new), ...]
    "no-load": [(_LOAD, "")],
    "no-compute": [(_COMPUTE, "    if (false) {\n      // S = Q K^T")],
    "no-tiles": [(_TILES, "const int n_tiles = 0;")],
    # a candidate: the queries' A fragments kept in registers across tiles
    "q-regs": [(_QLOAD, _QREGS), (_LOOP, "df_frag_a<T> qa[D / 16];\n" + _LOOP)],
}


def patched_factory(name: str, base):
    """`base` (a CUDA factory) with pass 1's body patched (and renamed) for `name`."""
    if name not in PATCHES:
        return base

    def make(kname, inputs, outputs, source, header, smem):
        if kname == "dflash_block_attention":
            for old, new in PATCHES[name]:
                if old not in source:
                    raise SystemExit(f"patch {name!r} no longer matches the kernel body")
                source = source.replace(old, new)
            kname = f"{kname}_{name.replace('-', '_')}"
        return base(kname, inputs, outputs, source, header, smem)

    return make


def sdpa_chain(q, layers, n: int, masked: bool) -> mx.array:
    cap = layers[0][0].shape[2]
    if masked:  # a static call: the whole buffer, keys past n and the future masked
        pos = mx.arange(cap)[None]
        qpos = (n - q.shape[2] + mx.arange(q.shape[2]))[:, None]
        mask = pos <= qpos
    for k, v in layers:
        if masked:
            q = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)
        else:
            k, v = k[:, :, :n], v[:, :, :n]
            q = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
    return q


def device_us(build, iters: int) -> dict[str, float]:
    """Mean device us per call of each kernel kind in `build()`'s graph."""
    mx.eval(build())
    events = kernel_events(lambda: mx.eval(build()), iters)
    per: dict[str, list[float]] = {}
    for e in events:
        name = e["name"]
        kind = (
            "combine"
            if "combine" in name
            else "pass1"
            if "dflash_block_attention" in name
            else name[:48]
        )
        per.setdefault(kind, []).append(e["dur"])
    return {k: statistics.mean(v) for k, v in per.items() if len(v) >= iters}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="1536:1024,24576:16384")
    p.add_argument("--lq", type=int, default=16)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--variants", default="default;host-split;no-load;no-compute;no-tiles;q-regs")
    p.add_argument("--plans", default="", help="extra plan overrides, e.g. 'split_len=128'")
    p.add_argument("--ncu", action="store_true", help="a few default calls only (under ncu)")
    p.add_argument("--emulate", action="store_true", help="CPU check: the CUDA emulator")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    base = mlx_factory("cuda")
    if args.emulate:
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "emulation"))
        import emulator

        base = emulator.cuda_factory(Path(tempfile.mkdtemp()))
    results = {"mlx": mx.__version__, "lq": args.lq, "rows": []}
    plans = {"": {}}
    for text in filter(None, args.plans.split(";")):
        plans[text] = overrides(text)

    def record(case: str, label: str, build, width: int) -> None:
        wall = median_ms(build, 7) * 1e3 / args.layers
        dev = device_us(build, args.iters)
        results["rows"].append({"case": case, "variant": label, "wall_us": wall, "device_us": dev})
        kernels = " ".join(f"{k[:width]} {v:.1f}" for k, v in dev.items())
        print(f"{case} {label}: wall {wall:.1f} us/call | device us: {kernels}")

    for case in args.cases.split(","):
        cap, n = (int(x) for x in case.split(":"))
        layers = kv_layers(args.layers if not args.ncu else 2, cap)
        q = mx.random.normal((1, HQ, args.lq, D)).astype(mx.bfloat16)
        valid = mx.array(n, dtype=mx.int32)
        if args.ncu:
            plan = make_plan("cuda", 2, 1, HKV, HQ // HKV, args.lq, cap, D, None)
            mx.eval(chain(q, layers, valid, plan, base))
            continue
        for ptext, over in plans.items():
            plan = make_plan("cuda", 2, 1, HKV, HQ // HKV, args.lq, cap, D, None, **over)
            for name in filter(None, args.variants.split(";")):
                factory = patched_factory(name, base)
                on_device = name != "host-split"
                build = lambda: chain(q, layers, valid, plan, factory, on_device)  # noqa: B023
                record(case, f"{name}{' ' + ptext if ptext else ''}", build, 48)
        for masked in (False, True):
            build = lambda: sdpa_chain(q, layers, n, masked)  # noqa: B023
            record(case, "sdpa masked buffer" if masked else "sdpa valid keys", build, 40)
        layers.clear()
        mx.clear_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
