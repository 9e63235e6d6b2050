"""τ of the demo pair from the PyTorch reference loop and from dflash_mlx, side by side.

    python benchmarks/demo_pair_parity.py [--prompts N] [--tokens N]

Both run in float32 on the same held-out prompts (dflash_mlx/demo_pair/eval_prompts.jsonl); the
reference uses transformers' Qwen3ForCausalLM for the target and tests/reference for the
draft, independent of MLX.
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mlx_lm import load
from reference.decode import dflash_generate
from reference.model import load_reference
from transformers import Qwen3ForCausalLM

from dflash_mlx import load_draft
from dflash_mlx.demo import DEMO_DIR as DEMO
from dflash_mlx.generate import dflash_cycles


def compare(n_prompts: int, n_tokens: int) -> dict:
    torch.set_num_threads(1)
    model, tokenizer = load(str(DEMO / "target"))
    model.set_dtype(mx.float32)
    draft = load_draft(DEMO / "draft", dtype="float32")
    target = Qwen3ForCausalLM.from_pretrained(DEMO / "target", dtype=torch.float32).eval()
    reference = load_reference(DEMO / "draft", device="cpu")
    prompts = [json.loads(line)["prompt"] for line in (DEMO / "eval_prompts.jsonl").open()]
    rows = []
    for text in prompts[:n_prompts]:
        ids = tokenizer.encode(text)
        ref_tokens, ref_acc = dflash_generate(reference, target, torch.tensor([ids]), n_tokens)
        cycles = dflash_cycles(
            model, draft, mx.array(ids), max_tokens=n_tokens, block_size=draft.block_size
        )
        cycles = list(cycles)
        mlx_tokens = [t for c in cycles for t in c.tokens]
        mlx_acc = [c.accepted + 1 for c in cycles[1:]]
        rows.append(
            {
                "same_tokens": ref_tokens == mlx_tokens,
                # The last cycle may differ: dflash_mlx shrinks the final block.
                "same_acceptance": ref_acc[:-1] == mlx_acc[:-1],
                "reference_acceptance": ref_acc,
                "mlx_acceptance": mlx_acc,
            }
        )

    def tau(key: str) -> float:
        # Full cycles only (all but the last), so both loops count the same cycles.
        lengths = [a for r in rows for a in r[key][:-1]]
        return sum(lengths) / len(lengths)

    return {
        "prompts": len(rows),
        "tokens": n_tokens,
        "tau_reference": tau("reference_acceptance"),
        "tau_mlx": tau("mlx_acceptance"),
        "same_tokens": sum(r["same_tokens"] for r in rows),
        "same_acceptance": sum(r["same_acceptance"] for r in rows),
        "rows": rows,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--json", help="write the full result here")
    args = parser.parse_args()
    result = compare(args.prompts, args.tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{result['prompts']} prompts x {result['tokens']} tokens: "
        f"tau reference {result['tau_reference']:.3f}, tau dflash_mlx {result['tau_mlx']:.3f}; "
        f"identical tokens {result['same_tokens']}/{result['prompts']}, "
        f"identical acceptance {result['same_acceptance']}/{result['prompts']}"
    )
