"""Cost of committing a verify on a hybrid (GatedDeltaNet) target: recorded replay vs re-run.

    python benchmarks/bench_rollback.py [--hidden 1024] [--layers 8] [--json out.json]

A random qwen3_5-shaped target (3 GatedDeltaNet layers per full-attention layer), a
prompt, then repeatedly: verify a 16-token block, commit k of its positions, timed with
mx.eval around each phase (median of 20). "replay" is the session's commit (conv state
sliced from the recorded conv input, only the recurrence replayed); "re-run" is the
previous method, forced for comparison: the whole mixer run again on the accepted
inputs, input projections included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
from mlx_lm.models import qwen3_5

from dflash_mlx.config import DraftConfig
from dflash_mlx.drafter import DraftModel
from dflash_mlx.session import VerifySession


def target(hidden: int, layers: int) -> qwen3_5.Model:
    args = qwen3_5.ModelArgs.from_dict(
        {
            "model_type": "qwen3_5",
            "text_config": {
                "model_type": "qwen3_5_text",
                "hidden_size": hidden,
                "num_hidden_layers": layers,
                "intermediate_size": 3 * hidden,
                "num_attention_heads": hidden // 128,
                "num_key_value_heads": 2,
                "head_dim": 128,
                "linear_num_value_heads": hidden // 64,
                "linear_num_key_heads": hidden // 128,
                "linear_key_head_dim": 128,
                "linear_value_head_dim": 64,
                "linear_conv_kernel_dim": 4,
                "full_attention_interval": 4,
                "vocab_size": 4096,
                "rms_norm_eps": 1e-6,
                "max_position_embeddings": 8192,
                "rope_parameters": {"rope_theta": 1e6, "partial_rotary_factor": 0.25},
                "tie_word_embeddings": True,
            },
        }
    )
    model = qwen3_5.Model(args)
    mx.eval(model.parameters())
    return model


def draft_for(hidden: int, layers: int) -> DraftModel:
    draft = DraftModel(
        DraftConfig.from_dict(
            {
                "block_size": 16,
                "dflash_config": {"mask_token_id": 4095, "target_layer_ids": [1, layers - 2]},
                "num_target_layers": layers,
                "hidden_size": hidden,
                "intermediate_size": 2 * hidden,
                "num_hidden_layers": 1,
                "num_attention_heads": hidden // 128,
                "num_key_value_heads": 2,
                "head_dim": 128,
                "vocab_size": 4096,
                "rope_theta": 1e6,
            }
        )
    )
    mx.eval(draft.parameters())
    return draft


def time_commits(model, draft, rerun: bool, keeps: list[int], reps: int) -> dict:
    block = mx.random.randint(0, 4000, (16,)).astype(mx.int32)
    verify_t, commit_t = [], []
    with VerifySession(model, draft) as session:
        session.prefill(mx.random.randint(0, 4000, (256,)).astype(mx.int32))
        mx.eval(session.state_arrays())
        if rerun:  # the previous method: every recurrent mixer re-run on the accepted inputs
            rb = session.rollback
            rb.recurrent = [(j, m, rec, None) for j, m, rec, _ in rb.recurrent]
        for i in range(reps + 3):
            k = keeps[i % len(keeps)]
            tic = time.perf_counter()
            logits = session.verify(block)
            mx.eval(logits, session.state_arrays())
            mid = time.perf_counter()
            session.commit(k)
            session.finish()
            mx.eval(session.state_arrays())
            toc = time.perf_counter()
            if i >= 3:
                verify_t.append(mid - tic)
                commit_t.append(toc - mid)
            # back to the same length for the next repetition
            for c in session.cache:
                if hasattr(c, "trim"):
                    c.trim(k)
            session.offset -= k
    return {
        "verify_ms": 1e3 * statistics.median(verify_t),
        "commit_ms": 1e3 * statistics.median(commit_t),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    mx.random.seed(0)
    model, draft = target(args.hidden, args.layers), draft_for(args.hidden, args.layers)
    keeps = [1, 4, 9, 16]
    rows = {}
    for name, rerun in (("replay", False), ("re-run", True)):
        rows[name] = time_commits(model, draft, rerun, keeps, args.reps)
    result = {
        "device": str(mx.default_device()),
        "shape": {"hidden": args.hidden, "layers": args.layers, "block": 16, "keeps": keeps},
        "rows": rows,
    }
    print(f"{'method':<8} {'verify(16) ms':>14} {'commit ms':>10} {'commit/verify':>14}")
    for name, r in rows.items():
        ratio = r["commit_ms"] / r["verify_ms"]
        print(f"{name:<8} {r['verify_ms']:>14.2f} {r['commit_ms']:>10.2f} {ratio:>14.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
