"""Where the device time of a decode step and of a DFlash cycle goes, kernel by kernel.

    python benchmarks/profile_kernels.py --shape 8b --context 1024 [--bits 4] [--json F]

MLX's CUDA backend has no profiler of its own; PyTorch's (Kineto over CUPTI) records
every CUDA kernel the process launches, MLX's included. For each phase (an mlx_lm
decode step, a target forward of 1 and of B tokens, the draft's forward, one cycle of
the production loop) this reports, per iteration: wall time (measured without the
profiler), kernels launched, device busy time (union of kernel intervals), the busy
time per kernel category (matmul, attention, copy/update, reduction, fused, other) and
the costliest kernels. Wall minus busy is time the device sat idle: host work not
hidden behind the device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cycle import build

from dflash_mlx import session
from dflash_mlx.generate import dflash_cycles
from dflash_mlx.kernels import routing
from dflash_mlx.sampling import SamplingParams
from dflash_mlx.session import VerifySession

CATEGORIES = [  # first match wins
    ("matmul", r"gemm|gemv|xmma|cutlass|cublas|qmv|qmm|matmul|sm90_|nvjet"),
    ("attention", r"sdpa|flash|fmha|attention|cudnn|softmax_kernel"),
    ("copy/update", r"copy|slice|concat|gather|scatter|memcpy|memset|update"),
    ("reduction", r"reduce|norm|arg_|argmax|logsumexp|softmax|scan"),
    ("fused", r"compiled|fused"),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def kernel_events(step, iters: int) -> list[dict]:
    """CUDA kernel events ({name, ts, dur} in us) of `iters` calls of step()."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():  # e.g. a CPU check of the script: wall times only
        for _ in range(iters):
            step()
        return []
    torch.zeros(1, device="cuda").sum().item()  # CUPTI needs a CUDA context up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        mx.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        trace = json.loads(Path(path).read_text())
    return [
        e
        for e in trace.get("traceEvents", [])
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
    ]


def busy_us(events: list[dict]) -> float:
    """Length of the union of the events' intervals."""
    total, end = 0.0, -1.0
    for e in sorted(events, key=lambda e: e["ts"]):
        s, f = e["ts"], e["ts"] + e["dur"]
        if s >= end:
            total += f - s
            end = f
        elif f > end:
            total += f - end
            end = f
    return total


def summarize(name: str, events: list[dict], iters: int, wall_ms: float, top: int) -> dict:
    per_kernel: dict[str, list[float]] = defaultdict(list)
    per_cat: dict[str, float] = defaultdict(float)
    for e in events:
        per_kernel[e["name"]].append(e["dur"])
        per_cat[category(e["name"])] += e["dur"]
    busy = busy_us(events) / iters / 1e3
    row = {
        "phase": name,
        "wall_ms": wall_ms,
        "kernels": len(events) / iters,
        "busy_ms": busy,
        "idle_ms": wall_ms - busy,
        "categories_ms": {k: v / iters / 1e3 for k, v in sorted(per_cat.items())},
        "top": [
            {
                "name": k[:160],
                "category": category(k),
                "per_iter": len(v) / iters,
                "ms_per_iter": sum(v) / iters / 1e3,
                "mean_us": statistics.mean(v),
            }
            for k, v in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:top]
        ],
    }
    cats = ", ".join(f"{k} {v:.2f}" for k, v in row["categories_ms"].items())
    print(
        f"\n== {name}: wall {wall_ms:.2f} ms, {row['kernels']:.0f} kernels, device busy "
        f"{busy:.2f} ms, idle {wall_ms - busy:.2f} ms | {cats}",
        flush=True,
    )
    for t in row["top"]:
        print(
            f"   {t['ms_per_iter']:7.3f} ms  x{t['per_iter']:5.1f}  {t['mean_us']:8.1f} us"
            f"  [{t['category']}] {t['name'][:110]}"
        )
    return row


