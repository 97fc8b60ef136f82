#!/usr/bin/env bash
# CUDA checks for a machine with an NVIDIA GPU and no Rust toolchain.
#
#   .ci/gpu-check.sh prepare   (on the build machine) builds the release jetvlm with
#                                  `--features cuda` and the CUDA device test into gpu-dist/
#                                  (git-ignored through .git/info/exclude), to carry along.
#   .ci/gpu-check.sh [run]     (on the GPU machine) builds nothing: runs the prebuilt
#                                  binaries from gpu-dist/ (or $JETVLM_GPU_DIST) and prints
#                                  PASS/FAIL lines; results also go to $OUT (or gpu-check-out/).
#
# Run: `jetvlm selftest --device cuda` (every kernel against its CPU twin, cold kernel cache),
# the same again (warm cache), NVRTC compile of every source for the SMs this NVRTC supports,
# and the device test executable. Exit status is non-zero when any check fails or no GPU is
# usable; a machine without a GPU gets one clear line from jetvlm, never a panic.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
dist=${JETVLM_GPU_DIST:-gpu-dist}

prepare() {
  set -e
  # A private target directory: another build of jetvlm without the feature in the shared
  # target/ must not replace the binary between the build and the copy.
  export CARGO_TARGET_DIR=${JETVLM_GPU_TARGET:-target/gpu-check}
  cargo build --release -p jetvlm --features cuda
  local exe
  exe=$(cargo test --release -p jetvlm-cuda --features cuda --test device --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
  mkdir -p "$dist"
  cp "$CARGO_TARGET_DIR/release/jetvlm" "$dist/jetvlm"
  [ -n "$exe" ] && cp "$exe" "$dist/cuda-device-test"
  # Debug info makes the binary several times larger than what can be carried.
  command -v strip >/dev/null && strip "$dist"/*
  if "$dist/jetvlm" selftest --device cuda --nvrtc-only --sm 87 2>&1 | grep -q "without CUDA support"; then
    echo "gpu-check: $dist/jetvlm was built without the cuda feature" >&2
    exit 1
  fi
  grep -qx "/$dist/" "$(git rev-parse --git-path info/exclude)" 2>/dev/null \
    || echo "/$dist/" >> "$(git rev-parse --git-path info/exclude)"
  ls -la "$dist"
}

# cudarc (CUDA 12 bindings) asks the loader for libnvrtc.so, libnvrtc.so.12, .11, ...; a CUDA 13
# machine may only register libnvrtc.so.13. Point a private libnvrtc.so at whatever NVRTC the
# machine has, and keep its real directory on the path for libnvrtc-builtins.
find_nvrtc() {
  if ldconfig -p 2>/dev/null | grep -qE 'libnvrtc\.so(\.12)? '; then return 0; fi
  local lib
  lib=$(ldconfig -p 2>/dev/null | sed -n 's/.*libnvrtc\.so\.[0-9]* .*=> \(.*\)$/\1/p' | head -n1)
  [ -z "$lib" ] && lib=$(ls /usr/local/cuda*/lib64/libnvrtc.so* /usr/local/cuda*/targets/*/lib/libnvrtc.so* 2>/dev/null | head -n1)
  if [ -z "$lib" ]; then echo "gpu-check: no libnvrtc on the loader path (jetvlm still tries a .venv wheel and \$JETVLM_NVRTC_LIB)" >&2; return 1; fi
  local shim=${TMPDIR:-/tmp}/jetvlm-nvrtc
  mkdir -p "$shim" && ln -sf "$lib" "$shim/libnvrtc.so"
  export LD_LIBRARY_PATH="$shim:$(dirname "$(readlink -f "$lib")")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "gpu-check: NVRTC $lib"
}

run() {
  local out=${OUT:-gpu-check-out} fail=0
  mkdir -p "$out"
  if [ ! -x "$dist/jetvlm" ]; then
    echo "gpu-check: $dist/jetvlm missing; run '.ci/gpu-check.sh prepare' on the build machine and carry $dist" >&2
    exit 2
  fi
  find_nvrtc || true
  export JETVLM_KERNEL_CACHE="$out/kernel-cache"
  rm -rf "$JETVLM_KERNEL_CACHE"
  echo "== selftest (cold kernel cache)"
  local t0=$(date +%s%N)
  timeout 300 "$dist/jetvlm" selftest --device cuda 2>&1 | tee "$out/selftest.txt"
  local rc=${PIPESTATUS[0]}
  echo "selftest exit $rc, $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  [ "$rc" -eq 0 ] || fail=1
  if [ "$rc" -eq 0 ]; then
    echo "== selftest (warm kernel cache: $(ls "$JETVLM_KERNEL_CACHE" | wc -l) entries)"
    t0=$(date +%s%N)
    timeout 300 "$dist/jetvlm" selftest --device cuda --seed 2 > "$out/selftest-warm.txt" 2>&1 || fail=1
    grep -E "^(FAIL|device)|checks passed" "$out/selftest-warm.txt"
    echo "warm run $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  fi
  echo "== NVRTC compile check"
  local sms=87,90
  "$dist/jetvlm" selftest --device cuda --nvrtc-only --sm 72 > /dev/null 2>&1 && sms=72,87,90
  timeout 120 "$dist/jetvlm" selftest --device cuda --nvrtc-only --sm "$sms" 2>&1 | tee "$out/nvrtc.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
  if [ -x "$dist/cuda-device-test" ]; then
    echo "== device test executable"
    timeout 300 "$dist/cuda-device-test" --nocapture 2>&1 | tail -n 20 | tee "$out/device-test.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
  fi
  echo "== summary: $(grep -c '^PASS' "$out/selftest.txt") PASS, $(grep -c '^FAIL' "$out/selftest.txt") FAIL (selftest)"
  [ "$fail" -eq 0 ] && echo "gpu-check: all checks passed" || echo "gpu-check: FAILED"
  exit "$fail"
}

case "$mode" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 [prepare|run]" >&2; exit 2 ;;
esac
