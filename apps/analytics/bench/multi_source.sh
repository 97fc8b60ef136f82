#!/usr/bin/env bash
# Several cameras on one model: runs `jetvlm-analytics --bench` with 1, 2 and 4 sources (the
# same rules, one loaded model) and prints, side by side, the frames analysed per second per
# source and in total, and the capture-to-event latency p50/p95 (from the frame's capture
# time to the last rule's answer; the frame waits in its source's one-frame slot while the
# model serves the others).
#
#   apps/analytics/bench/multi_source.sh [--frames N] [--counts "1 2 4"] [--schedule round_robin|oldest_first]
#                                        [--model DIR] [--fps F] [--rtsp] [--latency MS] [--json] [--no-build]
#
# Synthetic sources (default) run unpaced (as fast as the model takes frames) unless --fps
# paces them like cameras; their capture time is when the frame left the source.
# --rtsp: every source is an RTSP camera instead: one RTSP server per source on a free
# 127.0.0.1 port (tests/fixtures/rtsp_server.py) serving an H.264 clip of the synthetic scene
# (one seed per source, rendered by the scene_clip example, encoded by
# tests/fixtures/make_clip.py) in real time at --fps (default 10), read over TCP with rtspsrc's
# jitter buffer at --latency ms (default 200); the capture time is the frame's RTP time on the
# pipeline clock (docs/cameras.md), so latency includes the jitter buffer and the decoder.
# Needs --features gstreamer (built here) and Debian's python3-gi and GStreamer RTSP server
# (.ci/setup installs them). Build: release, --locked (--no-build: the binaries already built).
set -euo pipefail
cd "$(dirname "$0")/../../.."
frames=40
counts="1 2 4"
schedule=round_robin
model=models/demo
fps=""
json=0
rtsp=0
latency=200
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --frames) frames=$2; shift 2 ;;
    --counts) counts=$2; shift 2 ;;
    --schedule) schedule=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --fps) fps=$2; shift 2 ;;
    --json) json=1; shift ;;
    --rtsp) rtsp=1; shift ;;
    --latency) latency=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "multi_source.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$frames" in ''|*[!0-9]*|0) echo "multi_source.sh: --frames must be a positive integer" >&2; exit 2 ;; esac
case "$latency" in ''|*[!0-9]*) echo "multi_source.sh: --latency must be milliseconds (0-10000)" >&2; exit 2 ;; esac
for n in $counts; do
  case "$n" in ''|*[!0-9]*|0) echo "multi_source.sh: --counts are positive integers (at most 8)" >&2; exit 2 ;; esac
  [ "$n" -le 8 ] || { echo "multi_source.sh: --counts are at most 8" >&2; exit 2; }
done
if [ -n "$fps" ]; then
  case "$fps" in ''|*[!0-9]*|0) echo "multi_source.sh: --fps must be a positive integer" >&2; exit 2 ;; esac
fi
pace="pace=0"
[ -n "$fps" ] && pace="fps=$fps"

