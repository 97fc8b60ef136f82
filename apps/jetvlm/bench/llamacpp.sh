#!/usr/bin/env bash
# jetvlm against llama.cpp on the same model, threads and context: builds llama.cpp (CPU,
# native flags) from the llama-cpp-python source distribution on PyPI, converts the random
# SmolLM2-135M-shaped model with llama.cpp's own converter to F16 and Q4_0 GGUF, then runs, in
# interleaved rounds, `llama-bench -fa 1` (f16 and q4_0 KV) and `jetvlm bench decode --weights
# bf16,q8,q4` (FP16 and mixed KV), and prints one table of medians: TPOT at each context and
# prefill tokens/s, with the ratios.
#
#   apps/jetvlm/bench/llamacpp.sh [--rounds N] [--contexts 1024,8192] [--tokens N]
#                                 [--prefill N] [--threads N] [--model DIR] [--flush]
#                                 [--poll 0-100] [--no-import] [--json FILE]
#
# --rounds (default 4): each round runs llama.cpp and jetvlm once (the order alternates), so
#   other processes on the machine slow both alike; the table gives the median over rounds.
# --tokens (32): tokens generated per TPOT measurement (llama-bench -n, jetvlm --steps).
# --prefill (1024): prompt length of the prefill tokens/s, from an empty cache on both sides.
# --threads (2): llama-bench -t and RAYON_NUM_THREADS for jetvlm.
# --model: a Llama decoder in Hugging Face layout; default models/gen/smollm2-135m-random,
#   written by models/scripts/make_random_smollm2.py when missing.
# --poll (50, llama-bench's default): how hard llama.cpp's threads spin waiting for work
#   (llama-bench --poll). When other processes share the cores, 0 is several times faster.
# --flush: let jetvlm evict the last-level cache between decode steps (its default; off here
#   because llama-bench does not, so both decode under the same cache conditions).
# --no-import: skip the same-weights pair. By default the model is also untied (its LM head
#   an explicit copy of the embedding table: jetvlm reads a tied quantized table as F32),
#   converted and quantized to Q4_0 with a Q8_0 head and table (llama-quantize
#   --output-tensor-type q8_0 --token-embedding-type q8_0), and jetvlm runs that file's blocks
#   (`jetvlm quantize --from`: INT4 g32 layers, INT8 g32 head). When its tensors are
#   byte-identical to the default Q4_0 file's (checked), llama-bench's Q4_0 rows are the same
#   numbers on both sides; otherwise llama-bench runs the untied file too.
# --json FILE: also write every round's raw results and the medians to FILE.
#
# Needs cmake and a C++ compiler, and the project venv with torch, transformers and
# sentencepiece for llama.cpp's converter (`.ci/setup --dev` installs all of them). The
# llama.cpp build and the GGUF files are cached under target/llamacpp/; reruns reuse them.
# Not run in CI.
set -euo pipefail
cd "$(dirname "$0")/../../.."
me=apps/jetvlm/bench/llamacpp.sh
# The llama-cpp-python release whose vendored llama.cpp is built; its CHANGELOG names the
# llama.cpp commit.
version=0.3.36
rounds=4
contexts=1024,8192
tokens=32
prefill=1024
threads=2
model=models/gen/smollm2-135m-random
flush=0
poll=50
import=1
json_out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --contexts) contexts=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --prefill) prefill=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --flush) flush=1; shift ;;
    --poll) poll=$2; shift 2 ;;
    --no-import) import=0; shift ;;
    --json) json_out=$2; shift 2 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "$me: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for pair in "rounds:$rounds" "tokens:$tokens" "prefill:$prefill" "threads:$threads"; do
  case "${pair#*:}" in
    ''|*[!0-9]*|0) echo "$me: --${pair%%:*} must be a positive integer (got '${pair#*:}')" >&2; exit 2 ;;
  esac
done
case "$poll" in
  ''|*[!0-9]*) echo "$me: --poll must be 0-100 (got '$poll')" >&2; exit 2 ;;
esac
[ "$poll" -le 100 ] || { echo "$me: --poll must be 0-100 (got '$poll')" >&2; exit 2; }
case "$contexts" in
  ''|,*|*,|*,,*|*[!0-9,]*) echo "$me: --contexts must be comma-separated positive integers (got '$contexts')" >&2; exit 2 ;;
esac

py=.venv/bin/python
missing=()
command -v cmake >/dev/null 2>&1 || missing+=("cmake (apt-get install cmake)")
command -v c++ >/dev/null 2>&1 || missing+=("a C++ compiler (apt-get install g++)")
if [ ! -x "$py" ]; then
  missing+=("the project venv .venv (.ci/setup --dev)")
