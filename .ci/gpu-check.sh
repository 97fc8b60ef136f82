#!/usr/bin/env bash
# CUDA checks for a machine with an NVIDIA GPU and no Rust toolchain.
#
#   .ci/gpu-check.sh prepare   (on the build machine) builds the release jetvlm with
#                                  `--features cuda` and the CUDA device test into gpu-dist/
#                                  (git-ignored through .git/info/exclude), to carry along.
#   .ci/gpu-check.sh [run [all|check|speed]]
#                              (on the GPU machine) builds nothing: runs the prebuilt
#                                  binaries from gpu-dist/ (or $JETVLM_GPU_DIST) and prints
#                                  PASS/FAIL lines; results also go to $OUT (or gpu-check-out/).
#
# Run, each step with its own time limit and output file in $OUT, one PASS/FAIL line per step
# (a failing step never stops the rest): `jetvlm selftest --device cuda` (every kernel against
# its CPU twin, cold kernel cache); the same warm plus GPU greedy generation on the decoder
# fixtures against the CPU path; NVRTC compile; the device test executable; `generate
# --device cuda` against the CPU run; `ask --device cuda` on the LLaVA fixture against
# transformers' tokens; `ask --device cuda` on the Qwen2.5-VL (M-RoPE), Qwen3-VL (interleaved
# M-RoPE, DeepStack) and Gemma 3 (sliding-window and global layers, bidirectional frame tokens)
# fixtures against transformers' tokens; the Gemma 3 and Qwen3-VL device decoder (window 8,
# eviction) against the CPU decoder; quantized decoders (INT8, INT4) against the CPU decoder; `watch
# --device cuda` on the demo package against the ground truth; `bench kv --device cuda` (32/32/64 at 32k, 9/3/64 at
# 8k/32k/128k) and PyTorch SDPA on the same GPU; `bench decode --device cuda` with the KV in
# device memory and offloaded to host memory, on a random SmolLM2-135M-shaped model generated
# there. Exit status is non-zero when any step fails; a machine without a GPU gets one clear
# line from jetvlm, never a panic.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
# run [all|check|speed]: correctness steps, speed steps, or both (the default). One call may
# not fit both in a device session's time: `run speed` and `run check` split them.
part=${2:-all}
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
  # The runtime's device path against its CPU path (demo package: ask, camera sessions,
  # per-layer formats, sinks), on the simulated device and, there, on the GPU.
  local paths
  paths=$(cargo test --release -p jetvlm-tests --features jetvlm-runtime/cuda --test device_paths --no-run \
    --message-format=json 2>/dev/null | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
  # Gemma 3 and Qwen3-VL: the device decoder through the GPU's kernels against the CPU's.
  local families
  families=$(cargo test --release -p jetvlm-cuda --features cuda --test simulated --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
  mkdir -p "$dist"
  cp "$CARGO_TARGET_DIR/release/jetvlm" "$dist/jetvlm"
  [ -n "$exe" ] && cp "$exe" "$dist/cuda-device-test"
  [ -n "$families" ] && cp "$families" "$dist/cuda-families-test"
  [ -n "$paths" ] && cp "$paths" "$dist/device-paths-test"
  # Debug info makes the binary several times larger than what can be carried.
  # The ONNX Runtime library of the setup's wheel, for `ask --device cuda` (the vision
  # encoder runs on ONNX Runtime's CPU provider there).
  local ort
  ort=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1)
  [ -n "$ort" ] && cp "$ort" "$dist/libonnxruntime.so"
  if command -v strip >/dev/null; then
    strip "$dist/jetvlm"
    for t in cuda-device-test cuda-families-test device-paths-test; do [ -f "$dist/$t" ] && strip "$dist/$t"; done
  fi
  if "$dist/jetvlm" selftest --device cuda --nvrtc-only --sm 87 2>&1 | grep -q "without CUDA support"; then
    echo "gpu-check: $dist/jetvlm was built without the cuda feature" >&2
    exit 1
  fi
  grep -qx "/$dist/" "$(git rev-parse --git-path info/exclude)" 2>/dev/null \
    || echo "/$dist/" >> "$(git rev-parse --git-path info/exclude)"
  ls -la "$dist"
  # A device run carries the working tree plus $dist: 64 MiB at most.
  local tree carried
  tree=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -n1 | cut -f1)
  carried=$(( tree + $(du -sb "$dist" | cut -f1) ))
  echo "gpu-check: tree + $dist = $(( carried / 1048576 )) MiB of the 64 MiB a device run carries"
  [ "$carried" -le $(( 62 * 1048576 )) ] || echo "gpu-check: warning: close to or over 64 MiB; carry less" >&2
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

