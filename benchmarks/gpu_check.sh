#!/usr/bin/env bash
# The device check of issue 12, staged and time-boxed: from a bare copy of the tree on one GPU, at
# most 7 minutes of wall time with the build (--quick: 3, for the rerun after a fix).
#
#   FNEVR_COMMIT=<sha> bash benchmarks/gpu_check.sh [--quick] [--dry-run]
#
# FNEVR_GPU_BUDGET=<seconds> replaces the run's deadline (420, --quick 180); each stage keeps its cap.
# Stages, in priority order, each with its own time-out (its cap, or less when the run's deadline
# is nearer) and its elapsed time printed. Files go to $OUT (default benchmarks/results) as they are
# produced, named gpu-<what>-STAMP.*, so a time-out loses only the stage it cut (at most 8 files: the
# device machine returns no more):
#   env      nvidia-smi, versions, commit                                 gpu-env-STAMP.txt
#   build    the CUDA extension for this GPU's arch only, on every core;  gpu-build-STAMP.log
#            skipped when built here before from the same sources
#   tests    pytest -m gpu_check (--quick: gpu_quick), pytest-xdist      gpu-tests-STAMP.txt
#   warm     during tests, niced: every benchmark case run once, one process per group and dtype,
#            so the Triton and Inductor compiles are cached in parallel   $FNEVR_GPU_CACHE/warm-STAMP.txt
#   bench    benchmarks/gpu_bench.py: the four ops, op-call overhead      gpu-bench-STAMP.jsonl (a row at a time)
#   model    inference frames/s, a vox-256 training step                  the same .jsonl
#   summary  one line per target, backend choice per op                   gpu-summary-STAMP.txt, .json
# Everything printed is also in gpu-check-STAMP.log; gpu-stages-STAMP.txt has each stage's status.
# Triton and Inductor caches live in build/gpu-cache (FNEVR_GPU_CACHE), kept on a warm machine.
#
# --dry-run walks every stage on the CPU: build checks that the extension imports, tests collects
# the same selection and checks it covers every op x backend x dtype, the benchmarks run at tiny
# shapes with the cpu backend standing in for cuda and triton and torch.compile(backend=aot_eager).
# tests/test_gpu_check.py runs it in CI: the device is never the first place this script runs.
set -uo pipefail
cd "$(dirname "$0")/.."
self=benchmarks/gpu_check.sh
py=${PYTHON:-python3}

if [[ ${1:-} == --run-stage ]]; then
  stage=$2
else
  mode=full dry=0
  for arg in "$@"; do
    case $arg in
      --quick) mode=quick ;;
      --dry-run) dry=1 ;;
      *) echo "usage: bash $self [--quick] [--dry-run]" >&2; exit 2 ;;
    esac
  done
  commit=${FNEVR_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo nogit)}
  if [[ -z ${FNEVR_COMMIT:-} ]] && ! git diff --quiet HEAD 2>/dev/null; then commit+=-dirty; fi
  suffix=$([[ $dry == 1 ]] && echo -dry || ([[ $mode == quick ]] && echo -quick))
  export GC_MODE=$mode GC_DRY=$dry GC_COMMIT=$commit GC_STAMP=$(date -u +%Y%m%d-%H%M%S)-$commit$suffix
  export OUT=${OUT:-benchmarks/results} PYTHONUNBUFFERED=1
  export FNEVR_GPU_CACHE=${FNEVR_GPU_CACHE:-build/gpu-cache}
  cache=$FNEVR_GPU_CACHE
  mkdir -p "$OUT" "$cache"
  export TRITON_CACHE_DIR=$(cd "$cache" && pwd)/triton TORCHINDUCTOR_CACHE_DIR=$(cd "$cache" && pwd)/inductor
fi
stamp=${GC_STAMP:-} quick=$([[ ${GC_MODE:-} == quick ]] && echo 1 || echo 0) dry=${GC_DRY:-0}
bench_args=()
[[ $quick == 1 ]] && bench_args+=(--quick)
[[ $dry == 1 ]] && bench_args+=(--dry-run)

# --- the stages (each runs as `bash gpu_check.sh --run-stage NAME`, under its own time-out) ------

