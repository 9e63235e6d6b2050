#!/bin/bash
# Train the demo pair from a seed: the target (examples/train_target.py), then its
# DFlash draft (dflash-mlx train), then tau on held-out prompts.
#
#   bash examples/train_demo.sh           # both, one command
#   bash examples/train_demo.sh target    # step 1: target + prompt files
#   bash examples/train_demo.sh draft     # step 2: draft (+ tau), needs step 1's target
#
# Outputs (package data, so a wheel ships them): dflash_mlx/demo_pair/target (mlx-lm / HF
# Qwen3), dflash_mlx/demo_pair/draft (DFlash draft), dflash_mlx/demo_pair/eval_prompts.jsonl;
# logs under $WORK. Knobs: SEED, WORK, PYTHON, TARGET_ARGS, DRAFT_ARGS (extra arguments,
# e.g. smaller settings for a CPU try).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
SEED=${SEED:-0}
WORK=${WORK:-/tmp/dflash-demo}
PY=${PYTHON:-python3}
DEMO=dflash_mlx/demo_pair
PROMPTS="--draft-prompts 12288 --eval-prompts 32"
mkdir -p "$WORK" "$DEMO"

if [[ $STAGE == all || $STAGE == target ]]; then
  start=$SECONDS
  $PY examples/train_target.py --out $DEMO/target --prompts-dir "$WORK" --seed "$SEED" \
    --steps 500 --warmup 50 --batch-size 64 --seq-len 512 --lr 3e-3 $PROMPTS ${TARGET_ARGS:-} 2>&1 | tee "$WORK/target.log"
  cp "$WORK/eval_prompts.jsonl" $DEMO/eval_prompts.jsonl
  echo "[time] target stage: $((SECONDS - start))s" | tee -a "$WORK/target.log"
fi

if [[ $STAGE == all || $STAGE == draft ]]; then
  start=$SECONDS
  # The same prompts as step 1 wrote (deterministic from the seed), in case $WORK is new.
  [[ -f $WORK/draft_prompts.jsonl ]] ||
    $PY examples/train_target.py --prompts-only --prompts-dir "$WORK" --seed "$SEED" $PROMPTS
  $PY -m dflash_mlx.train --model $DEMO/target --data "$WORK/draft_prompts.jsonl" \
    --out $DEMO/draft --cache-dir "$WORK/cache" --eval-data $DEMO/eval_prompts.jsonl \
    --seed "$SEED" --num-layers 3 --target-layer-ids 1,3,5 --block-size 16 \
    --gen-max-tokens 256 --gen-batch-size 512 --seq-len 512 \
    --steps 3000 --batch-size 32 --blocks-per-seq 32 --lr 1.5e-3 --save-every 1000 \
    --no-progress ${DRAFT_ARGS:-} 2>&1 | tee "$WORK/draft.log"
  # The full-precision training state (for --resume) stays out of the shipped checkpoint.
  rm -rf "$WORK/train_state" && mv $DEMO/draft/train_state "$WORK/train_state"
  echo "[time] draft stage: $((SECONDS - start))s" | tee -a "$WORK/draft.log"
fi
