#!/usr/bin/env bash
# The README's quick start: install what is missing (Debian packages, as root;
# otherwise it prints the apt line to run), then run one CMake workflow preset.
# Usage: cmake/quickstart.sh demo|test
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:?usage: cmake/quickstart.sh demo|test}

tools=()
command -v cmake >/dev/null || tools+=(cmake)
command -v g++ >/dev/null || tools+=(g++)
command -v ninja >/dev/null || tools+=(ninja-build)
bash cmake/install-deps.sh "${tools[@]}"

# The cuda backend builds where nvcc is (SEMOE_CUDA=AUTO): also find it in its
# standard place when it is not on PATH.
if ! command -v nvcc >/dev/null && [[ -z ${CUDACXX:-} && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

exec cmake --workflow --preset "$preset"
