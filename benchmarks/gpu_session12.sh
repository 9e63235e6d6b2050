#!/bin/bash
# Session 12's GPU calls (one H200), after the two-part MLX CUDA setup (notes/DEVICE_PLAN.md),
# carrying .device/b, .old (the package at 6435edf as dflash_mlx_old) and .whl:
#   bash benchmarks/gpu_session12.sh kernels  # CUDA tests, the cycle's kernels, A/B vs 6435edf
#   bash benchmarks/gpu_session12.sh rows     # auto block size rows, the cycle tables, demo pair
# Logs go to $OUT, packed into one tarball at the end (a call brings back 8 files at most).
set -u
source benchmarks/gpu_step.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
pack() { (cd "$out" && tar czf "session12_$1.tgz" --remove-files *.log *.json 2>/dev/null); }
step_tail() { grep -E "^== |^ctx|^\| |speedup|dflash |passed|failed|add_rms|Error" "$1" | tail -16; }
if [ "$1" = kernels ]; then
  step 120 tests_cuda python3 -m pytest tests/test_fused_layers.py -m cuda -q -p no:cacheprovider \
    -k "add_norm or greedy"
  step 80 profile python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024 \
    --json "$out/profile.json"
  grep -i "add_rms\|^== " "$out/profile.log" | head -20
  PYTHONPATH=$PYTHONPATH:$PWD/.old step 150 ab python3 benchmarks/ab_cycle.py \
    --other dflash_mlx_old --shape 8b --contexts 1024,16384 --rounds 3 --json "$out/ab.json"
  pack kernels
fi
if [ "$1" = rows ]; then
  step 150 auto python3 benchmarks/bench_auto.py --contexts 128,1k,4k --n-prompts 4 \
    --max-tokens 128 --repeats 2 --out "$out/auto_h200_session12"
  cp "$out/auto_h200_session12.md" "$out/auto.log" 2>/dev/null
  step 110 cycle_bf16 python3 benchmarks/bench_cycle.py --shapes 8b --contexts 1024,8192,16384 \
    --out "$out/cycle_bf16.json"
  step 80 demo python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --json "$out/demo.json"
  step 110 cycle_q4 python3 benchmarks/bench_cycle.py --shapes 8b --bits 4 \
    --contexts 1024,8192,16384 --out "$out/cycle_q4.json"
  pack rows
fi
