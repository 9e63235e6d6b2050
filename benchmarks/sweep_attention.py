"""Block-attention tilings as a static verify runs them: 36 dependent calls, valid length
on the device, the plan made for the whole buffer.

    python benchmarks/sweep_attention.py [--cases 1536:1024,24576:16384] [--lq 16]
        [--variants "split_len=128;bn=64"] [--json F]

Each case is buffer rows : valid keys (a static cache of that capacity holding that many
positions). Every call reads its own layer's K/V (bf16, 8 KV heads, GQA 4, D 128) and
its queries are the previous call's output, so calls run one after another as in a
forward. Paths: the default plan (`source.make_plan`) and each variant's overrides
(`wm`, `bn`, `nbuf`, `split_len`); ms per 36 calls, median of repeats (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_chain import median_ms, overrides

from dflash_mlx.kernels import attention
from dflash_mlx.kernels.backend import mlx_factory
from dflash_mlx.kernels.source import make_plan

HQ, HKV, D = 32, 8, 128


def kv_layers(n_layers: int, cap: int) -> list[list[mx.array]]:
    """Each layer's own K/V buffers (bf16, [1, HKV, cap, D]), evaluated."""
    layers = []
    for _ in range(n_layers):
        kv = [mx.random.normal((1, HKV, cap, D)).astype(mx.bfloat16) for _ in range(2)]
        mx.eval(kv)
        layers.append(kv)
    return layers


def chain(q, layers, valid, plan, factory, split_on_device: bool | None = None) -> mx.array:
    for k, v in layers:
        q = attention.launch(
            q,
            k,
            v,
            plan,
            scale=D**-0.5,
            causal=True,
            window=None,
            backend="cuda",
            factory=factory,
            valid_length=valid,
            split_on_device=split_on_device,
        )
    return q


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="1536:1024,24576:16384")
    p.add_argument("--lq", type=int, default=16)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--variants", default="split_len=64;split_len=128;bn=64;wm=2")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    factory = mlx_factory("cuda")
    variants = {"default": {}}
    for text in filter(None, args.variants.split(";")):
        variants[text] = overrides(text)
    results = {"mlx": mx.__version__, "lq": args.lq, "rows": []}
    for case in args.cases.split(","):
        cap, n = (int(x) for x in case.split(":"))
        layers = kv_layers(args.layers, cap)
        q = mx.random.normal((1, HQ, args.lq, D)).astype(mx.bfloat16)
        valid = mx.array(n, dtype=mx.int32)
        line = {}
        for name, over in variants.items():
            plan = make_plan("cuda", 2, 1, HKV, HQ // HKV, args.lq, cap, D, None, **over)
            if plan is None:
                continue
            build = lambda: chain(q, layers, valid, plan, factory)  # noqa: B023 (used now)
            ms = median_ms(build, args.repeats)
            line[name] = ms
            results["rows"].append(
                {"capacity": cap, "valid": n, "variant": name, "ms": ms, "plan": repr(plan)}
            )
            print(f"  {cap}:{n} {name}: {ms:.2f} ms  {plan}", flush=True)
        print(f"{cap}:{n} " + " | ".join(f"{k} {v:.2f}" for k, v in line.items()), flush=True)
        layers.clear()  # free this case's K/V before the next
        mx.clear_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
