#!/usr/bin/env bash
# Installs the Debian packages semoe builds against, only those missing.
# Usage: cmake/install-deps.sh [extra-package...]
# Root: apt-get installs them. Otherwise: prints the one command to run and fails.
set -euo pipefail

packages=(libopenblas-dev doctest-dev nlohmann-json3-dev libboost-dev zlib1g-dev libssl-dev
          libopenmpi-dev openmpi-bin  # comm::mpi (optional: without MPI its tests are skipped)
          libxxhash-dev liburing-dev python3-matplotlib
          libbenchmark-dev dataset-fashion-mnist fortunes
          iproute2 nftables  # the two-host test: network namespaces, packet loss
          "$@")

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "semoe: not a Debian system; make sure these (or their equivalents) are installed: ${packages[*]}" >&2
  exit 0
fi

missing=()
for p in "${packages[@]}"; do
  [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" == ii* ]] || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0

if [[ "$(id -u)" -eq 0 ]]; then
  echo "semoe: installing missing packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
else
  echo "semoe: missing Debian packages; install them with:" >&2
  echo "sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
