#!/usr/bin/env bash
# Several cameras on one model: runs `jetvlm-analytics --bench` with 1, 2 and 4 synthetic
# sources (the same rules, one loaded model) and prints, side by side, the frames analysed
# per second per source and in total, and the capture-to-event latency p50/p95 (from the
# frame leaving the source to the last rule's answer; the frame waits in its source's
# one-frame slot while the model serves the others).
#
#   apps/analytics/bench/multi_source.sh [--frames N] [--counts "1 2 4"] [--schedule round_robin|oldest_first]
#                                        [--model DIR] [--fps F] [--json]
#
# Sources run unpaced (as fast as the model takes frames) unless --fps paces them like
# cameras. Build: release, --locked.
set -euo pipefail
cd "$(dirname "$0")/../../.."
frames=40
counts="1 2 4"
schedule=round_robin
model=models/demo
fps=""
json=0
while [ $# -gt 0 ]; do
  case "$1" in
    --frames) frames=$2; shift 2 ;;
    --counts) counts=$2; shift 2 ;;
    --schedule) schedule=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --fps) fps=$2; shift 2 ;;
    --json) json=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "multi_source.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$frames" in ''|*[!0-9]*|0) echo "multi_source.sh: --frames must be a positive integer" >&2; exit 2 ;; esac
pace="pace=0"
[ -n "$fps" ] && pace="fps=$fps"

cargo build --release --locked -q -p jetvlm-analytics
bin="${CARGO_TARGET_DIR:-target}/release/jetvlm-analytics"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
seeds=(3 5 7 11 13 17 19 23)
results=()
for n in $counts; do
  rules="$tmp/rules-$n.yaml"
  {
    echo "frames: $frames"
    echo "window: 4"
    echo "schedule: $schedule"
    echo "sources:"
    for ((i = 0; i < n; i++)); do
      echo "  - {name: cam$((i + 1)), uri: \"synthetic://scene?seed=${seeds[i % 8]}&$pace\"}"
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

python3 - "$json" "$schedule" "$frames" "${results[@]}" <<'PY'
import json, sys
as_json, schedule, frames, files = sys.argv[1] == "1", sys.argv[2], sys.argv[3], sys.argv[4:]
runs = [json.load(open(f)) for f in files]
if as_json:
    print(json.dumps(runs, indent=2))
    sys.exit(0)
print(f"jetvlm-analytics --bench: {frames} frames per source, 3 rules, schedule {schedule}")
print(f"{'sources':>7}  {'analysed/s per source (min-max)':>31}  {'total/s':>8}  {'p50 ms':>7}  {'p95 ms':>7}")
for r in runs:
    per = r["per_source"]
    rates = [p["analysed_per_s"] for p in per]
    p50 = max(p["latency_ms_p50"] for p in per)
    p95 = max(p["latency_ms_p95"] for p in per)
    print(f"{r['sources']:>7}  {min(rates):>14.2f} - {max(rates):<14.2f}  {r['analysed_per_s_total']:>8.2f}  {p50:>7.1f}  {p95:>7.1f}")
print("(p50/p95: the largest over the sources of each source's capture-to-event latency)")
PY