# One check: `step NAME TIMEOUT OUTFILE CMD...` runs CMD with a time limit, keeps its output in
# $out/OUTFILE, prints its tail and one PASS/FAIL line, and never stops the script. A step that
# would start after $GPU_CHECK_BUDGET_S seconds (default 420) of the run is skipped (SKIP line),
# so the whole run ends within about that plus one step's limit.
step() {
  local name=$1 limit=$2 file=$3
  shift 3
  echo "== $name"
  if [ $(( $(date +%s) - t_start )) -gt "${GPU_CHECK_BUDGET_S:-420}" ]; then
    echo "SKIP step $name: time budget of the run spent"; summary+=("SKIP $name (time budget)")
    return 0
  fi
  local t0=$(date +%s%N)
  timeout "$limit" "$@" > "$out/$file" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  tail -n "${TAIL:-25}" "$out/$file"
  if [ "$rc" -eq 0 ]; then
    echo "PASS step $name (${ms} ms)"; summary+=("PASS $name (${ms} ms)")
  else
    [ "$rc" -eq 124 ] && echo "FAIL step $name: timed out after ${limit} s" || echo "FAIL step $name: exit $rc (${ms} ms)"
    summary+=("FAIL $name (exit $rc, ${ms} ms)"); fail=1
  fi
  return 0
}

# GPU greedy generation through the CLI against the CPU path on the same fixture.
generate_matches_cpu() {
  local out=${OUT:-gpu-check-out}
  local fx=tests/fixtures/decoder/$1
  "$dist/jetvlm" generate --model "$fx" --prompt "What color is the car?" --max-tokens 24 --greedy --ignore-eos --json --kv "$2" > "$out/generate-$1-cpu.json" || return 1
  "$dist/jetvlm" generate --model "$fx" --prompt "What color is the car?" --max-tokens 24 --greedy --ignore-eos --json --kv "$2" --device cuda > "$out/generate-$1-cuda.json" || return 1
  cat "$out/generate-$1-cpu.json" "$out/generate-$1-cuda.json"
  python3 - "$out/generate-$1-cpu.json" "$out/generate-$1-cuda.json" <<'PY'
import json, sys
cpu, gpu = (json.load(open(p))["token_ids"] for p in sys.argv[1:3])
bad = next((i for i, (a, b) in enumerate(zip(cpu, gpu)) if a != b), None)
if bad is None and len(cpu) == len(gpu):
    print(f"PASS generate --device cuda: {len(gpu)} tokens equal the CPU run")
else:
    print(f"FAIL generate --device cuda: first mismatch at token {bad} (cpu {cpu}, gpu {gpu})")
    sys.exit(1)
PY
}

# `ask --device cuda` on the LLaVA fixture package: greedy tokens (FP16 KV) equal transformers'.
ask_matches_transformers() {
  local out=${OUT:-gpu-check-out} fx=tests/fixtures/vlm
  local q n
  q=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["question"])' "$fx/expected.json")
  n=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["max_new_tokens"])' "$fx/expected.json")
  "$dist/jetvlm" ask --model "$fx" --image "$fx/image.png" "$q" --max-tokens "$n" --kv fp16 --json \
    --device cuda --ort-library "$dist/libonnxruntime.so" > "$out/ask-vlm-cuda.json" || return 1
  cat "$out/ask-vlm-cuda.json"
  python3 - "$fx/expected.json" "$out/ask-vlm-cuda.json" <<'PY'
import json, sys
exp, got = (json.load(open(p)) for p in sys.argv[1:3])
if got["token_ids"] == exp["greedy_tokens"] and got["decoder_device"].startswith("cuda"):
    print(f"PASS ask --device cuda: {len(got['token_ids'])} tokens equal transformers' ({got['decoder_device']})")
else:
    print(f"FAIL ask --device cuda: {got['token_ids']} vs transformers {exp['greedy_tokens']}")
    sys.exit(1)
PY
}

