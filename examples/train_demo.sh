#!/bin/bash
# Train the demo pair from a seed, for contexts up to 4096 tokens + 512 generated: the
# target (examples/train_target.py) on 4608-token windows, then its DFlash draft
# (dflash-mlx train) on the target's continuations of short and long prompts, then tau on
# held-out prompts: short ones, and long held-out texts cut to 128 / 1024 / 4096 tokens.
#
#   bash examples/train_demo.sh           # target + draft: the shipped pair, one command
#   bash examples/train_demo.sh target    # step 1: target + prompt files (+ eval_long.jsonl)
#   bash examples/train_demo.sh draft     # step 2: draft (+ tau), needs step 1's target
#   bash examples/train_demo.sh dflash2   # extra: a DFlash 2 draft for the same target, same
#                                         # recipe, into $WORK/dflash2 (not shipped); prints
#                                         # its tau beside the DFlash draft's
#
# Outputs (package data, so a wheel ships them): $DEMO/target (mlx-lm / HF Qwen3) and
# $DEMO/draft (DFlash draft). The held-out files $DEMO/eval_prompts.jsonl (32 short
# prompts) and $DEMO/eval_long.jsonl (8 texts of >= 4200 tokens) are kept when they exist
# (the shipped ones), written when missing. Logs, prompt files and the generation cache go
# under $WORK.
# Knobs: SEED, WORK, DEMO (default dflash_mlx/demo_pair), PYTHON, and extra arguments
# appended to the defaults (the last value of a flag wins): TARGET_ARGS (train_target.py),
# PROMPT_ARGS (its prompt files), DRAFT_ARGS (dflash-mlx train, draft and dflash2 stages),
# DFLASH2_ARGS (the dflash2 stage only). E.g. a CPU try with tiny settings:
#   DEMO=/tmp/try/demo WORK=/tmp/try/work TARGET_ARGS="--steps 3 --batch-size 2 --seq-len 512" ...
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
SEED=${SEED:-0}
WORK=${WORK:-/tmp/dflash-demo}
DEMO=${DEMO:-dflash_mlx/demo_pair}
PY=${PYTHON:-python3}
case $STAGE in all | target | draft | dflash2) ;; *)
  echo "error: unknown stage '$STAGE' (all, target, draft, dflash2)" >&2
  exit 2
  ;;
esac
# Draft prompts: 4096 short (a few lines) + 8192 long (128-4200 tokens, log-uniform);
# eval: 32 short prompts, 8 texts of >= 4200 tokens (cut to the contexts measured).
PROMPTS="--draft-prompts 4096 --draft-long-prompts 8192 --long-min-tokens 128 \
  --long-max-tokens 4200 --eval-prompts 32 --eval-long-prompts 8 --eval-long-tokens 4200 \
  ${PROMPT_ARGS:-}"
# The same data, blocks and loss for both draft architectures: 16 sequences (their own
# length, padded to a multiple of 512, at most 4608) x 64 blocks of 16 per step.
RECIPE="--model $DEMO/target --data $WORK/draft_prompts.jsonl --cache-dir $WORK/cache \
  --eval-data $DEMO/eval_prompts.jsonl --eval-long-data $DEMO/eval_long.jsonl \
  --eval-contexts 128,1024,4096 --seed $SEED --num-layers 3 --target-layer-ids 1,3,5 \
  --block-size 16 --gen-max-tokens 256 --gen-batch-size 512 --seq-len 4608 --steps 3000 \
  --batch-size 16 --blocks-per-seq 64 --lr 1.5e-3 --save-every 1000 --no-progress"
mkdir -p "$WORK" "$DEMO"