else
  for mod in torch transformers sentencepiece numpy safetensors tokenizers; do
    "$py" -c "import $mod" 2>/dev/null || missing+=("Python package $mod in .venv (.ci/setup --dev)")
  done
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "$me: missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 2
fi

target=${CARGO_TARGET_DIR:-target}
work=$target/llamacpp
src=$work/$version/src
build=$work/$version/build
# Native flags without AMX: where the CPU has AMX, GGML_NATIVE compiles ggml's AMX matrix
# path, which crashes (SIGSEGV in ggml::cpu::amx::tensor_traits::compute_forward) in a VM
# that advertises AMX; jetvlm's kernels do not use AMX either (a Jetson has none).
native_cflags=""
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  native_cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  build=$work/$version/build-noamx
fi
log() { printf '[llamacpp] %s\n' "$*" >&2; }
mkdir -p "$work"

# 1. llama.cpp from the llama-cpp-python sdist (it vendors llama.cpp under vendor/llama.cpp).
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  log "downloading llama-cpp-python==$version (source distribution) from PyPI"
  dl=$(mktemp -d "$work/download.XXXXXX")
  "$py" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$dl" "llama-cpp-python==$version"
  tar -xzf "$dl/llama_cpp_python-$version.tar.gz" -C "$dl"
  rm -rf "$src"
  mkdir -p "$(dirname "$src")"
  mv "$dl/llama_cpp_python-$version" "$src"
  rm -rf "$dl"
fi
lcpp=$src/vendor/llama.cpp
commit=$(awk -v v="## [$version]" '$0 == v {f = 1; next} f && /^## \[/ {exit}
  f && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART + 10, RLENGTH - 10); exit}' "$src/CHANGELOG.md")
[ -n "$commit" ] || commit=unknown
if [ ! -f "$build/CMakeCache.txt" ]; then
  log "configuring llama.cpp $commit (CPU only, GGML_NATIVE${native_cflags:+, without AMX})"
  cmake -S "$lcpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$native_cflags" -DCMAKE_CXX_FLAGS="$native_cflags" \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF \
    -DLLAMA_BUILD_COMMIT="$commit" > "$work/$version/configure.log" 2>&1 \
    || { tail -n 30 "$work/$version/configure.log" >&2; exit 1; }
fi
log "building llama-bench and llama-quantize (cached in $build)"
cmake --build "$build" -j "$(nproc)" --target llama-bench llama-quantize \
  > "$work/$version/build.log" 2>&1 || { tail -n 30 "$work/$version/build.log" >&2; exit 1; }
bench=$build/bin/llama-bench
quantize=$build/bin/llama-quantize

# 2. The model, and its GGUF conversions by llama.cpp's converter and quantizer.
if [ ! -f "$model/config.json" ]; then
  log "writing the random model to $model"
  "$py" models/scripts/make_random_smollm2.py --out "$model"
