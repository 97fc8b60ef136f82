#!/usr/bin/env bash
# Installs a demo model package packed by models/gpu_train.sh as models/demo.
#
#   models/install_demo.sh DIR                       # a directory holding gpu_train.sh's output
#   models/install_demo.sh jetvlm-demo.tar           # or the tar itself
#   models/install_demo.sh jetvlm-demo.tar.part00 jetvlm-demo.tar.part01 ...
#
# The parts are joined in name order, the tar is checked against jetvlm-demo.sha256 when that
# file lies beside it, unpacked into a temporary directory next to the destination, and
# checked (every package file present, a Llama decoder config, predictions for the 1000
# held-out clips of seed 1001, matching scores.json);
# only then does it replace the destination (DEST, default models/demo) by renames, keeping
# the previous package until the new one is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${DEST:-models/demo}"
[ $# -ge 1 ] || { echo "usage: $0 DIR | TAR | TAR.part00 TAR.part01 ..." >&2; exit 2; }

if [ $# -eq 1 ] && [ -d "$1" ]; then
    mapfile -t parts < <(find "$1" -maxdepth 1 -name 'jetvlm-demo.tar*' | sort)
    [ ${#parts[@]} -gt 0 ] || { echo "error: no jetvlm-demo.tar* in $1" >&2; exit 1; }
else
    mapfile -t parts < <(printf '%s\n' "$@" | sort)
fi
sumfile="$(dirname "${parts[0]}")/jetvlm-demo.sha256"

parent="$(dirname "$DEST")"
mkdir -p "$parent"
tmp="$(mktemp -d "$parent/.install-demo.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cat "${parts[@]}" >"$tmp/jetvlm-demo.tar"
if [ -f "$sumfile" ]; then
    want="$(awk '{print $1}' "$sumfile")"
    got="$(sha256sum "$tmp/jetvlm-demo.tar" | awk '{print $1}')"
    [ "$want" = "$got" ] || { echo "error: sha256 $got differs from $sumfile ($want)" >&2; exit 1; }
    echo "sha256 ok ($sumfile)"
else
    echo "warning: no $sumfile beside the tar; not checksummed" >&2
fi
if tar -tf "$tmp/jetvlm-demo.tar" | grep -qv '^demo/'; then
    echo "error: the tar holds paths outside demo/" >&2
    exit 1
fi
mkdir "$tmp/x"
tar -C "$tmp/x" -xf "$tmp/jetvlm-demo.tar"
pkg="$tmp/x/demo"
for f in jetvlm.yaml vision.onnx scores.json heldout_predictions.jsonl train_log.txt \
    decoder/config.json decoder/model.safetensors decoder/tokenizer.json decoder/tokenizer_config.json; do
    [ -s "$pkg/$f" ] || { echo "error: the package lacks $f" >&2; exit 1; }
done
grep -q '"model_type": "llama"' "$pkg/decoder/config.json" || { echo "error: decoder/config.json is not a Llama config" >&2; exit 1; }
python3 - "$pkg" <<'PYEOF' || exit 1
import json, sys
pkg = sys.argv[1]
scores = json.load(open(f"{pkg}/scores.json"))
preds = [json.loads(l) for l in open(f"{pkg}/heldout_predictions.jsonl")]
total = scores["accuracy"]["all"]["total"]
clips = len({p["clip"] for p in preds})
if scores["heldout"]["seed"] != 1001 or clips != 1000 or len(preds) != total:
    sys.exit(f"error: held-out predictions: {len(preds)} answers over {clips} clips, seed "
             f"{scores['heldout']['seed']}; expected the 1000 clips of seed 1001 and {total} answers")
acc = scores["accuracy"]
print(f"held-out accuracy {acc['all']['accuracy']:.4f} (single {acc['single']['accuracy']:.4f}, "
      f"multi {acc['multi']['accuracy']:.4f}; {total} questions)")
PYEOF

old="$tmp/old"
if [ -e "$DEST" ]; then mv "$DEST" "$old"; fi
if ! mv "$pkg" "$DEST"; then
    [ -e "$old" ] && mv "$old" "$DEST"
    echo "error: could not move the package to $DEST" >&2
    exit 1
fi
echo "installed $DEST ($(du -sh "$DEST" | cut -f1)): $(grep -m1 'final held-out accuracy' "$DEST/train_log.txt" | sed 's/^[0-9:]* //')"