prompt_files() { # the same prompts as step 1 wrote (the same seed, corpus and tokenizer)
  [[ -f $WORK/draft_prompts.jsonl && -f $WORK/eval_long.jsonl ]] ||
    $PY examples/train_target.py --prompts-only --out "$DEMO/target" --prompts-dir "$WORK" \
      --seed "$SEED" $PROMPTS ${TARGET_ARGS:-}
  [[ -f $DEMO/eval_long.jsonl ]] || cp "$WORK/eval_long.jsonl" "$DEMO/eval_long.jsonl"
  [[ -f $DEMO/eval_prompts.jsonl ]] || cp "$WORK/eval_prompts.jsonl" "$DEMO/eval_prompts.jsonl"
}

if [[ $STAGE == all || $STAGE == target ]]; then
  start=$SECONDS
  # 7 windows of 4608 tokens per step (32k tokens, as 64 x 512 did), rope as before.
  $PY examples/train_target.py --out "$DEMO/target" --prompts-dir "$WORK" --seed "$SEED" \
    --steps 500 --warmup 50 --batch-size 7 --seq-len 4608 --lr 3e-3 $PROMPTS \
    ${TARGET_ARGS:-} 2>&1 | tee "$WORK/target.log"
  # The shipped held-out files stay (held out by path, on any Python's stdlib), so every
  # run and every machine measures the same texts; they are written only where missing.
  [[ -f $DEMO/eval_long.jsonl ]] || cp "$WORK/eval_long.jsonl" "$DEMO/eval_long.jsonl"
  [[ -f $DEMO/eval_prompts.jsonl ]] || cp "$WORK/eval_prompts.jsonl" "$DEMO/eval_prompts.jsonl"
  echo "[time] target stage: $((SECONDS - start))s" | tee -a "$WORK/target.log"
fi

if [[ $STAGE == all || $STAGE == draft ]]; then
  start=$SECONDS
  prompt_files
  $PY -m dflash_mlx.train $RECIPE --out "$DEMO/draft" ${DRAFT_ARGS:-} 2>&1 |
    tee "$WORK/draft.log"
  # The full-precision training state (for --resume) stays out of the shipped checkpoint.
  rm -rf "$WORK/train_state" && mv "$DEMO/draft/train_state" "$WORK/train_state"
  echo "[time] draft stage: $((SECONDS - start))s" | tee -a "$WORK/draft.log"
fi

if [[ $STAGE == dflash2 ]]; then
  start=$SECONDS
  prompt_files
  # Same recipe and data (the generation cache in $WORK/cache is shared when present).
  $PY -m dflash_mlx.train $RECIPE --out "$WORK/dflash2" --arch dflash2 --conv-kernel-size 2 \
    --conv-group-size 16 --selector-rank 64 --selector-top-k 16 ${DRAFT_ARGS:-} \
    ${DFLASH2_ARGS:-} 2>&1 | tee "$WORK/dflash2.log"
  $PY - "$DEMO/draft/train_result.json" "$WORK/dflash2/train_result.json" <<'EOF' | tee -a "$WORK/dflash2.log"
import json, sys
from pathlib import Path

runs = {}
for name, path in zip(("DFlash", "DFlash 2"), sys.argv[1:]):
    if Path(path).exists():
        runs[name] = json.loads(Path(path).read_text())
rows = [("short prompts", lambda r: r.get("eval"))]
contexts = sorted({int(c) for r in runs.values() for c in r.get("eval_long", {})})
rows += [(f"context {c}", lambda r, c=c: r.get("eval_long", {}).get(str(c))) for c in contexts]
print("[compare] tau (greedy, block 16), same target and data:")
print(f"[compare] {'':16}" + "".join(f"{name:>12}" for name in runs))
for label, get in rows:
    cells = [get(r) for r in runs.values()]
    print(f"[compare] {label:16}" + "".join(f"{c['tau']:12.3f}" if c else f"{'-':>12}" for c in cells))
for name, r in runs.items():
    print(f"[compare] {name}: {r['draft_parameters'] / 1e6:.2f}M parameters, final loss "
          f"{r['final_loss']:.3f}, train {r['train_seconds']:.0f}s")
EOF
  echo "[time] dflash2 stage: $((SECONDS - start))s" | tee -a "$WORK/dflash2.log"
fi
