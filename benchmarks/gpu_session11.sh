#!/bin/bash
# Session 11's GPU calls (one H200), after the two-part MLX CUDA setup (shared/device/README.md),
# carrying .device/b, .old (the package at this session's start as dflash_mlx_old) and .whl:
#   bash benchmarks/gpu_session11.sh probe   # host cost per kind of op, the cycle's kernels
#   bash benchmarks/gpu_session11.sh final   # CUDA tests, A/B against the start, tables, demo
# Logs go to $OUT, packed into one tarball at the end (a call brings back 8 files at most).
set -u
source benchmarks/gpu_step.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
pack() { (cd "$out" && tar czf "session11_$1.tgz" --remove-files *.log *.json 2>/dev/null); }
case "$1" in
probe)
  step 120 host_per_op python3 benchmarks/host_per_op.py --ops 400
  cat "$out/host_per_op.log"
  step 90 profile_bf16 python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024 \
    --json "$out/profile_bf16.json"
  grep "^== " "$out/profile_bf16.log"
  step 90 host_profile python3 benchmarks/host_profile.py --shape 8b --context 1024
  tail -30 "$out/host_profile.log"
  pack probe
  ;;
esac
# The second visit: host cost of a custom kernel against its source's length.
if [ "$1" = sizes ]; then
  step 150 host_per_op2 python3 benchmarks/host_per_op.py --ops 400
  cat "$out/host_per_op2.log"
  pack sizes
fi
# The third visit: the skinny kernel for bf16 verify matmuls (its host cost is a custom
# kernel's, not cuBLASLt's), in one process against cuBLAS; the lean preludes' host cost.
if [ "$1" = matmul ]; then
  step 100 host_per_op3 python3 benchmarks/host_per_op.py --ops 400
  grep -v "^===" "$out/host_per_op3.log"
  step 240 ab_matmul python3 benchmarks/ab_cycle.py --env DFLASH_MATMUL=kernel --shape 8b \
    --contexts 1024,16384 --rounds 2 --json "$out/ab_matmul.json"
  grep "^ctx" "$out/ab_matmul.log"
  DFLASH_MATMUL=kernel step 100 profile_kernel python3 benchmarks/profile_kernels.py --shape 8b \
    --contexts 1024 --json "$out/profile_kernel.json"
  grep "^== \|^ " "$out/profile_kernel.log" | tail -40
  pack matmul
fi
# The last two visits: one K/V buffer per layer (one scatter), residual add + norm as one
# kernel, lean preludes. CUDA tests, the cycle's kernels, A/B against this session's start
# (.old = the package at 90511e5), then the tables and the demo pair.
if [ "$1" = final ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  step 170 tests_cuda python3 -m pytest tests/test_fused_layers.py -m cuda -q -p no:cacheprovider
  tail -4 "$out/tests_cuda.log"
  step 80 profile_final python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024 \
    --json "$out/profile_final.json"
  grep "^== " "$out/profile_final.log"
  PYTHONPATH=$PYTHONPATH:$PWD/.old step 200 ab_final python3 benchmarks/ab_cycle.py \
    --other dflash_mlx_old --shape 8b --contexts 1024,16384 --rounds 2 --json "$out/ab_final.json"
  grep "^ctx" "$out/ab_final.log"
  pack final
fi
if [ "$1" = tables ]; then
  step 130 cycle_bf16 python3 benchmarks/bench_cycle.py --shapes 8b --contexts 1024,8192,16384 \
    --out "$out/cycle_bf16.json"
  tail -6 "$out/cycle_bf16.log"
  step 130 cycle_q4 python3 benchmarks/bench_cycle.py --shapes 8b --bits 4 \
    --contexts 1024,8192,16384 --out "$out/cycle_q4.json"
  tail -6 "$out/cycle_q4.log"
  step 100 demo python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --json "$out/demo.json"
  tail -8 "$out/demo.log"
  step 90 host_per_op4 python3 benchmarks/host_per_op.py --ops 400
  pack tables
fi
# The last visit: add + norm with its loads ahead of its stores (15.6 us a call before);
# everything again, most wanted first, into one log (what ran comes back if time runs out).
if [ "$1" = last ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  step_tail() { grep -E "^== |^ctx|^8b|speedup|dflash |cycle \(|passed|failed|add_rms" "$1" | tail -14; }
  step 70 last python3 -m pytest tests/test_fused_layers.py -m cuda -q -p no:cacheprovider \
    -k "add_norm or greedy"
  step 70 last python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024
  PYTHONPATH=$PYTHONPATH:$PWD/.old step 80 last python3 benchmarks/ab_cycle.py \
    --other dflash_mlx_old --shape 8b --contexts 1024,16384 --rounds 2 --json "$out/ab_last.json"
  step 100 last python3 benchmarks/bench_cycle.py --shapes 8b --contexts 1024,8192,16384 \
    --out "$out/cycle_bf16.json"
  step 70 last python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --json "$out/demo.json"
  step 100 last python3 benchmarks/bench_cycle.py --shapes 8b --bits 4 \
    --contexts 1024,8192,16384 --out "$out/cycle_q4.json"
  pack last
fi
