# Sourced by benchmarks/gpu_session*.sh: the environment and the `step` helper.
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
out=${OUT:-/tmp/out}
mkdir -p "$out"
step_tail() { tail -5 "$1"; } # what step shows of its log (a script may redefine it)
step() {  # step SECONDS LOGNAME COMMAND...: timeout on the command itself, never stop
  local limit=$1 name=$2
  shift 2
  echo "=== $* (limit ${limit}s)" | tee -a "$out/$name.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$out/$name.log" 2>&1
  echo "=== exit $? after $((SECONDS - t0))s" | tee -a "$out/$name.log"
  step_tail "$out/$name.log"
}