stage_env() {
  {
    echo "commit $GC_COMMIT, $(date -u +%FT%TZ), mode $GC_MODE$([[ $dry == 1 ]] && echo ' (dry run)')"
    if command -v nvidia-smi > /dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    else
      echo "no nvidia-smi"
    fi
    $py - <<'EOF'
import importlib.metadata as md, platform, torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "triton",
      version("triton"), "pytest", version("pytest"), "xdist", version("pytest-xdist"), "pytest-timeout",
      version("pytest-timeout"))
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability %d.%d" % torch.cuda.get_device_capability())
EOF
    nvcc --version 2>/dev/null | tail -1 || echo "no nvcc"
    echo "cpus $(nproc), $(free -g | awk '/Mem/ {print $2 " GB memory"}')"
  } 2>&1 | tee "$OUT/gpu-env-$stamp.txt"
}

import_check() {  # the extension and the Triton kernels import; on a GPU the CUDA extension too
  $py -c "
import fnevr, fnevr.kernels
from fnevr import _extension as e
print('fnevr from', fnevr.__file__)
print('cpu extension:', 'available' if e.cpu else e.cpu_reason, '| cuda extension built:', e.cuda is not None)
assert e.cpu, e.cpu_reason
if $([[ $dry == 1 ]] && echo False || echo True):
    assert e.cuda, e.cuda_reason
    print('cuda backends:', fnevr.ops.backends('cuda'))
"
}

stage_build() {
  if [[ $dry == 1 ]]; then import_check; return; fi
  local arch sources stampfile start
  arch=$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
  sources=$( (cat setup.py pyproject.toml $(find csrc -type f | sort); echo "$arch"; $py -c 'import torch; print(torch.__version__)') \
             | sha256sum | cut -c1-16)
  stampfile=$FNEVR_GPU_CACHE/extension-built
  if [[ -f $stampfile && $(cat "$stampfile") == "$sources" ]] && import_check > /dev/null 2>&1; then
    echo "extension up to date (built here from the same sources for sm_${arch/./}): build skipped"
  else
    start=$SECONDS
    echo "building for TORCH_CUDA_ARCH_LIST=$arch with MAX_JOBS=$(nproc)"
    if ! FNEVR_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) \
        $py -m pip install --no-build-isolation --no-deps -e . > "$OUT/gpu-build-$stamp.log" 2>&1; then
      tail -40 "$OUT/gpu-build-$stamp.log"
      return 1
    fi
    echo "build time: $((SECONDS - start)) s"
  fi
  import_check && echo "$sources" > "$stampfile"
}

stage_tests() {
  local marker=$([[ $quick == 1 ]] && echo gpu_quick || echo gpu_check) log="$OUT/gpu-tests-$stamp.txt" rc
  local cov=(--coverage "$log") args=(-m "$marker" -p no:cacheprovider)
  [[ $quick == 1 ]] || cov+=(--fp64)
  if [[ $dry == 1 ]]; then
    $py -m pytest tests "${args[@]}" --collect-only -q > "$log" 2>&1
    rc=$?
    tail -1 "$log"
    $py benchmarks/gpu_summary.py "${cov[@]}" || rc=1
    return $rc
  fi
  # One process per core (Triton compiles cold, on the CPU, one kernel per process); a hung case
  # fails on its own (pytest-timeout) instead of holding the stage.
  if $py -c 'import xdist' 2>/dev/null; then
    args+=(-n "$(( $(nproc) < 16 ? $(nproc) : 16 ))")
    $py -c 'import xdist, sys; sys.exit(tuple(map(int, xdist.__version__.split(".")[:2])) < (3, 2))' \
      && args+=(--dist worksteal)
  fi
  $py -c 'import pytest_timeout' 2>/dev/null \
    && args+=(--timeout "$([[ $quick == 1 ]] && echo 60 || echo 120)" --timeout-method thread)  # also inside C
  echo "pytest tests ${args[*]}"
  # One thread per worker: the cores are the workers'; Inductor compiles in the worker too.
  OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 \
    $py -m pytest tests "${args[@]}" -v -rfE > "$log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR) " "$log" | cut -c1-300 | head -40
  tail -1 "$log"
  $py benchmarks/gpu_summary.py "${cov[@]}"
  return $rc
}