target="${CARGO_TARGET_DIR:-target}"
bin="$target/release/jetvlm-analytics"
seeds=(3 5 7 11 13 17 19 23)
servers=()
tmp=$(mktemp -d)
cleanup() {
  # The RTSP servers this script started (their pids, one by one).
  for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
if [ "$rtsp" = 1 ]; then
  [ "$build" = 1 ] && cargo build --release --locked -q -p jetvlm-analytics --features gstreamer --bin jetvlm-analytics --example scene_clip
  clip_fps=${fps:-10}
  most=0
  for n in $counts; do [ "$n" -gt "$most" ] && most=$n; done
  # Clip long enough for the slowest source: the model may take few of its frames (the
  # others are dropped, newest frame first), so give each source 30 s plus 4 s per frame.
  clip_frames=$(( (30 + 4 * frames) * clip_fps ))
  [ "$clip_frames" -gt 20000 ] && clip_frames=20000
  urls=()
  for ((i = 0; i < most; i++)); do
    "$target/release/examples/scene_clip" "$tmp/frames-$i" "$clip_frames" "${seeds[i % 8]}"
    /usr/bin/python3 tests/fixtures/make_clip.py "$tmp/frames-$i" "$tmp/clip-$i.mp4" --fps "$clip_fps" --timeout 600
    rm -rf "$tmp/frames-$i"
    port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    /usr/bin/python3 tests/fixtures/rtsp_server.py --port "$port" --clip "$tmp/clip-$i.mp4" > "$tmp/server-$i.out" 2> "$tmp/server-$i.err" &
    servers+=("$!")
    for _ in $(seq 100); do
      grep -qs '^ready ' "$tmp/server-$i.out" && break
      kill -0 "$!" 2>/dev/null || break
      sleep 0.1
    done
    grep -q '^ready ' "$tmp/server-$i.out" || {
      echo "multi_source.sh: the RTSP server on port $port did not start:" >&2
      cat "$tmp/server-$i.err" >&2
      exit 1
    }
    urls+=("rtsp://127.0.0.1:$port/clip?transport=tcp&latency=$latency")
  done
elif [ "$build" = 1 ]; then
  cargo build --release --locked -q -p jetvlm-analytics
fi
results=()
for n in $counts; do
  rules="$tmp/rules-$n.yaml"
  {
    echo "frames: $frames"
    echo "window: 4"
    echo "schedule: $schedule"
    echo "sources:"
    for ((i = 0; i < n; i++)); do
      if [ "$rtsp" = 1 ]; then
        uri=${urls[i]}
      else
        uri="synthetic://scene?seed=${seeds[i % 8]}&$pace"
      fi
      echo "  - {name: cam$((i + 1)), uri: \"$uri\"}"
    done
    echo "rules:"
    echo "  - {name: left-zone-count, question: \"how many objects are in the left zone?\", when: changes}"
    echo "  - {name: crowded, question: \"how many objects are there?\", when: {at_least: 4}}"
    echo "  - {name: red-square, question: \"is there a red square?\", when: {equals: \"yes\"}}"
  } > "$rules"
  "$bin" "$rules" --model "$model" --bench > "$tmp/out-$n.json" 2> "$tmp/err-$n.txt" || {
    cat "$tmp/err-$n.txt" >&2
    exit 1
  }
  results+=("$tmp/out-$n.json")
done

if [ "$rtsp" = 1 ]; then
  kind="RTSP sources (127.0.0.1, H.264 ${clip_fps} fps, tcp, latency=${latency} ms)"
elif [ -n "$fps" ]; then
  kind="synthetic sources at $fps fps"
else
  kind="unpaced synthetic sources"
fi
python3 - "$json" "$schedule" "$frames" "$kind" "${results[@]}" <<'PY'
import json, sys
as_json, schedule, frames, kind, files = sys.argv[1] == "1", sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
runs = [json.load(open(f)) for f in files]
if as_json:
    print(json.dumps(runs, indent=2))
    sys.exit(0)
print(f"jetvlm-analytics --bench: {kind}, {frames} frames per source, 3 rules, schedule {schedule}")
print(f"{'sources':>7}  {'analysed/s per source (min-max)':>31}  {'total/s':>8}  {'p50 ms':>7}  {'p95 ms':>7}")
for r in runs:
    per = r["per_source"]
    rates = [p["analysed_per_s"] for p in per]
    p50 = max(p["latency_ms_p50"] for p in per)
    p95 = max(p["latency_ms_p95"] for p in per)
    print(f"{r['sources']:>7}  {min(rates):>14.2f} - {max(rates):<14.2f}  {r['analysed_per_s_total']:>8.2f}  {p50:>7.1f}  {p95:>7.1f}")
print("(p50/p95: the largest over the sources of each source's capture-to-event latency)")
short = [(r["sources"], p["source"], p["end"]) for r in runs for p in r["per_source"]
         if p["end"] != f"{frames} frames"]
for n, name, end in short:
    print(f"warning: {n} sources: {name} stopped before {frames} frames ({end}); its row is not comparable", file=sys.stderr)
PY
