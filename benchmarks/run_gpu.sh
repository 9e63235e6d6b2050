#!/bin/bash
# Every GPU measurement the results in benchmarks/results/ come from, in three stages that
# each fit one device call (10 minutes). On the GPU machine, after the two-part MLX CUDA
# setup (shared/device/README.md), with pytest's wheels carried in .whl:
#
#   bash benchmarks/run_gpu.sh 1    # CUDA kernel tests, parity suite on CUDA (first part)
#   bash benchmarks/run_gpu.sh 2    # parity (rest), attention and verify-forward benchmarks
#   bash benchmarks/run_gpu.sh 3    # cycle vs decode step (auto and SDPA attention), demo pair
#
# Logs and JSON go to $OUT (default: benchmarks/results/gpu). A step that fails or runs
# out of its time is reported and the stage goes on with the next one.
set -u
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
log="$out/stage$1.log"

step() {  # step SECONDS COMMAND...: run, log, and never stop the stage
  local limit=$1
  shift
  echo "=== $* (limit ${limit}s)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import mlx.core as mx, mlx_lm, torch; print('mlx', mx.__version__, 'mlx_lm', mlx_lm.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$log"

PARITY_TAIL="q4 or target_layer_ids or decode_loop"
case "$1" in
1)
  # A fresh machine JIT-compiles every MLX CUDA op on first use: most of these minutes.
  step 170 python3 -m pytest tests/test_kernels.py -m cuda -q -p no:cacheprovider
  DFLASH_PARITY_LOG="$out/parity-cuda.txt" \
    step 380 python3 -m pytest tests/test_parity.py -q -s -p no:cacheprovider -k "not ($PARITY_TAIL)"
  ;;
2)
  DFLASH_PARITY_LOG="$out/parity-cuda.txt" \
    step 250 python3 -m pytest tests/test_parity.py -q -s -p no:cacheprovider -k "$PARITY_TAIL"
  step 120 python3 benchmarks/bench_attention.py --out "$out"
  step 80 python3 benchmarks/bench_verify.py --out "$out"
  ;;
3)
  # Default routing (auto) against SDPA everywhere, then the demo pair.
  step 150 python3 benchmarks/bench_cycle.py --shapes 8b,4b --contexts 1024,8192,16384 \
    --out "$out/cycle_auto.json"
  DFLASH_BLOCK_ATTENTION=sdpa \
    step 150 python3 benchmarks/bench_cycle.py --shapes 8b --contexts 1024,16384 \
    --out "$out/cycle_sdpa.json"
  step 100 python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --context 1024,3072 --json "$out/demo_context.json"
  step 60 python3 -m dflash_mlx.benchmark --prompts dflash_mlx/demo_pair/eval_prompts.jsonl \
    --max-prompts 16 -m 256 --ignore-chat-template --json "$out/demo.json"
  ;;
*)
  echo "usage: bash benchmarks/run_gpu.sh 1|2|3" >&2
  exit 2
  ;;
esac
