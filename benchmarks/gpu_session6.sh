#!/bin/bash
# Session 6's GPU calls (one H200), after the two-part MLX CUDA setup (shared/device/README.md):
#   bash benchmarks/gpu_session6.sh train     # DFlash 2 draft for the demo target (part 1)
#   bash benchmarks/gpu_session6.sh resume    # ... resumed from its last save, tau compared
#   bash benchmarks/gpu_session6.sh measure   # compiled static cycle A/B, demo pair, bf16 rows
#   bash benchmarks/gpu_session6.sh auto      # --block-size auto on static caches vs off
# Logs go to $OUT; WORK=/tmp/w persists between calls while the machine stays warm.
set -u
source benchmarks/gpu_step.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case "$1" in
train | resume)
  extra=""
  [[ $1 == resume ]] && extra="--resume"
  # The dflash2 stage of examples/train_demo.sh, its python under a timeout of its own.
  DEMO=dflash_mlx/demo_pair WORK=/tmp/w PYTHON="timeout ${LIMIT:-540} python3" \
    DFLASH2_ARGS="--save-every 250 $extra" bash examples/train_demo.sh dflash2 \
    >>"$out/dflash2_$1.log" 2>&1
  echo "=== exit $?"
  tail -25 "$out/dflash2_$1.log"
  cp /tmp/w/dflash2/train_result.json "$out/" 2>/dev/null
  cp /tmp/w/dflash2/config.json "$out/dflash2_config.json" 2>/dev/null
  ;;
measure)
  step 100 verify_rows python3 benchmarks/verify_rows.py --model dflash_mlx/demo_pair/target \
    --draft dflash_mlx/demo_pair/draft --prompts dflash_mlx/demo_pair/eval_prompts.jsonl
  step 200 ab_bf16 python3 benchmarks/ab_cycle.py --shape 8b --contexts 1024,8192 --rounds 2 \
    --json "$out/ab_bf16.json"
  step 150 ab_q4 python3 benchmarks/ab_cycle.py --shape 8b --bits 4 --contexts 1024 --rounds 1 \
    --json "$out/ab_q4.json"
  step 100 demo python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --json "$out/demo.json"
  ;;
auto)
  step 200 auto python3 benchmarks/bench_auto.py --contexts 128,1k,4k --n-prompts 4 \
    --max-tokens 128 --repeats 2 --out "$out/auto_h200"
  # The same with static caches off (every loop on the general path; auto measures its
  # own costs there), in the same call.
  XDG_CACHE_HOME=/tmp/cache_general step 200 auto_general python3 -c "import sys, runpy; sys.argv = sys.argv[1:]
from dflash_mlx import session; session.STATIC_MAX_POSITIONS['cuda'] = 0
runpy.run_path(sys.argv[0], run_name='__main__')" benchmarks/bench_auto.py --contexts 128,1k,4k \
    --n-prompts 4 --max-tokens 128 --repeats 2 --out "$out/auto_h200_general"
  ;;
esac
