#!/bin/bash
# Session 9's GPU calls (one H200), after the two-part MLX CUDA setup (shared/device/README.md):
#   bash benchmarks/gpu_session9.sh probe    # block-attention anatomy (+ ncu), profiles at HEAD
#   bash benchmarks/gpu_session9.sh tables   # the cycle tables (bf16, 4-bit) and demo
# Logs go to $OUT.
set -u
source benchmarks/gpu_step.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
case "$1" in
probe)
  step 150 anatomy python3 benchmarks/attention_anatomy.py --cases 1536:1024,24576:16384 \
    --plans "split_len=128;split_len=384" --json "$out/anatomy.json"
  grep -v "^=" "$out/anatomy.log" | cut -c1-150
  step 120 ncu_attention ncu --clock-control none -k regex:attention_bfloat16 --launch-count 4 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    python3 benchmarks/attention_anatomy.py --ncu --cases 1536:1024,24576:16384
  grep -E "Duration|Registers|Achieved Occupancy|Theoretical Occupancy|Memory Throughput|DRAM Throughput|Compute \(SM\)|Stall|Block Limit|Waves" "$out/ncu_attention.log" | head -60
  step 100 profile_bf16 python3 benchmarks/profile_kernels.py --shape 8b --contexts 1024 \
    --json "$out/profile_bf16.json"
  grep "^== " "$out/profile_bf16.log"
  step 100 profile_q4 python3 benchmarks/profile_kernels.py --shape 8b --bits 4 --contexts 1024 \
    --json "$out/profile_q4.json"
  grep "^== " "$out/profile_q4.log"
  step 90 host_profile python3 benchmarks/host_profile.py --shape 8b --context 1024
  tail -17 "$out/host_profile.log"
  for ops in 20 100; do  # MLX's CUDA graph size (MLX_MAX_OPS_PER_BUFFER, default 20)
    export MLX_MAX_OPS_PER_BUFFER=$ops
    step 100 cycle_ops$ops python3 benchmarks/bench_cycle.py --shapes 8b --contexts 1024 \
      --out "$out/cycle_ops$ops.json"
  done
  unset MLX_MAX_OPS_PER_BUFFER
  ;;
env)  # MLX's CUDA graphs: per-op host cost, and the cycle under each setting (1k, bf16)
  step 60 host_per_op python3 benchmarks/host_per_op.py
  env MLX_USE_CUDA_GRAPHS=0 bash -c "source benchmarks/gpu_step.sh; step 60 host_per_op_nographs \
    python3 benchmarks/host_per_op.py" | tail -9
  for setting in "" MLX_USE_CUDA_GRAPHS=0 MLX_MAX_OPS_PER_BUFFER=20 MLX_MAX_OPS_PER_BUFFER=400; do
    name=cycle_env_$(echo "${setting:-default}" | tr '=' '_')
    env $setting bash -c "source benchmarks/gpu_step.sh; step 60 $name python3 benchmarks/bench_cycle.py \
      --shapes 8b --contexts 1024 --out $out/$name.json" | tail -2
  done
  ;;
final)  # one call: anatomy A/B, MLX graph settings, the tables, demo (then one tar)
  step 60 anatomy_final python3 benchmarks/attention_anatomy.py --cases 1536:1024,24576:16384 \
    --variants "default;q-regs;no-load;no-tiles"
  grep -v "^=" "$out/anatomy_final.log" | grep -v "^  " | cut -c1-150
  step 60 host_per_op python3 benchmarks/host_per_op.py
  env MLX_USE_CUDA_GRAPHS=0 bash -c "source benchmarks/gpu_step.sh; step 60 host_per_op_nographs \
    python3 benchmarks/host_per_op.py" | tail -9
  for setting in "" MLX_USE_CUDA_GRAPHS=0; do
    for bits in 16 4; do
      name=cycle_$(echo "${setting:-default}" | tr '=' '_')_b$bits
      flag=$([ $bits = 4 ] && echo "--bits 4")
      env $setting bash -c "source benchmarks/gpu_step.sh; step 90 $name python3 benchmarks/bench_cycle.py \
        --shapes 8b $flag --contexts 1024,8192,16384 --out $out/$name.json" | tail -5
    done
  done
  for setting in "" MLX_USE_CUDA_GRAPHS=0; do
    name=demo_$(echo "${setting:-default}" | tr '=' '_')
    env $setting bash -c "source benchmarks/gpu_step.sh; step 60 $name python3 -m dflash_mlx.benchmark \
      --prompts dflash_mlx/demo_pair/eval_prompts.jsonl --max-prompts 16 -m 256 \
      --ignore-chat-template --json $out/$name.json" | tail -4
  done
  (cd "$out" && tar czf session9_final.tgz --remove-files *.log *.json *.md 2>/dev/null)
  ;;
tables)
  step 240 cycle_bf16 python3 benchmarks/bench_cycle.py --shapes 8b --contexts 1024,8192,16384 \
    --out "$out/cycle_bf16.json"
  step 240 cycle_q4 python3 benchmarks/bench_cycle.py --shapes 8b --bits 4 --contexts 1024,8192,16384 \
    --out "$out/cycle_q4.json"
  step 100 demo python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --json "$out/demo.json"
  tail -12 "$out/demo.log"
  ;;
esac
