#!/bin/bash
# Session 7's GPU calls (one H200), after the two-part MLX CUDA setup (shared/device/README.md):
#   bash benchmarks/gpu_session7.sh profile   # kernels of a step, forwards, draft, cycle
#   bash benchmarks/gpu_session7.sh measure   # scatter writes + fused verify vs before (A/B)
#   bash benchmarks/gpu_session7.sh auto      # bench_auto (issue 15's table) + matmul sweep
# `measure` needs the package before this session's changes beside this one:
#   git archive c656738 dflash_mlx ':!dflash_mlx/demo_pair' | tar -x -C .old
#   mv .old/dflash_mlx .old/dflash_mlx_old
# Logs go to $OUT.
set -u
source benchmarks/gpu_step.sh
step_tail() { grep "^== " "$1" | tail -14; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case "$1" in
profile)
  step 200 profile_bf16 python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024,16384 \
    --static-max 32768 --general --json "$out/profile_bf16.json"
  step 120 profile_q4 python3 benchmarks/profile_kernels.py --shape 8b --bits 4 --contexts 1024 \
    --json "$out/profile_q4.json"
  step 90 profile_demo python3 benchmarks/profile_kernels.py --model dflash_mlx/demo_pair/target \
    --draft-model dflash_mlx/demo_pair/draft --contexts 1024,4096 --json "$out/profile_demo.json"
  step 150 matmul_layers python3 benchmarks/bench_matmul.py --layers-only \
    --json "$out/matmul_layers.json"
  grep -A3 "layers' matmuls" "$out/matmul_layers.log"
  ;;
measure)
  PYTHONPATH=$PYTHONPATH:$PWD/.old step 150 ab_bf16 python3 benchmarks/ab_cycle.py \
    --other dflash_mlx_old --shape 8b --contexts 1024,16384 --rounds 2 --static-max 32768 \
    --json "$out/ab_bf16.json"
  grep "round" "$out/ab_bf16.log"
  PYTHONPATH=$PYTHONPATH:$PWD/.old step 150 ab_q4 python3 benchmarks/ab_cycle.py \
    --other dflash_mlx_old --shape 8b --bits 4 --contexts 1024 --rounds 2 --json "$out/ab_q4.json"
  grep "round" "$out/ab_q4.log"
  step 120 profile_after python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024,16384 \
    --static-max 32768 --json "$out/profile_after.json"
  step 90 demo python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --json "$out/demo.json"
  tail -12 "$out/demo.log"
  ;;
auto)
  step 230 auto python3 benchmarks/bench_auto.py --contexts 128,1k,4k --n-prompts 4 \
    --max-tokens 128 --repeats 2 --out "$out/auto_h200"
  step 330 matmul python3 benchmarks/bench_matmul.py --json "$out/matmul_h200.json"
  tail -40 "$out/matmul.log"
  ;;
esac
