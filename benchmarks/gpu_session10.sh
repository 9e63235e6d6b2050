#!/bin/bash
# Session 10's GPU calls (one H200), after the two-part MLX CUDA setup (shared/device/README.md),
# carrying .device/b, .old (the package at 6d594af as dflash_mlx_old) and .whl (pytest):
#   bash benchmarks/gpu_session10.sh probe   # CUDA tests of the q/k/v kernel, profiles, A/B
#   bash benchmarks/gpu_session10.sh tables  # the cycle tables (bf16, 4-bit), demo pair
# Logs go to $OUT, packed into one tarball at the end (a call brings back 8 files at most).
set -u
source benchmarks/gpu_step.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
case "$1" in
probe)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  step 150 tests_cuda python3 -m pytest tests/test_fused_layers.py -m cuda -q -p no:cacheprovider
  step 70 profile_bf16 python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024 \
    --json "$out/profile_bf16.json"
  grep "^== " "$out/profile_bf16.log"
  step 70 profile_q4 python3 benchmarks/profile_kernels.py --shape 8b --bits 4 --contexts 1024 \
    --json "$out/profile_q4.json"
  grep "^== " "$out/profile_q4.log"
  PYTHONPATH=$PYTHONPATH:$PWD/.old step 200 ab_bf16 python3 benchmarks/ab_cycle.py \
    --other dflash_mlx_old --shape 8b --contexts 1024,16384 --rounds 2 --json "$out/ab_bf16.json"
  grep "^ctx" "$out/ab_bf16.log"
  (cd "$out" && tar czf session10_probe.tgz --remove-files *.log *.json 2>/dev/null)
  ;;
tables)
  step 200 cycle_bf16 python3 benchmarks/bench_cycle.py --shapes 8b --contexts 1024,8192,16384 \
    --out "$out/cycle_bf16.json"
  tail -6 "$out/cycle_bf16.log"
  step 200 cycle_q4 python3 benchmarks/bench_cycle.py --shapes 8b --bits 4 \
    --contexts 1024,8192,16384 --out "$out/cycle_q4.json"
  tail -6 "$out/cycle_q4.log"
  step 100 demo python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --json "$out/demo.json"
  tail -8 "$out/demo.log"
  (cd "$out" && tar czf session10_tables.tgz --remove-files *.log *.json 2>/dev/null)
  ;;
esac
# The second visit (after the first one's findings): the q/k/v kernel's CUDA tests with
# frequencies computed as MLX computes them, its device time by stage, the cycle's kernels.
if [ "$1" = probe2 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  step 150 tests_cuda2 python3 -m pytest tests/test_fused_layers.py -m cuda -q -p no:cacheprovider
  tail -15 "$out/tests_cuda2.log" | grep -v "^  "
  step 90 qkv_anatomy python3 benchmarks/qkv_anatomy.py
  step 150 profile_bf16_2 python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024 \
    --json "$out/profile_bf16_2.json"
  grep "^== " "$out/profile_bf16_2.log"
  PYTHONPATH=$PYTHONPATH:$PWD/.old step 150 ab_bf16_2 python3 benchmarks/ab_cycle.py \
    --other dflash_mlx_old --shape 8b --contexts 1024,16384 --rounds 2 --json "$out/ab_bf16_2.json"
  grep "^ctx" "$out/ab_bf16_2.log"
  (cd "$out" && tar czf session10_probe2.tgz --remove-files *.log *.json 2>/dev/null)
fi
# The third visit: swiglu and the heads-last attention output added; everything again,
# most wanted first, into one log (what ran comes back even if the budget ends the call).
if [ "$1" = final ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  step_tail() { grep -E "^== |^ctx|^8b|speedup|dflash |cycle \(|passed|failed" "$1" | tail -12; }
  step 60 final python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024
  PYTHONPATH=$PYTHONPATH:$PWD/.old step 70 final python3 benchmarks/ab_cycle.py \
    --other dflash_mlx_old --shape 8b --contexts 1024,16384 --rounds 2
  step 60 final python3 benchmarks/bench_cycle.py --shapes 8b --contexts 1024,8192,16384
  step 60 final python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template
  step 80 final python3 -m pytest tests/test_fused_layers.py -m cuda -q -p no:cacheprovider \
    -k "greedy or swiglu"
  step 90 final python3 benchmarks/bench_cycle.py --shapes 8b --bits 4 --contexts 1024,8192,16384
fi