# `ask --device cuda` on a tests/fixtures/hf_vlms package (default qwen2_5_vl: M-RoPE, a 3x5
# frame grid; qwen3_vl; gemma3): greedy tokens (FP16 KV) equal transformers'.
ask_family_matches_transformers() {
  local out=${OUT:-gpu-check-out} family=${1:-qwen2_5_vl}
  local fx=tests/fixtures/hf_vlms/$family
  local q n img
  q=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["question"])' "$fx/expected.json")
  n=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["max_new_tokens"])' "$fx/expected.json")
  img=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["image"])' "$fx/expected.json")
  "$dist/jetvlm" ask --model "$fx/pkg" --image "$fx/$img" "$q" --max-tokens "$n" --kv fp16 --json \
    --device cuda --ort-library "$dist/libonnxruntime.so" > "$out/ask-$family-cuda.json" || return 1
  cat "$out/ask-$family-cuda.json"
  python3 - "$fx/expected.json" "$out/ask-$family-cuda.json" "$family" <<'PY'
import json, sys
exp, got = (json.load(open(p)) for p in sys.argv[1:3])
family = sys.argv[3]
if got["token_ids"] == exp["greedy_tokens"] and got["decoder_device"].startswith("cuda"):
    print(f"PASS ask --device cuda ({family}): {len(got['token_ids'])} tokens equal transformers' ({got['decoder_device']})")
else:
    print(f"FAIL ask --device cuda ({family}): {got['token_ids']} vs transformers {exp['greedy_tokens']}")
    sys.exit(1)
PY
}

# Quantized decoders on the GPU: the llama and qwen2 decoder fixtures quantized here by
# `jetvlm quantize` (INT8 g32; INT4 g32 with an INT8 head), then the decoder check (greedy
# tokens, prompt logits, offloaded KV, mixed frames, a camera session) of the GPU against the
# CPU decoder on the same quantized files.
quantized_on_gpu() {
  local dir=${TMPDIR:-/tmp}/jetvlm-gpu-check-quantized rc=0
  rm -rf "$dir"
  local spec
  for spec in "8 32" "4 32 --head-bits 8"; do
    set -- $spec
    local tag="q$1g$2"
    for fx in llama qwen2; do
      "$dist/jetvlm" quantize --model "tests/fixtures/decoder/$fx" --bits "$1" --group "$2" "${@:3}" \
        --out "$dir/$tag/$fx" > /dev/null || return 1
      cp "tests/fixtures/decoder/$fx/expected.json" "$dir/$tag/$fx/"
    done
    echo "-- $tag"
    "$dist/jetvlm" selftest --device cuda --seed 3 --decoder-fixtures "$dir/$tag" || rc=1
  done
  return "$rc"
}