def timed(step, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    mx.synchronize()
    tic = time.perf_counter()
    for _ in range(iters):
        step()
    mx.synchronize()
    return 1e3 * (time.perf_counter() - tic) / iters


def profile_context(model, draft, prompt, B: int, n: int, top: int, general: bool) -> list:
    rows = []
    print(f"\n##### context {prompt.size}", flush=True)

    # An mlx_lm decode step (its own loop: async_eval pipelining included).
    def steps():
        gen = generate_step(prompt, model, max_tokens=10**6)
        for _ in range(4):
            next(gen)
        return lambda: next(gen)

    wall = timed(steps(), 2 * n)
    rows.append(summarize("mlx_lm step", kernel_events(steps(), n), n, wall, top))

    # Target forwards of 1 and B tokens after the prompt (mlx_lm caches, trimmed back).
    cache = make_prompt_cache(model)
    for s in range(0, prompt.size, 2048):
        model(prompt[None, s : s + 2048], cache=cache)
        mx.eval([c.state for c in cache])
    for width in (1, B):
        ids = prompt[None, -width:]

        def forward(ids=ids, width=width):
            mx.eval(mx.argmax(model(ids, cache=cache), axis=-1))
            for c in cache:
                c.trim(width)

        wall = timed(forward, n)
        rows.append(summarize(f"target forward {width}", kernel_events(forward, n), n, wall, top))

    # The draft's forward (B - 1 drafts), eager, on a session's draft cache.
    with VerifySession(model, draft, None) as vs:
        vs.prefill(prompt, 2048, None)
        anchor = prompt[-1:]
        greedy = SamplingParams()

        def propose():
            mx.eval(vs.propose(anchor, B - 1, greedy)[0])

        wall = timed(propose, n)
        rows.append(summarize("draft forward", kernel_events(propose, n), n, wall, top))

        # The B-token forward again as a verify runs it (the session's hooks: fused
        # projections, kernel routing), on the mlx_lm caches above.
        def verify_forward(ids=prompt[None, -B:]):
            with routing.verifying():
                mx.eval(mx.argmax(model(ids, cache=cache), axis=-1))
            for c in cache:
                c.trim(B)

        wall = timed(verify_forward, n)
        events = kernel_events(verify_forward, n)
        rows.append(summarize(f"verify forward {B}", events, n, wall, top))

    # One cycle of the production loop (the compiled static cycle where it applies) and,
    # with `general`, the same with static caches off.
    def cycles():
        gen = dflash_cycles(model, draft, prompt, max_tokens=(4 * n + 16) * B, block_size=B)
        for _ in range(6):
            next(gen)
        return lambda: next(gen)

    static = VerifySession.can_go_static
    for name in ("dflash cycle", "dflash cycle, general path")[: 1 + general]:
        if "general" in name:
            VerifySession.can_go_static = lambda self, positions=None: False
        try:
            wall = timed(cycles(), 2 * n)
            rows.append(summarize(name, kernel_events(cycles(), n), n, wall, top))
        finally:
            VerifySession.can_go_static = static
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8b")
    p.add_argument("--model", default=None, help="a real target (with --draft-model)")
    p.add_argument("--draft-model", default=None)
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--contexts", default="1024")
    p.add_argument("--static-max", type=int, default=None, help="static caches up to N (CUDA)")
    p.add_argument("--general", action="store_true", help="also the general path's cycle")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    B = args.block_size
    if args.model:
        from dflash_mlx import load, load_draft

        model, _ = load(args.model)
        draft = load_draft(args.draft_model)
    else:
        model, draft = build(args.shape, mx.bfloat16, B, bits=args.bits)
    if args.static_max is not None:
        session.STATIC_MAX_POSITIONS["cuda"] = args.static_max
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        mx.random.seed(0)
        prompt = mx.random.randint(0, draft.mask_token_id, (context,)).astype(mx.int32)
        for row in profile_context(model, draft, prompt, B, args.iters, args.top, args.general):
            rows.append({"context": context, **row})
        mx.clear_cache()

    if args.json:
        meta = {"shape": args.model or args.shape, "bits": args.bits, "block": B}
        meta["mlx"] = mx.__version__
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
