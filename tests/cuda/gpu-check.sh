#!/usr/bin/env bash
# The prepared GPU check of the cuda backend, for a machine with one GPU.
#
#   tests/cuda/gpu-check.sh OUTDIR                    build here, then run
#   tests/cuda/gpu-check.sh OUTDIR --bundle FILE      run a bundle made by gpu-bundle.sh
#
# Builds the CUDA tests and benchmarks in Release (build/gpu-check, for the
# architectures in SEMOE_CUDA_ARCHS, default 90), or unpacks a bundle built
# elsewhere (for a GPU machine without the build's dependencies), then runs:
# every GPU test program (the cuda-vs-cpu equality tests among them; the
# comm::nccl ones run what one GPU allows and say what needs more), 300
# steps of fashion_mnist --backend cuda against the cpu loss curve,
# bench_moe_layer --backend cuda, and bench_all_to_all --backend nccl (one
# process per GPU, over comm::tcp's rendezvous). Each step's output lands in OUTDIR, with a
# summary in OUTDIR/gpu-check.log; it exits non-zero if a step failed.
set -uo pipefail
out=${1:?usage: tests/cuda/gpu-check.sh OUTDIR [--bundle FILE]}
bundle=
if [[ ${2:-} == --bundle ]]; then bundle=$(realpath "${3:?--bundle needs a file}"); fi
cd "$(dirname "$0")/../.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/gpu-check.log"
: >"$log"
failed=()
say() { printf '%s\n' "$*" | tee -a "$log"; }
step() {  # step NAME TIMEOUT_S COMMAND...: run, keep its output, note a failure
  local name=$1 limit=$2
  shift 2
  local cmd="$*"
  say "== $name: ${cmd:0:160}"
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

data=()
if [[ -n $bundle ]]; then
  root="$out/bundle"
  rm -rf "$root" && mkdir -p "$root" && tar -xJf "$bundle" -C "$root" || { say "gpu-check: cannot unpack $bundle"; exit 1; }
  # cuBLAS and NCCL are the GPU machine's own (too large to carry): its
  # toolkit's, or Python wheels' (nvidia-cublas, nvidia-nccl), wherever the
  # loader does not look by itself.
  cublas_dirs=$(
    { ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/lib /usr/local/cuda*/targets/*/lib 2>/dev/null
      for m in cublas nccl; do
        python3 -c "import nvidia.$m, os; print(os.path.join(list(nvidia.$m.__path__)[0], 'lib'))" 2>/dev/null
      done
    } | while read -r d; do [[ -e $d/libcublas.so.13 || -e $d/libnccl.so.2 ]] && printf '%s:' "$d"; done)
  lib_path="$root/lib:${cublas_dirs}${LD_LIBRARY_PATH:-}"
  export LD_LIBRARY_PATH="${lib_path%:}"
  say "libraries: $LD_LIBRARY_PATH"
  ldd "$root/bin/bench_moe_layer" | grep -q 'not found' && { ldd "$root/bin/bench_moe_layer" | grep 'not found' | tee -a "$log"; }
  tests=("$root"/bin/semoe_cuda_*)
  fashion="$root/bin/fashion_mnist"
  bench="$root/bin/bench_moe_layer"
  bench_a2a="$root/bin/bench_all_to_all"
  data=(--data "$root/data/fashion-mnist")
else
  bdir=build/gpu-check
  step configure 300 cmake -S . -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSEMOE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${SEMOE_CUDA_ARCHS:-90}" -DSEMOE_INSTALL_DEPS=OFF || {
    say "gpu-check: configure failed (OpenBLAS, Boost, nlohmann-json, xxHash, liburing, doctest missing?" \
        "make a bundle with tests/cuda/gpu-bundle.sh where they are, and pass --bundle)"
    exit 1
  }
  targets=$(cd tests/cuda && for f in *.cu; do printf 'semoe_cuda_%s ' "${f%.cu}"; done)
  step build 420 cmake --build "$bdir" --parallel "$(nproc)" --target $targets bench_moe_layer bench_all_to_all fashion_mnist || exit 1
  tests=("$bdir"/tests/cuda/semoe_cuda_*)
  fashion="$bdir/examples/fashion_mnist"
  bench="$bdir/examples/bench_moe_layer"
  bench_a2a="$bdir/examples/bench_all_to_all"
fi

# Every GPU test program; 77 means it saw no GPU, which here is a failure.
for t in "${tests[@]}"; do
  [[ -x $t ]] && step "$(basename "$t")" 240 "$t"
done

# 300 steps of the same model on both backends; the cuda loss curve must
# follow the cpu one: the first 20 steps within 1e-3 relative (the same
# arithmetic up to reduction order), the mean of the last 50 within 2 %.
fm=(--epochs 1 --limit 38400 --steps 300 --print-loss --threads "$(nproc)" "${data[@]}")
step fashion-mnist-cpu 300 "$fashion" "${fm[@]}" --backend cpu
step fashion-mnist-cuda 300 "$fashion" "${fm[@]}" --backend cuda
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

step bench-moe-layer 240 "$bench" --backend cuda --reps 5
step bench-all-to-all-nccl 180 "$bench_a2a" --backend nccl

if ((${#failed[@]})); then
  say "gpu-check: FAILED: ${failed[*]}"
  exit 1
fi
say "gpu-check: every step passed"
