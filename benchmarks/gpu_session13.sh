#!/bin/bash
# Session 13's GPU call (one H200), after the two-part MLX CUDA setup (notes/DEVICE_PLAN.md),
# carrying .device/b:
#   bash benchmarks/gpu_session13.sh trace # auto's view per cycle (trace_auto.py), the costs
#   bash benchmarks/gpu_session13.sh rows  # auto rows (costs at 512 and 4k positions), demo pair
#   bash benchmarks/gpu_session13.sh rounds  # auto vs fixed-16 at 128 and 4k, 6 rounds
# Logs go to $OUT, packed into one tarball at the end.
set -u
source benchmarks/gpu_step.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
pack() { (cd "$out" && tar czf "session13_$1.tgz" --remove-files *.log *.json 2>/dev/null); }
step_tail() { grep -E "^== |^\| |^[0-9]+ \{|speedup|dflash |costs|ms per cycle|Error" "$1" | tail -16; }
if [ "$1" = trace ]; then
  step 300 trace python3 benchmarks/trace_auto.py --contexts 128,4k --n-prompts 4 \
    --max-tokens 128 --json "$out/trace.json"
  step 30 costs python3 -c "from dflash_mlx import calibrate, demo
calibrate._block_costs(str(demo.TARGET), str(demo.DRAFT), False)"
  pack trace
fi
if [ "$1" = rows ]; then
  step 260 auto python3 benchmarks/bench_auto.py --contexts 128,1k,4k --n-prompts 4 \
    --max-tokens 128 --repeats 2 --out "$out/auto_h200_session13"
  cp "$out/auto_h200_session13.md" "$out/auto.log" 2>/dev/null
  step 80 demo python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --json "$out/demo.json"
  pack rows
fi
if [ "$1" = rounds ]; then
  step 400 auto6 python3 benchmarks/bench_auto.py --contexts 128,4k --n-prompts 4 \
    --max-tokens 128 --repeats 6 --out "$out/auto6_h200_session13"
  cp "$out/auto6_h200_session13.md" "$out/auto6.log" 2>/dev/null
  pack rounds
fi
