"""One DFlash cycle vs one mlx_lm decode step, on random-weight targets of real shapes.

For each target shape and context length this measures, in one process:
  ar_step     one mlx_lm decode step (mlx_lm.generate.generate_step, greedy)
  verify      one target forward over a block of B tokens (the verify's floor)
  cycle       one cycle of the production loop (dflash_mlx.generate.dflash_cycles)
  phases      draft / verify / accept+rollback / host of an instrumented copy of the
              cycle (dflash_mlx.benchmark.cycle_breakdown, barriers between phases)
and reports cycle / ar_step and efficiency = model-math cycle time / production cycle
time (model math = instrumented cycle minus its host graph-building time; with tau
equal in both, this is measured speedup / (tau * ar_step / model-math cycle)).

Random weights reject nearly every drafted token, so every cycle drafts and verifies
a full block of B tokens and keeps one: exactly the per-cycle cost the ratio is about.

  python benchmarks/bench_cycle.py --shapes 4b,8b --contexts 1024,8192,16384 \
      --out benchmarks/results/cycle_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx_lm.models import qwen3
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash_mlx.benchmark import (
    cycle_breakdown,
    decode_step_time,
    production_cycle_time,
)
from dflash_mlx.config import DraftConfig, build_target_layer_ids
from dflash_mlx.drafter import DraftModel

# Qwen3 target shapes (from their config.json) and the DFlash draft made for each:
# 5 layers of the target's width (z-lab's Qwen3-4B/8B drafts: ~0.5B / ~1B parameters).
SHAPES = {
    "4b": {"hidden": 2560, "layers": 36, "inter": 9728, "heads": 32, "kv": 8, "tie": True},
    "8b": {"hidden": 4096, "layers": 36, "inter": 12288, "heads": 32, "kv": 8, "tie": False},
    # "tiny" is for a quick check on the CPU.
    "tiny": {"hidden": 128, "layers": 12, "inter": 256, "heads": 4, "kv": 2, "tie": True},
}
VOCAB, MASK_ID, HEAD_DIM, DRAFT_LAYERS = 151936, 151669, 128, 5


def n_params(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(module.parameters()))


def build(
    shape: str, dtype: mx.Dtype, block_size: int, bits: int | None = None
) -> tuple[nn.Module, DraftModel]:
    s = SHAPES[shape]
    vocab = VOCAB if shape != "tiny" else 1024
    head_dim = HEAD_DIM if shape != "tiny" else 32
    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        intermediate_size=s["inter"],
        num_attention_heads=s["heads"],
        rms_norm_eps=1e-6,
        vocab_size=vocab,
        num_key_value_heads=s["kv"],
        max_position_embeddings=40960,
        head_dim=head_dim,
        tie_word_embeddings=s["tie"],
        rope_theta=1000000.0,
    )
    # nn init draws random (not zero) weights lazily on the default device; cast and
    # materialise one layer at a time so the float32 draws never all live at once.
    model = qwen3.Model(args)
    model.set_dtype(dtype)
    for layer in model.layers:
        mx.eval(layer.parameters())
        if bits:  # the target's linear layers (not the embedding), as mlx_lm quantizes
            nn.quantize(layer, group_size=64, bits=bits)
            mx.eval(layer.parameters())
    mx.eval(model.parameters())
    config = DraftConfig.from_dict(
        {
            "architectures": ["DFlashDraftModel"],
            "block_size": block_size,
            "dflash_config": {
                "mask_token_id": MASK_ID if shape != "tiny" else vocab - 1,
                "target_layer_ids": build_target_layer_ids(s["layers"], DRAFT_LAYERS),
            },
            "num_target_layers": s["layers"],
            "hidden_size": s["hidden"],
            "intermediate_size": s["inter"],
            "num_hidden_layers": DRAFT_LAYERS,
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv"],
            "head_dim": head_dim,
            "vocab_size": vocab,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 40960,
        }
    )
    draft = DraftModel(config)
    draft.set_dtype(dtype)
    mx.eval(draft.parameters())
    return model, draft


def verify_forward_time(model: nn.Module, prompt: mx.array, block: int, reps: int = 16) -> float:
    """Seconds for one target forward over `block` tokens after the prompt (then trimmed)."""
    cache = make_prompt_cache(model)
    for start in range(0, prompt.size, 2048):
        model(prompt[None, start : start + 2048], cache=cache)
        mx.eval([c.state for c in cache])
    ids = prompt[None, -block:]
    times = []
    for _ in range(reps + 3):
        tic = time.perf_counter()
        mx.eval(mx.argmax(model(ids, cache=cache), axis=-1))
        times.append(time.perf_counter() - tic)
        for c in cache:
            c.trim(block)
    return statistics.median(times[3:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4b,8b")
    p.add_argument("--contexts", default="1024,8192,16384")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--bits", type=int, default=None, help="quantize the target (group 64)")
    p.add_argument("--cycles", type=int, default=24)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    dtype = getattr(mx, args.dtype)
    B = args.block_size
    contexts = [int(c) for c in args.contexts.split(",")]
    results = {
        "device": str(mx.default_device()),
        "cuda": mx.cuda.is_available(),
        "mlx": mx.__version__,
        "block_size": B,
        "dtype": args.dtype,
        "bits": args.bits,
        "command": "python benchmarks/bench_cycle.py " + " ".join(argv or sys.argv[1:]),
        "rows": [],
    }
    for shape in args.shapes.split(","):
        tic = time.perf_counter()
        model, draft = build(shape, dtype, B, args.bits)
        print(
            f"{shape}: target {n_params(model) / 1e9:.2f}B, draft {n_params(draft) / 1e9:.2f}B "
            f"params, built in {time.perf_counter() - tic:.1f} s",
            flush=True,
        )
        vocab = draft.config.vocab_size
        for ctx in contexts:
            mx.random.seed(ctx)
            # Random ids below the mask id; never all zeros.
            prompt = mx.random.randint(0, draft.mask_token_id, (ctx,)).astype(mx.int32)
            ar = decode_step_time(model, prompt, steps=args.steps)
            mx.clear_cache()
            verify = verify_forward_time(model, prompt, B)
            mx.clear_cache()
            cycle, tau = production_cycle_time(model, draft, prompt, args.cycles, block_size=B)
            mx.clear_cache()
            gaps = [1e3 * g for g in production_cycle_time.last_gaps]
            host = statistics.median(1e3 * h for h in production_cycle_time.last_host)
            bd = cycle_breakdown(model, draft, prompt, cycles=16, block_size=B)
            mx.clear_cache()
            row = {
                "shape": shape,
                "context": ctx,
                "ar_step_ms": 1e3 * ar,
                "verify_forward_ms": 1e3 * verify,
                "cycle_ms": 1e3 * cycle,
                "tau": tau,
                "cycle_over_ar": cycle / ar,
                "verify_over_ar": verify / ar,
                "efficiency": bd["model_ms"] / (1e3 * cycle),
                "breakdown": bd,
                "cycle_median_ms": statistics.median(gaps),
                "host_per_cycle_ms": host,
                "cycle_max_ms": max(gaps),
                "cycle_gaps_ms": gaps,
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "vocab": vocab,
            }
            results["rows"].append(row)
            print(
                f"  ctx {ctx:>6}: AR {row['ar_step_ms']:.2f} ms, verify({B}) "
                f"{row['verify_forward_ms']:.2f} ms, cycle {row['cycle_ms']:.2f} ms "
                f"-> cycle/AR {row['cycle_over_ar']:.3f}, efficiency {row['efficiency']:.3f} "
                f"| phases: draft {bd['draft_ms']:.2f}, verify {bd['verify_ms']:.2f}, "
                f"accept+rollback {bd['accept_rollback_ms']:.2f}, host {bd['host_ms']:.2f}, "
                f"model math {bd['model_ms']:.2f} ms | production median "
                f"{row['cycle_median_ms']:.2f} max {row['cycle_max_ms']:.2f} ms, host (not "
                f"waiting) {host:.2f} ms",
                flush=True,
            )
        del model, draft
        mx.clear_cache()
    print(
        f"\n{'shape':<5} {'ctx':>6} {'AR ms':>7} {'cycle ms':>9} {'cycle/AR':>9} {'eff':>6} "
        f"{'host ms':>8}"
    )
    for r in results["rows"]:
        print(
            f"{r['shape']:<5} {r['context']:>6} {r['ar_step_ms']:>7.2f} {r['cycle_ms']:>9.2f} "
            f"{r['cycle_over_ar']:>9.3f} {r['efficiency']:>6.3f} {r['host_per_cycle_ms']:>8.2f}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