# `watch --device cuda` with the demo package on a synthetic scene: answers vs the renderer's
# ground truth, and vs the CPU decoder on the same frames. `watch-check TAG [ARGS...]` passes
# ARGS to both runs (e.g. the demo's KV calibration) and names the output files after TAG.
watch_on_gpu() {
  local out=${OUT:-gpu-check-out} tag=${1:-default}
  shift || true
  export ORT_DYLIB_PATH="$dist/libonnxruntime.so"
  "$dist/jetvlm" watch "synthetic://scene?seed=3&pace=0" --frames 12 --window 4 --json --device cuda "$@" > "$out/watch-cuda-$tag.jsonl" || return 1
  "$dist/jetvlm" watch "synthetic://scene?seed=3&pace=0" --frames 12 --window 4 --json "$@" > "$out/watch-cpu-$tag.jsonl" || return 1
  python3 - "$out/watch-cpu-$tag.jsonl" "$out/watch-cuda-$tag.jsonl" <<'PY'
import json, sys
# Frame lines only (the last line is the run's summary).
cpu, gpu = ([r for r in map(json.loads, open(p)) if not r.get("summary")] for p in sys.argv[1:3])
right = sum(1 for l in gpu if l.get("truth") == l["answer"])
same = sum(1 for a, b in zip(cpu, gpu) if a["answer"] == b["answer"])
ttft = sorted(l["ttft_ms"] for l in gpu)[len(gpu) // 2]
print(f"watch --device cuda: {right}/{len(gpu)} match the ground truth, {same}/{len(gpu)} equal the CPU answers, median TTFT {ttft:.1f} ms")
# The GPU session must also agree with the CPU one: roll-back or eviction bugs could still
# get an easy scene right.
sys.exit(0 if len(gpu) == 12 and right >= 10 and same >= 10 else 1)
PY
}

run() {
  out=${OUT:-gpu-check-out}
  export OUT="$out"
  fail=0
  summary=()
  mkdir -p "$out"
  t_start=$(date +%s)
  if [ ! -x "$dist/jetvlm" ]; then
    echo "gpu-check: $dist/jetvlm missing; run '.ci/gpu-check.sh prepare' on the build machine and carry $dist" >&2
    exit 2
  fi
  find_nvrtc || true
  # Outside $OUT: only a few files come back from a device run (see the end of this function).
  export JETVLM_KERNEL_CACHE=${JETVLM_KERNEL_CACHE:-${TMPDIR:-/tmp}/jetvlm-gpu-check-kernels}
  # The first selftest runs on a cold cache; the speed steps keep whatever is compiled.
  [ "$part" != speed ] && rm -rf "$JETVLM_KERNEL_CACHE"
  if [ "$part" != speed ]; then
    TAIL=80 step "selftest (cold kernel cache)" 60 selftest.txt "$dist/jetvlm" selftest --device cuda
    echo "kernel cache: $(ls "$JETVLM_KERNEL_CACHE" 2>/dev/null | wc -l) entries"
    TAIL=12 step "selftest (warm cache) + GPU greedy decoder vs CPU on tests/fixtures/decoder" 60 selftest-decoder.txt \
      "$dist/jetvlm" selftest --device cuda --seed 2 --decoder-fixtures tests/fixtures/decoder
    step "NVRTC compile sm_87,90" 30 nvrtc.txt "$dist/jetvlm" selftest --device cuda --nvrtc-only --sm 87,90
    if [ -x "$dist/cuda-device-test" ]; then
      step "device test executable" 60 device-test.txt "$dist/cuda-device-test" --nocapture --test-threads 1
    fi
    if [ -x "$dist/device-paths-test" ]; then
      step "runtime device paths (ask, sessions, sinks, per-layer) GPU == CPU" 120 device-paths.txt \
        env ORT_DYLIB_PATH="$dist/libonnxruntime.so" "$dist/device-paths-test" --nocapture --test-threads 1
    fi
    step "generate --device cuda (qwen2 fixture, fp16 KV) == CPU" 30 generate-qwen2.txt .ci/gpu-check.sh generate-check qwen2 fp16
    step "generate --device cuda (llama fixture, mixed KV) == CPU" 30 generate-llama.txt .ci/gpu-check.sh generate-check llama mixed
    step "ask --device cuda (LLaVA fixture, fp16 KV) == transformers" 30 ask-vlm.txt .ci/gpu-check.sh ask-check
    step "ask --device cuda (Qwen2.5-VL fixture, M-RoPE, fp16 KV) == transformers" 30 ask-qwen2_5_vl.txt \
      .ci/gpu-check.sh ask-family-check qwen2_5_vl
    step "ask --device cuda (Qwen3-VL fixture, interleaved M-RoPE, DeepStack, fp16 KV) == transformers" 30 \
      ask-qwen3_vl.txt .ci/gpu-check.sh ask-family-check qwen3_vl
    step "ask --device cuda (Gemma 3 fixture, fp16 KV) == transformers" 30 ask-gemma3.txt \
      .ci/gpu-check.sh ask-family-check gemma3
    if [ -x "$dist/cuda-families-test" ]; then
      step "Gemma 3 / Qwen3-VL device decoder (window 8, eviction) GPU == CPU" 60 families-test.txt \
        "$dist/cuda-families-test" on_a_gpu --nocapture --test-threads 1
    fi
    TAIL=12 step "quantized decoders (INT8 g32, INT4 g32 + INT8 head) GPU vs CPU" 90 quantized.txt \
      .ci/gpu-check.sh quantized-check
    step "watch --device cuda (demo package, 12 frames)" 60 watch-cuda.txt .ci/gpu-check.sh watch-check default
    step "watch --device cuda --kv-calibration (a frame format per layer)" 60 watch-cuda-calibrated.txt \
      .ci/gpu-check.sh watch-check calibrated --kv-calibration models/demo/kv-calibration.yaml
  fi
  if [ "$part" != check ]; then
    # Attention: 32/32/64 (SmolVLM-2.2B, moondream2) at 32k, and 9/3/64 (SmolVLM-256M/SmolLM2) at 8k/32k/128k.
    step "bench kv --device cuda 32/32/64 ctx 32768" 45 bench-kv-32x32-32k.txt \
      "$dist/jetvlm" bench kv --device cuda --heads 32 --kv-heads 32 --head-dim 64 --layers 4 --context 32768
    for ctx in 8192 32768 131072; do
      step "bench kv --device cuda 9/3/64 ctx $ctx" 45 "bench-kv-9x3-$ctx.txt" \
        "$dist/jetvlm" bench kv --device cuda --heads 9 --kv-heads 3 --head-dim 64 --layers 30 --context "$ctx"
    done
    TAIL=10 step "PyTorch SDPA reference (same GPU)" 60 torch-sdpa.txt \
      python3 sdk/cuda/scripts/torch_sdpa.py --shape 9/3/64 --shape 32/32/64 --context 8192,32768,131072
    # Decode on a random SmolLM2-135M-shaped model generated here (269 MB, not carried).
    local model=${JETVLM_BENCH_MODEL:-${TMPDIR:-/tmp}/jetvlm-smollm2-135m-random}
    if [ ! -f "$model/config.json" ]; then
      step "make random SmolLM2-135M model" 60 make-model.txt python3 models/scripts/make_random_smollm2.py --out "$model"
    fi
    if [ -f "$model/config.json" ]; then
      step "bench decode --device cuda (KV in device memory)" 70 bench-decode-device.txt \
        "$dist/jetvlm" bench decode --device cuda --model "$model" --context 1024,8192,32768,131072 --steps 32
      step "bench decode --device cuda --kv-offload host" 70 bench-decode-offload.txt \
        "$dist/jetvlm" bench decode --device cuda --kv-offload host --model "$model" --context 1024,32768,131072 --steps 16
      step "bench decode --device cuda --kv-offload host, real 16k prefill (TTFT offloaded)" 60 bench-decode-offload-prefill.txt \
        "$dist/jetvlm" bench decode --device cuda --kv-offload host --model "$model" --context 16384 --prefill real --steps 8
    fi
  fi
  echo "== key numbers"
  for f in "$out"/bench-kv-*.txt "$out"/bench-decode-*.txt; do
    [ -f "$f" ] || continue
    echo "-- $(basename "$f")"
    grep -hE "^decode attention|bandwidth|^(fp16|mixed)|speedup|vs fp16:|^ *[0-9]+ (fp16|mixed)" "$f"
  done
  [ -f "$out/torch-sdpa.txt" ] && { echo "-- torch-sdpa.txt"; cat "$out/torch-sdpa.txt"; }
  echo "== summary ($(( $(date +%s) - t_start )) s)"
  printf '%s\n' "${summary[@]}"
  [ -f "$out/selftest.txt" ] && echo "selftest: $(grep -c '^PASS' "$out/selftest.txt") PASS, $(grep -c '^FAIL' "$out/selftest.txt") FAIL; decoder: $(grep -c '^PASS decoder' "$out/selftest-decoder.txt" 2>/dev/null) PASS, $(grep -c '^FAIL decoder' "$out/selftest-decoder.txt" 2>/dev/null) FAIL"
  [ "$fail" -eq 0 ] && echo "gpu-check: all checks passed" || echo "gpu-check: FAILED"
  # A device run brings back at most 8 files from $OUT: every step's output goes into one
  # archive beside a copy of the summary.
  printf '%s\n' "${summary[@]}" > "$out/summary.txt"
  if (cd "$out" && find . -maxdepth 1 -type f ! -name summary.txt ! -name gpu-check.tgz -printf '%f\n' \
        | tar czf gpu-check.tgz -T - 2>/dev/null); then
    find "$out" -maxdepth 1 -type f ! -name summary.txt ! -name gpu-check.tgz -delete
    echo "gpu-check: step outputs in $out/gpu-check.tgz"
  fi
  exit "$fail"
}

case "$mode" in
  prepare) prepare ;;
  run) run ;;
  generate-check) shift; generate_matches_cpu "$@" ;;
  ask-check) ask_matches_transformers ;;
  ask-mrope-check) ask_family_matches_transformers qwen2_5_vl ;;
  ask-family-check) shift; ask_family_matches_transformers "$@" ;;
  quantized-check) quantized_on_gpu ;;
  watch-check) shift; watch_on_gpu "$@" ;;
  *) echo "usage: $0 [prepare|run]" >&2; exit 2 ;;
esac
