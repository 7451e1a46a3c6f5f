#!/usr/bin/env bash
# The whole check on a machine with a CUDA GPU: build fnevr with its CUDA kernels, run every test
# there (CUDA kernels, compiled Triton, bf16), then the benchmarks. Everything it prints and saves
# goes to ${OUT:-benchmarks/results}. Usage: bash benchmarks/gpu_check.sh [benchmark names...]
# (default: every benchmark: the four ops, the op-call overhead, inference and a training step)
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}
day=$(date -u +%Y-%m-%d)
read -r -a PYTEST_ARGS <<< "${FNEVR_PYTEST_ARGS:-}"
export FNEVR_BUILD_CUDA=1 FNEVR_EXPECT_BUILD=cpu,cuda PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $py -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  nvcc --version | tail -2
  echo "commit ${FNEVR_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)} date $(date -u +%FT%TZ)"
} > "$out/gpu-env-$day.txt" 2>&1
cat "$out/gpu-env-$day.txt"
if ! $py -m pip install --no-build-isolation --no-deps -e . > "$out/gpu-build-$day.log" 2>&1; then
  tail -40 "$out/gpu-build-$day.log"
  exit 1
fi
$py -m pytest tests -q -rfE -p no:cacheprovider "${PYTEST_ARGS[@]}" 2>&1 | tee "$out/gpu-tests-$day.txt" | tail -25
[ $# -gt 0 ] || set -- composite grid_sample spade_norm mlp_composite overhead model train
for bench in "$@"; do
  $py benchmarks/run.py "$bench" --save "$out" 2>&1 | grep -v "^$" | tail -40
done
