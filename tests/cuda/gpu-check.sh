#!/usr/bin/env bash
# The prepared GPU check of the cuda backend, for a machine with one GPU.
#
#   tests/cuda/gpu-check.sh OUTDIR [--no-build]
#
# Builds the CUDA tests and benchmarks in Release (build/gpu-check, for the
# architectures in SEMOE_CUDA_ARCHS, default 90), then runs every test
# labelled gpu (the cuda-vs-cpu equality tests among them), fashion_mnist
# --backend cuda against the cpu loss curve where that program has the flag,
# and bench_moe_layer --backend cuda. Everything it prints, and each step's
# output, lands in OUTDIR; it exits non-zero if a step failed. --no-build
# runs binaries already in build/gpu-check (built elsewhere and carried over).
set -uo pipefail
out=${1:?usage: tests/cuda/gpu-check.sh OUTDIR [--no-build]}
build_it=1
[[ ${2:-} == --no-build ]] && build_it=0
cd "$(dirname "$0")/../.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
bdir=build/gpu-check
log="$out/gpu-check.log"
: >"$log"
failed=()
say() { printf '%s\n' "$*" | tee -a "$log"; }
step() {  # step NAME TIMEOUT_S COMMAND...: run, keep its output, note a failure
  local name=$1 limit=$2
  shift 2
  say "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.txt" | tee -a "$log"
  say "== $name: exit $rc after $((SECONDS - t0)) s"
  ((rc == 0)) || failed+=("$name")
  return $rc
}

say "gpu-check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"

if ((build_it)); then
  step configure 300 cmake -S . -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSEMOE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${SEMOE_CUDA_ARCHS:-90}" -DSEMOE_INSTALL_DEPS=OFF || {
    say "gpu-check: configure failed (are OpenBLAS, Boost, nlohmann-json, xxHash, liburing installed?)"
    exit 1
  }
  targets=$(cd tests/cuda && for f in *.cu; do printf 'semoe_cuda_%s ' "${f%.cu}"; done)
  step build 420 cmake --build "$bdir" --parallel "$(nproc)" --target $targets bench_moe_layer fashion_mnist || exit 1
fi

step gpu-tests 240 ctest --test-dir "$bdir" -L gpu --output-on-failure --no-tests=error

if "$bdir/examples/fashion_mnist" --help 2>/dev/null | grep -q -- '--backend'; then
  step fashion-mnist-cpu 180 "$bdir/examples/fashion_mnist" --epochs 1 --limit 12800 --backend cpu
  step fashion-mnist-cuda 180 "$bdir/examples/fashion_mnist" --epochs 1 --limit 12800 --backend cuda
else
  say "== fashion-mnist: not run: this build's fashion_mnist has no --backend flag (the dense layers have no cuda form yet)"
fi

step bench-moe-layer 240 "$bdir/examples/bench_moe_layer" --backend cuda --reps 5

if ((${#failed[@]})); then
  say "gpu-check: FAILED: ${failed[*]}"
  exit 1
fi
say "gpu-check: every step passed"
