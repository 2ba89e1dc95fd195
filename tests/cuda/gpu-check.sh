#!/usr/bin/env bash
# The prepared GPU check of the cuda backend, for a machine with one GPU.
#
#   tests/cuda/gpu-check.sh OUTDIR [--no-build]
#
# Builds the CUDA tests and benchmarks in Release (build/gpu-check, for the
# architectures in SEMOE_CUDA_ARCHS, default 90), then runs every test
# labelled gpu (the cuda-vs-cpu equality tests among them), 300 steps of
# fashion_mnist --backend cuda against the cpu loss curve, and
# bench_moe_layer --backend cuda. Everything it prints, and each step's
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

# 300 steps of the same model on both backends; the cuda loss curve must
# follow the cpu one: the first 20 steps within 1e-3 relative (the same
# arithmetic up to reduction order), the mean of the last 50 within 2 %.
fm=(--epochs 1 --limit 38400 --steps 300 --print-loss --threads "$(nproc)")
step fashion-mnist-cpu 300 "$bdir/examples/fashion_mnist" "${fm[@]}" --backend cpu
step fashion-mnist-cuda 300 "$bdir/examples/fashion_mnist" "${fm[@]}" --backend cuda
if [[ -s $out/fashion-mnist-cpu.txt && -s $out/fashion-mnist-cuda.txt ]]; then
  step fashion-mnist-curves 10 awk '
    FNR == 1 { f++ }
    $1 == "step" && $3 == "loss" { l[f, $2] = $4; if ($2 + 1 > n[f]) n[f] = $2 + 1 }
    END {
      if (n[1] != n[2] || n[1] < 100) { printf "curves differ in length: cpu %d, cuda %d steps\n", n[1], n[2]; exit 1 }
      worst = 0
      for (s = 0; s < 20; s++) { d = l[1, s] - l[2, s]; if (d < 0) d = -d; d /= l[1, s]; if (d > worst) worst = d }
      a = 0; b = 0
      for (s = n[1] - 50; s < n[1]; s++) { a += l[1, s]; b += l[2, s] }
      tail = (a - b) / a; if (tail < 0) tail = -tail
      printf "first 20 steps: worst relative difference %.2e; last 50 steps: mean loss cpu %.4f cuda %.4f (%.2f %%)\n",
             worst, a / 50, b / 50, 100 * tail
      exit (worst < 1e-3 && tail < 0.02) ? 0 : 1
    }' "$out/fashion-mnist-cpu.txt" "$out/fashion-mnist-cuda.txt"
fi

step bench-moe-layer 240 "$bdir/examples/bench_moe_layer" --backend cuda --reps 5

if ((${#failed[@]})); then
  say "gpu-check: FAILED: ${failed[*]}"
  exit 1
fi
say "gpu-check: every step passed"
