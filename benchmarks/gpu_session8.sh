#!/bin/bash
# Session 8's GPU calls (one H200), after the two-part MLX CUDA setup (shared/device/README.md):
#   bash benchmarks/gpu_session8.sh chain     # sequential matmul chain + profiles after the draft change
#   bash benchmarks/gpu_session8.sh sweep     # attention and matmul kernel tilings, in-forward
#   bash benchmarks/gpu_session8.sh auto      # bench_auto (issue 15's table) + demo end to end
#   bash benchmarks/gpu_session8.sh q4        # 4-bit: chain by width, A/B vs 9bf88e5, cycle table
#   bash benchmarks/gpu_session8.sh final     # profiles after the 4-bit and draft fusion changes, bench_auto
# q4 needs the package as of 9bf88e5 beside this one (.old/dflash_mlx_old, see gpu_session7.sh).
# Logs go to $OUT.
set -u
source benchmarks/gpu_step.sh
step_tail() { grep "^== " "$1" | tail -14; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case "$1" in
chain)
  step 150 chain python3 benchmarks/bench_chain.py --rows 1,4,8,16 --json "$out/chain.json"
  tail -20 "$out/chain.log"
  step 150 profile_bf16 python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024,16384 \
    --static-max 32768 --json "$out/profile_bf16.json"
  step 100 profile_q4 python3 benchmarks/profile_kernels.py --shape 8b --bits 4 --contexts 1024 \
    --json "$out/profile_q4.json"
  ;;
sweep)
  step 150 sweep_attention python3 benchmarks/sweep_attention.py --cases 1536:1024,6144:4096,24576:16384 \
    --variants "split_len=64;split_len=128;split_len=512;bn=64;wm=2;wm=1;nbuf=1" --json "$out/sweep_attention.json"
  grep -v "^  " "$out/sweep_attention.log"
  step 240 sweep_chain python3 benchmarks/bench_chain.py --rows 4,16 \
    --variants "nsplit=1;nw=8;nw=2;unroll=8;unroll=2;wk=2;rt=1;rt=2" --json "$out/sweep_chain.json"
  tail -6 "$out/sweep_chain.log"
  ;;
q4)
  step 130 chain_q4 python3 benchmarks/bench_chain.py --kinds q4g64 --rows 1,2,4,8,16,32 \
    --json "$out/chain_q4.json"
  grep "M=" "$out/chain_q4.log"
  PYTHONPATH=$PYTHONPATH:$PWD/.old step 150 ab_q4 python3 benchmarks/ab_cycle.py \
    --other dflash_mlx_old --shape 8b --bits 4 --contexts 1024,16384 --rounds 2 --static-max 32768 \
    --json "$out/ab_q4.json"
  grep "round" "$out/ab_q4.log"
  ;;
final)
  step 90 profile_bf16_final python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024 \
    --json "$out/profile_bf16_final.json"
  step 100 profile_q4_final python3 benchmarks/profile_kernels.py --shape 8b --bits 4 --contexts 1024 \
    --json "$out/profile_q4_final.json"
  step 200 auto_final python3 benchmarks/bench_auto.py --contexts 128,1k,4k --n-prompts 4 \
    --max-tokens 128 --repeats 2 --out "$out/auto_h200_final"
  tail -6 "$out/auto_final.log"
  ;;
auto)
  step 300 auto python3 benchmarks/bench_auto.py --contexts 128,1k,4k --n-prompts 4 \
    --max-tokens 128 --repeats 2 --out "$out/auto_h200"
  step 100 demo python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --json "$out/demo.json"
  tail -12 "$out/demo.log"
  ;;
esac