stage_warm() {
  local log="$FNEVR_GPU_CACHE/warm-$stamp.txt"  # its failures reach the console; the rest stays here
  $py benchmarks/gpu_bench.py --list-shards "${bench_args[@]}" \
    | PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 \
      xargs -P "$(nproc)" -I{} \
        sh -c "nice -n 10 $py benchmarks/gpu_bench.py --warm ${bench_args[*]} {} >> '$log' 2>&1 || echo 'warm {}: failed'"
  grep -E "^--- warm|failed" "$log"
}

stage_bench() {
  $py benchmarks/gpu_bench.py --out "$OUT" --stamp "$stamp" --groups "$($py -m fnevr.ops list --sep ,),overhead" \
    "${bench_args[@]}"
}

stage_model() {
  $py benchmarks/gpu_bench.py --out "$OUT" --stamp "$stamp" --groups model,train "${bench_args[@]}"
}

stage_summary() {
  # $OUT may be new on every call (the device machine's): a full run's rows are kept in the cache
  # too, for the baselines a later --quick run does not re-time.
  local kept=$FNEVR_GPU_CACHE/results
  $py benchmarks/gpu_summary.py --out "$OUT" --stamp "$stamp" --baselines "$kept" "${bench_args[@]}" || return 1
  if [[ $quick == 0 && $dry == 0 && -f $OUT/gpu-bench-$stamp.jsonl ]]; then
    mkdir -p "$kept" && cp "$OUT/gpu-bench-$stamp.jsonl" "$kept/"
  fi
}

if [[ -n ${stage:-} ]]; then
  "stage_$stage"
  exit $?
fi

# --- the run: caps per stage, and a deadline that keeps the summary's time -----------------------

if [[ $dry == 1 ]]; then
  budget=300; declare -A cap=([env]=30 [build]=60 [tests]=90 [warm]=150 [bench]=150 [model]=150 [summary]=30)
elif [[ $quick == 1 ]]; then
  budget=180; declare -A cap=([env]=15 [build]=150 [tests]=75 [warm]=60 [bench]=50 [model]=40 [summary]=15)
else
  budget=420; declare -A cap=([env]=20 [build]=240 [tests]=150 [warm]=130 [bench]=110 [model]=70 [summary]=20)
fi
budget=${FNEVR_GPU_BUDGET:-$budget}  # e.g. more for a --quick run that must rebuild the extension
deadline=$((SECONDS + budget)) reserve=${cap[summary]}
stages="$OUT/gpu-stages-$stamp.txt" console="$OUT/gpu-check-$stamp.log"
: > "$stages"
failed=0

run_stage() {  # NAME: run it under min(its cap, the time left before the summary's reserve)
  local name=$1 limit start rc status
  limit=$(( deadline - SECONDS ))
  [[ $name == summary ]] || limit=$(( limit - reserve ))
  (( limit > ${cap[$name]} )) && limit=${cap[$name]}
  if (( limit < 10 )); then
    echo "=== $name: skipped, no time left" | tee -a "$console"
    echo "$name skipped" >> "$stages"
    return 1
  fi
  echo "=== $name (time-out $limit s)" | tee -a "$console"
  start=$SECONDS
  # SIGINT lets pytest and the benchmarks end cleanly (the warm-up runs in the background, where
  # bash has SIGINT ignored: it gets SIGTERM); SIGKILL 15 s later.
  timeout -s "$([[ $name == warm ]] && echo TERM || echo INT)" -k 15 "$limit" bash "$self" --run-stage "$name" 2>&1 \
    | tee -a "$console"
  rc=${PIPESTATUS[0]}
  case $rc in 0) status=ok ;; 124|137) status="timed out" ;; *) status="failed (rc $rc)" ;; esac
  echo "=== $name: $status, $((SECONDS - start)) s" | tee -a "$console"
  echo "$name $status $((SECONDS - start))s/${limit}s" >> "$stages"
  return $rc
}

echo "fnevr GPU check $stamp: $budget s budget; files in $OUT" | tee "$console"
run_stage env || failed=1
if run_stage build; then
  run_stage warm & warm=$!  # in the background: the tests get the CPUs first (the warm-up is niced)
  run_stage tests || failed=1
  wait "$warm" || failed=1
  run_stage bench || failed=1
  run_stage model || failed=1
else
  failed=1
fi
run_stage summary || failed=1
echo "total $SECONDS s; files: $(cd "$OUT" && ls -m gpu-*-"$stamp"*)" | tee -a "$console"
exit $failed
