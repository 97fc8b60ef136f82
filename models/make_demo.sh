#!/usr/bin/env bash
# Rebuilds the bundled demo model package models/demo from scratch (CPU only, no downloads
# beyond the PyPI packages listed in models/README.md; models/gpu_train.sh is the CUDA recipe).
#
#   models/make_demo.sh [PYTHON]        (default python: .venv/bin/python)
#
# Steps: build `jetvlm`, render the training set (seed 1) and the held-out set (seed 1001)
# with the same renderer as `synthetic://scene`, train, export, verify the ONNX encoder
# against PyTorch. Intermediate files go to models/gen/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
STEPS="${STEPS:-1720}"
cargo build -p jetvlm --release
JV=target/release/jetvlm
[ -d models/gen/train ] || "$JV" synth --out models/gen/train --count 16000 --seed 1
[ -d models/gen/heldout ] || "$JV" synth --out models/gen/heldout --count 1000 --seed 1001
"$PY" models/train_demo.py --train models/gen/train --heldout models/gen/heldout \
    --work models/gen/work --steps "$STEPS" --lr 2e-3 --batch 32 --seed 0 --threads 2 --workers 2 \
    --device cpu --out models/demo
