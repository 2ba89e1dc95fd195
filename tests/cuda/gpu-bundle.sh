#!/usr/bin/env bash
# Builds what tests/cuda/gpu-check.sh runs, here (nvcc and the build's
# dependencies, no GPU needed), and packs it for a GPU machine that lacks the
# dependencies: the GPU test programs, fashion_mnist, bench_moe_layer,
# bench_all_to_all, the shared libraries they need beyond the C library and
# CUDA's cuBLAS and NCCL (which a GPU machine has, and which are too large to
# carry), and the Fashion-MNIST files.
#
#   tests/cuda/gpu-bundle.sh FILE.tar.xz      then, on the GPU machine:
#   tests/cuda/gpu-check.sh OUTDIR --bundle FILE.tar.xz
set -euo pipefail
file=$(realpath -m "${1:?usage: tests/cuda/gpu-bundle.sh FILE.tar.xz}")
cd "$(dirname "$0")/../.."
bdir=build/gpu-check
cmake -S . -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSEMOE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${SEMOE_CUDA_ARCHS:-90}" -DSEMOE_INSTALL_DEPS=OFF -DSEMOE_NATIVE_EXAMPLES=OFF >/dev/null
targets=$(cd tests/cuda && for f in *.cu; do printf 'semoe_cuda_%s ' "${f%.cu}"; done)
cmake --build "$bdir" --parallel "$(nproc)" --target $targets bench_moe_layer bench_all_to_all fashion_mnist
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib" "$stage/data"
cp "$bdir"/tests/cuda/semoe_cuda_* "$bdir/examples/fashion_mnist" "$bdir/examples/bench_moe_layer" \
  "$bdir/examples/bench_all_to_all" "$stage/bin/"
# Libraries outside glibc, libstdc++, cuBLAS and NCCL: whatever ldd resolves.
for b in "$stage"/bin/*; do ldd "$b"; done | awk '$3 ~ /^\// { print $3 }' | sort -u |
  grep -vE '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcublas|libcublasLt|libnccl)\.so' |
  while read -r lib; do cp -L "$lib" "$stage/lib/"; done
cp -r /usr/share/datasets/fashion-mnist "$stage/data/"
tar -cJf "$file" -C "$stage" .
echo "gpu-bundle: $file ($(du -h "$file" | cut -f1)): $(ls "$stage/bin" | tr '\n' ' ')"