fi
name=$(basename "$model")
ggufs=$work/gguf
mkdir -p "$ggufs"
f16=$ggufs/$name-f16.gguf
q40=$ggufs/$name-q4_0.gguf
# convert_f16 HF_DIR OUT.gguf: llama.cpp's converter, F16, when OUT is missing or older.
convert_f16() {
  local dir=$1 out=$2 newest
  newest=$(ls -t "$dir"/*.safetensors "$dir"/config.json | head -n 1)
  [ -f "$out" ] && [ ! "$newest" -nt "$out" ] && return 0
  log "converting $dir to $out (llama.cpp convert_hf_to_gguf.py)"
  # The random model's toy tokenizer is not one the converter recognises by hash; it is
  # converted as SmolLM2's ("smollm"). Only the tokenizer metadata depends on this; the
  # benchmarks feed token ids.
  "$py" - "$lcpp" "$dir" "$out.tmp" > "$ggufs/convert.log" 2>&1 <<'PY' \
    || { tail -n 20 "$ggufs/convert.log" >&2; exit 1; }
import runpy, sys
lcpp, model, out = sys.argv[1:4]
sys.path[:0] = [lcpp, lcpp + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "f16", "--outfile", out]
runpy.run_path(lcpp + "/convert_hf_to_gguf.py", run_name="__main__")
PY
  mv "$out.tmp" "$out"
}
# quantize_q4_0 IN.gguf OUT.gguf [llama-quantize options]: Q4_0 when OUT is missing or older.
quantize_q4_0() {
  local in=$1 out=$2
  shift 2
  [ -f "$out" ] && [ ! "$in" -nt "$out" ] && return 0
  log "quantizing $in to Q4_0 $* (llama-quantize)"
  "$quantize" "$@" "$in" "$out.tmp" Q4_0 "$threads" > "$ggufs/quantize.log" 2>&1 \
    || { tail -n 20 "$ggufs/quantize.log" >&2; exit 1; }
  mv "$out.tmp" "$out"
}
convert_f16 "$model" "$f16"
quantize_q4_0 "$f16" "$q40"
models=$f16,$q40
jweights=bf16,q8,q4
if [ "$import" -eq 1 ]; then
  untied=$work/model/$name-untied
  if [ ! -f "$untied/config.json" ] || [ "$model/config.json" -nt "$untied/config.json" ] \
    || [ "$(ls -t "$model"/*.safetensors | head -n 1)" -nt "$untied/config.json" ]; then
    log "writing $untied (the LM head an explicit copy of the embedding table)"
    rm -rf "$untied" "$untied.tmp"
    mkdir -p "$untied.tmp"
    "$py" - "$model" "$untied.tmp" <<'PY'
import glob, json, os, shutil, sys
from safetensors.torch import load_file, save_file
src, out = sys.argv[1:3]
tensors = {}
for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
    tensors.update(load_file(f))
if "lm_head.weight" not in tensors:
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
cfg = json.load(open(os.path.join(src, "config.json")))
cfg["tie_word_embeddings"] = False
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
for f in os.listdir(src):
    if f.endswith(".json") and f != "config.json" and not f.endswith(".index.json"):
        shutil.copy(os.path.join(src, f), out)
PY
    mv "$untied.tmp" "$untied"
  fi
  f16u=$ggufs/$name-untied-f16.gguf
  q40h8=$ggufs/$name-untied-q4_0-q8_0head.gguf
  convert_f16 "$untied" "$f16u"
  quantize_q4_0 "$f16u" "$q40h8" --output-tensor-type q8_0 --token-embedding-type q8_0
  imported=$work/model/$name-from-q4_0-q8_0head
  if [ ! -f "$imported/config.json" ] || [ "$q40h8" -nt "$imported/config.json" ]; then
    rm -rf "$imported"
    need_import=1
  else
    need_import=0
  fi
  # llama-quantize stores this model's tied table Q8_0 (its rows of 576 do not fit Q6_K's
  # 256-wide blocks), so the untied file should hold exactly the default Q4_0 file's blocks,
  # its head a copy of the table: then llama-bench runs on the Q4_0 file alone covers both.
  if "$py" - "$lcpp" "$q40" "$q40h8" <<'PY'
import sys
sys.path.insert(0, sys.argv[1] + "/gguf-py")
from gguf import GGUFReader
tied, untied = ({t.name: t for t in GGUFReader(f).tensors} for f in sys.argv[2:4])
same = set(untied) == set(tied) | {"output.weight"} and all(
    t.tensor_type == tied[n if n != "output.weight" else "token_embd.weight"].tensor_type
    and bytes(t.data) == bytes(tied[n if n != "output.weight" else "token_embd.weight"].data)
    for n, t in untied.items())
sys.exit(0 if same else 1)
PY
  then
    log "$q40h8 holds the same blocks as $q40 (head = its embedding table)"
  else
    log "$q40h8 differs from $q40: llama-bench runs it too"
    models=$models,$q40h8
  fi
  jweights=$jweights,$imported
fi

# 3. jetvlm (release).
log "building jetvlm (release)"
cargo build --release --locked -q -p jetvlm
jetvlm=$target/release/jetvlm
if [ "$import" -eq 1 ] && [ "$need_import" -eq 1 ]; then
  log "converting $q40h8 for jetvlm (jetvlm quantize --from)"
  "$jetvlm" quantize --model "$untied" --from "$q40h8" --out "$imported" >&2
fi
jetvlm_commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- sdk apps Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  jetvlm_commit="$jetvlm_commit with uncommitted changes"
fi

# 4. Interleaved rounds.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
noflush=--no-flush
[ "$flush" -eq 1 ] && noflush=""
run_llama() {
  local r=$1 kv
  for kv in f16 q4_0; do
    log "round $r: llama-bench $kv KV, prefill $prefill"
    "$bench" -m "$models" -t "$threads" -fa 1 -ctk "$kv" -ctv "$kv" --poll "$poll" -p "$prefill" -n 0 \
      -r 1 -o json > "$tmp/llama-pp-$kv-$r.json" 2> "$tmp/llama.err" \
      || { tail -n 20 "$tmp/llama.err" >&2; exit 1; }
    log "round $r: llama-bench $kv KV, $tokens tokens at depth $contexts"
    "$bench" -m "$models" -t "$threads" -fa 1 -ctk "$kv" -ctv "$kv" --poll "$poll" -p 0 -n "$tokens" \
      -d "$contexts" -r 3 -o json > "$tmp/llama-tg-$kv-$r.json" 2> "$tmp/llama.err" \
      || { tail -n 20 "$tmp/llama.err" >&2; exit 1; }
  done
}
run_jetvlm() {
  local r=$1
  log "round $r: jetvlm bench decode --weights $jweights --context $contexts"
  RAYON_NUM_THREADS=$threads "$jetvlm" bench decode --model "$model" --weights "$jweights" \
    --context "$contexts" --steps "$tokens" --ttft-tokens "$prefill" $noflush --json \
    > "$tmp/jetvlm-$r.json" 2> "$tmp/jetvlm.err" \
    || { tail -n 20 "$tmp/jetvlm.err" >&2; exit 1; }
}
loads=()
for ((r = 1; r <= rounds; r++)); do
  loads+=("$(cut -d' ' -f1-3 /proc/loadavg)")
  if ((r % 2)); then run_llama "$r"; run_jetvlm "$r"; else run_jetvlm "$r"; run_llama "$r"; fi
done
loads+=("$(cut -d' ' -f1-3 /proc/loadavg)")

"$py" - "$tmp" "$rounds" "$contexts" "$tokens" "$prefill" "$threads" "$model" "$version" \
  "$commit" "$jetvlm_commit" "$flush" "$json_out" "$lcpp" "$poll" "${loads[@]}" <<'PY'
import json, statistics, sys

(tmp, rounds, contexts, tokens, prefill, threads, model, version, commit, jcommit, flush,
 json_out, lcpp, poll), loads = sys.argv[1:15], sys.argv[15:]
sys.path.insert(0, lcpp + "/gguf-py")
from gguf import GGUFReader
rounds, tokens, prefill = int(rounds), int(tokens), int(prefill)
contexts = [int(c) for c in contexts.split(",")]
KVS = ["f16", "q4_0"]  # llama.cpp KV types; jetvlm's fp16 / mixed policies sit beside them


def load(path):
    with open(path) as f:
        return json.load(f)


# figures[(engine, weights)][(what, context, kv index)] = [one value per round]
figures, raw = {}, {"llama.cpp": [], "jetvlm": []}
llama_info = {}
for r in range(1, rounds + 1):
    for kvi, kv in enumerate(KVS):
        for kind in ("pp", "tg"):
            for t in load(f"{tmp}/llama-{kind}-{kv}-{r}.json"):
                raw["llama.cpp"].append(dict(t, round=r))
                fname = t["model_filename"]
                w = ("F16" if fname.endswith("-f16.gguf")
                     else "Q4_0h8" if fname.endswith("-q4_0-q8_0head.gguf") else "Q4_0")
                if w not in llama_info:
                    # Bytes read per token: every tensor but an untied embedding table.
                    ts = {x.name: int(x.n_bytes) for x in GGUFReader(t["model_filename"]).tensors}
                    untied = "output.weight" in ts
                    llama_info[w] = sum(ts.values()) - (ts["token_embd.weight"] if untied else 0)
                llama_info["cpu"] = t.get("cpu_info", "")
                llama_info["build"] = f'{t.get("build_commit", "?")} (build {t.get("build_number", "?")})'
                if kind == "pp":
                    key = ("prefill", 0, kvi)
                    val = t["n_prompt"] / (t["avg_ns"] / 1e9)
                else:
                    key = ("tpot", t["n_depth"], kvi)
                    val = t["avg_ns"] / 1e6 / t["n_gen"]
                figures.setdefault(("llama.cpp", w), {}).setdefault(key, []).append(val)
    j = load(f"{tmp}/jetvlm-{r}.json")
    raw["jetvlm"].append(dict(j, round=r))
    jinfo = {w["name"]: w for w in j["weights"]}
    for row in j["rows"]:
        kvi = 0 if row["kv"] == "fp16" else 1
        f = figures.setdefault(("jetvlm", row["weights"]), {})
        f.setdefault(("tpot", row["context"], kvi), []).append(row["tpot_ms"])
        if row["prefill_tokens"] == prefill:
            f.setdefault(("prefill", 0, kvi), []).append(row["prefill_tokens_per_s"])

med = {k: {kk: statistics.median(v) for kk, v in f.items()} for k, f in figures.items()}
jnames = {"bf16": "BF16", "q8": "INT8 g64, INT8 head", "q4": "INT4 g64, INT8 head",
          "Q4_0": "Q4_0 (Q8_0 head)", "Q4_0h8": "Q4_0, untied Q8_0 head"}
imported = [w for w in jinfo if w not in ("bf16", "q8", "q4")]
for w in imported:
    jnames[w] = "the Q4_0 blocks (INT4 g32)"
order = [("llama.cpp", "F16"), ("llama.cpp", "Q4_0"), ("llama.cpp", "Q4_0h8"),
         ("jetvlm", "bf16"), ("jetvlm", "q8"), ("jetvlm", "q4")] + [("jetvlm", w) for w in imported]


def mb(engine, w):
    if engine == "llama.cpp":
        return llama_info[w] / 1e6
    return jinfo[w]["bytes_read_per_token"] / 1e6


cols = [("tpot", c, kvi) for c in contexts for kvi in (0, 1)] + [("prefill", 0, 0), ("prefill", 0, 1)]
head = [f"TPOT {c} {'f16' if kvi == 0 else 'q4'}" for c in contexts for kvi in (0, 1)]
head += ["prefill f16", "prefill q4"]
print(f"jetvlm {jcommit} vs llama.cpp {commit} (llama-cpp-python {version} sdist, "
      f"build {llama_info.get('build', '?')}), CPU: {llama_info.get('cpu', '?')}")
print(f"model {model}; {threads} threads; llama-bench -fa 1 --poll {poll}, -ctk/-ctv f16 or q4_0; jetvlm KV "
      f"fp16 or mixed (10% FP16 text, INT4 frames); {tokens} generated tokens per TPOT; prefill "
      f"= {prefill} tokens from an empty cache; jetvlm LLC flush between steps: "
      f"{'on' if flush == '1' else 'off'}")
print(f"median of {rounds} interleaved rounds; load average (1/5/15 min) at each round start "
      f"and at the end: {' | '.join(loads)}")
print("TPOT in ms (lower is better), prefill in tokens/s; 'q4' columns: llama.cpp q4_0 KV, "
      "jetvlm mixed KV")
w0 = 36
print(f"{'engine, weights':<{w0}} {'MB/tok':>6} " + " ".join(f"{h:>14}" for h in head))
for key in order:
    if key not in med:
        continue
    engine, w = key
    label = f"{engine} {jnames.get(w, w)}"
    vals = [med[key].get(c) for c in cols]
    cells = [f"{v:>14.1f}" if v is not None else f"{'-':>14}" for v in vals]
    print(f"{label:<{w0}} {mb(engine, w):>6.1f} " + " ".join(cells))


def ratio(a, b, label):
    if a not in med or b not in med:
        return
    cells = []
    for c in cols:
        x, y = med[a].get(c), med[b].get(c)
        cells.append(f"{x / y:>13.2f}x" if x and y else f"{'-':>14}")
    print(f"{label:<{w0}} {'':>6} " + " ".join(cells))


print("ratios (TPOT: below 1 = jetvlm faster; prefill: above 1 = jetvlm faster)")
ratio(("jetvlm", "q4"), ("llama.cpp", "Q4_0"), "jetvlm INT4 / llama.cpp Q4_0")
ratio(("jetvlm", "q8"), ("llama.cpp", "Q4_0"), "jetvlm INT8 / llama.cpp Q4_0")
ratio(("jetvlm", "bf16"), ("llama.cpp", "F16"), "jetvlm BF16 / llama.cpp F16")
for w in imported:
    ref = ("llama.cpp", "Q4_0h8") if ("llama.cpp", "Q4_0h8") in med else ("llama.cpp", "Q4_0")
    ratio(("jetvlm", w), ref, "same Q4_0 blocks, jetvlm / llama.cpp")
if json_out:
    out = {
        "llama_cpp_commit": commit, "llama_cpp_python": version, "jetvlm_commit": jcommit,
        "threads": int(threads), "llama_bench_poll": int(poll), "tokens": tokens, "prefill": prefill, "contexts": contexts,
        "load_averages": loads, "jetvlm_llc_flush": flush == "1",
        "medians": [{"engine": e, "weights": w, "what": k[0], "context": k[1],
                     "kv": ("f16" if k[2] == 0 else "q4_0") if e == "llama.cpp" else ("fp16" if k[2] == 0 else "mixed"),
                     "value": v, "rounds": figures[(e, w)][k]}
                    for (e, w), f in med.items() for k, v in f.items()],
        "raw": raw,
    }
    with open(json_out, "w") as f:
        json.dump(out, f, indent=1)
PY
