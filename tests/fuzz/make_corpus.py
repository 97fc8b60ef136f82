#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into tests/fuzz/corpus/<target>/.

Seeds are the repository's own fixtures (configs, manifests, board profiles, tokenizers,
the test image) and small files made here with the standard library only: safetensors
files, PNG and baseline JPEG images, ONNX ModelProto bytes. Rerunnable: every seed is
rewritten, and files this script does not make are left alone (inputs the fuzzer found and
were added by hand stay).
"""

import json
import math
import struct
import zlib
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent.parent
CORPUS = FUZZ / "corpus"


def seed(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def fixture(rel):
    return (ROOT / rel).read_bytes()


# --- gguf --------------------------------------------------------------------------------
def gguf_string(text):
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(metadata, tensors, version=3, data=b""):
    """A GGUF file: metadata [(key, type id, packed value)], tensors [(name, dims, ggml type,
    offset)], then the data section at the next multiple of 32."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, ty, value in metadata:
        out += gguf_string(key) + struct.pack("<I", ty) + value
    for name, dims, ty, offset in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, offset)
    out += b"\0" * (-len(out) % 32)
    return out + data


def gguf_seeds():
    meta = [
        ("general.architecture", 8, gguf_string("llama")),
        ("llama.block_count", 4, struct.pack("<I", 2)),
        ("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
        ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + gguf_string("a") + gguf_string("b")),
    ]
    q8_block = struct.pack("<e", 0.5) + bytes(range(32))
    q4_block = struct.pack("<e", 0.25) + bytes(range(0, 256, 16))
    data = q8_block * 2 + b"\0" * (-68 % 32) + q4_block * 2
    q4_at = 68 + (-68 % 32)
    seed("gguf", "q8-q4-tensors.gguf", gguf(meta, [
        ("blk.0.attn_q.weight", [32, 2], 8, 0),
        ("blk.0.ffn_up.weight", [64, 1], 2, q4_at),
    ], data=data))
    seed("gguf", "f32-f16-bf16-v2.gguf", gguf(
        [("general.alignment", 4, struct.pack("<I", 32))],
        [("a", [4], 0, 0), ("b", [4], 1, 32), ("c", [2, 2], 30, 64)],
        version=2, data=struct.pack("<4f", 1, 2, 3, 4) + b"\0" * 16 + b"\1" * 8 + b"\0" * 24 + b"\2" * 8))
    seed("gguf", "k-quant-listed-only.gguf", gguf(meta[:1], [("q4k", [256], 12, 0)]))
    # One Q4_K super-block (d, dmin, 12 scale bytes, 128 code bytes) and one Q6_K (128 + 64
    # code bytes, 16 scales, d).
    q4k = struct.pack("<ee", 0.01, 0.02) + bytes(range(7, 19)) + bytes(range(128))
    q6k = bytes(range(128)) + bytes(range(64)) + bytes(range(1, 17)) + struct.pack("<e", 0.003)
    seed("gguf", "q4k-q6k-tensors.gguf", gguf(meta[:1], [
        ("blk.0.attn_q.weight", [256, 1], 12, 0),
        ("output.weight", [256, 1], 14, 160),
    ], data=q4k + b"\0" * 16 + q6k))
    seed("gguf", "truncated-data.gguf", gguf(meta[:1], [("w", [32], 8, 0)], data=q8_block[:20]))
    seed("gguf", "rows-not-whole-blocks.gguf", gguf([], [("w", [31], 2, 0)], data=q4_block))


# --- safetensors -------------------------------------------------------------------------

def safetensors(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def f16(values):
    return b"".join(struct.pack("<e", v) for v in values)


def bf16(values):
    return b"".join(struct.pack("<f", v)[2:] for v in values)


def f32(values):
    return b"".join(struct.pack("<f", v) for v in values)


def safetensors_seeds():
    emb = f16([0.5 * i for i in range(8)])
    seed("safetensors", "f16-embedding.safetensors", safetensors(
        [("model.embed_tokens.weight", "F16", [2, 4], emb),
         ("model.norm.weight", "F16", [4], f16([1.0] * 4))],
        metadata={"format": "pt"}))
    seed("safetensors", "f32-bf16-i64.safetensors", safetensors(
        [("a", "F32", [2, 3], f32(range(6))),
         ("b", "BF16", [3], bf16([1.0, -2.0, 0.25])),
         ("ids", "I64", [2], struct.pack("<qq", 1, 2)),
         ("scalar", "F32", [], f32([3.0])),
         ("empty", "F32", [0, 4], b"")]))
    seed("safetensors", "unpadded-odd-offset.safetensors", safetensors(
        [("u8", "U8", [3], b"\x01\x02\x03"),
         ("model.embed_tokens.weight", "F32", [2], f32([1.0, 2.0]))], pad=False))
    seed("safetensors", "bf16-dtype-mismatch.safetensors", safetensors(
        [("model.embed_tokens.weight", "BF16", [2, 2], bf16([1.0, 2.0, 3.0, 4.0]))]))
    seed("safetensors", "empty-header.safetensors", safetensors([]))
    whole = safetensors([("w", "F32", [4], f32([1, 2, 3, 4]))])
    seed("safetensors", "truncated-data.safetensors", whole[:-5])


# --- PNG and JPEG ------------------------------------------------------------------------

def png_chunk(kind, payload):
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def png(width, height, color_type, bit_depth, pixel, palette=None, interlace=False):
    """pixel(x, y) -> bytes of one pixel (already at the bit depth, whole bytes)."""
    def rows(xs, ys):
        out = b""
        for y in ys:
            out += b"\x00" + b"".join(pixel(x, y) for x in xs)
        return out

    if interlace:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                  (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        raw = b""
        for x0, y0, dx, dy in passes:
            xs, ys = range(x0, width, dx), range(y0, height, dy)
            if len(xs) and len(ys):
                raw += rows(xs, ys)
    else:
        raw = rows(range(width), range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, int(interlace))
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    if palette:
        out += png_chunk(b"PLTE", b"".join(bytes(c) for c in palette))
    return out + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b"")


def rgb(x, y):
    return bytes(((x * 37) & 255, (y * 53) & 255, ((x + y) * 19) & 255))


ZIGZAG = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48,
          41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15,
          23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63]


class Bits:
    def __init__(self):
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def put(self, code, length):
        for i in range(length - 1, -1, -1):
            self.acc = (self.acc << 1) | ((code >> i) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0)
                self.acc = self.n = 0

    def flush(self):
        while self.n:
            self.put(1, 1)


def huffman_table(symbols, length):
    """Every symbol gets a code of `length` bits, in order (a valid canonical table)."""
    counts = [0] * 16
    counts[length - 1] = len(symbols)
    codes = {s: (i, length) for i, s in enumerate(symbols)}
    return bytes(counts) + bytes(symbols), codes


DC_SYMBOLS = list(range(12))
AC_SYMBOLS = [0x00, 0xF0] + [(r << 4) | s for r in range(16) for s in range(1, 11)]
DC_SPEC, DC_CODES = huffman_table(DC_SYMBOLS, 4)
AC_SPEC, AC_CODES = huffman_table(AC_SYMBOLS, 8)


def category(v):
    return 0 if v == 0 else abs(v).bit_length()


def magnitude(v, size):
    return v if v >= 0 else v + (1 << size) - 1


def encode_block(bits, block, pred):
    """block: 64 quantised coefficients in natural order; returns the new DC predictor."""
    zz = [block[i] for i in ZIGZAG]
    diff = zz[0] - pred
    s = category(diff)
    bits.put(*DC_CODES[s])
    if s:
        bits.put(magnitude(diff, s), s)
    run = 0
    for v in zz[1:]:
        if v == 0:
            run += 1
            continue
        while run > 15:
            bits.put(*AC_CODES[0xF0])
            run -= 16
        s = category(v)
        bits.put(*AC_CODES[(run << 4) | s])
        bits.put(magnitude(v, s), s)
        run = 0
    if run:
        bits.put(*AC_CODES[0x00])
    return zz[0]


def fdct_quant(samples, q):
    out = []
    for v in range(8):
        for u in range(8):
            s = 0.0
            for y in range(8):
                for x in range(8):
                    s += (samples[y * 8 + x] - 128) * math.cos((2 * x + 1) * u * math.pi / 16) \
                        * math.cos((2 * y + 1) * v * math.pi / 16)
            cu = math.sqrt(0.5) if u == 0 else 1.0
            cv = math.sqrt(0.5) if v == 0 else 1.0
            out.append(int(round(0.25 * cu * cv * s / q)))
    return out


def jpeg(width, height, channels, sampling, pixel, restart=0):
    """Baseline JPEG. channels: 1 (grey) or 3 (YCbCr); sampling: luma (h, v) factors."""
    hs, vs = sampling if channels == 3 else (1, 1)
    q = 8

    def ycc(x, y):
        r, g, b = pixel(min(x, width - 1), min(y, height - 1))
        yy = 0.299 * r + 0.587 * g + 0.114 * b
        cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
        cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
        return (yy, cb, cr)

    out = bytearray(b"\xff\xd8")
    out += b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    out += b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([q] * 64)
    comps = [(1, (hs << 4) | vs)] + ([(2, 0x11), (3, 0x11)] if channels == 3 else [])
    out += b"\xff\xc0" + struct.pack(">HBHHB", 8 + 3 * len(comps), 8, height, width, len(comps))
    for cid, samp in comps:
        out += bytes([cid, samp, 0])
    for cls_id, spec in ((0x00, DC_SPEC), (0x10, AC_SPEC)):
        out += b"\xff\xc4" + struct.pack(">H", 3 + len(spec)) + bytes([cls_id]) + spec
    if restart:
        out += b"\xff\xdd" + struct.pack(">HH", 4, restart)
    out += b"\xff\xda" + struct.pack(">HB", 6 + 2 * len(comps), len(comps))
    for cid, _ in comps:
        out += bytes([cid, 0x00])
    out += b"\x00\x3f\x00"

    bits = Bits()
    mcu_w, mcu_h = 8 * hs, 8 * vs
    preds = [0] * len(comps)
    mcus = [(mx, my) for my in range(0, height, mcu_h) for mx in range(0, width, mcu_w)]
    for n, (mx, my) in enumerate(mcus):
        if restart and n and n % restart == 0:
            bits.flush()
            bits.out += bytes([0xFF, 0xD0 + (n // restart - 1) % 8])
            preds = [0] * len(comps)
        for by in range(vs):
            for bx in range(hs):
                x0, y0 = mx + 8 * bx, my + 8 * by
                block = [ycc(x0 + i % 8, y0 + i // 8)[0] for i in range(64)]
                preds[0] = encode_block(bits, fdct_quant(block, q), preds[0])
        for c in range(1, len(comps)):
            block = []
            for i in range(64):
                # Chroma subsampled by averaging the luma-resolution pixels it covers.
                xs = [mx + (i % 8) * hs + k for k in range(hs)]
                ys = [my + (i // 8) * vs + k for k in range(vs)]
                vals = [ycc(x, y)[c] for x in xs for y in ys]
                block.append(sum(vals) / len(vals))
            preds[c] = encode_block(bits, fdct_quant(block, q), preds[c])
    bits.flush()
    return bytes(out + bits.out + b"\xff\xd9")


def image_seeds():
    seed("image_decode", "fixture-vlm.png", fixture("tests/fixtures/vlm/image.png"))
    seed("image_decode", "rgb8.png", png(8, 6, 2, 8, rgb))
    seed("image_decode", "grey8.png", png(7, 5, 0, 8, lambda x, y: bytes([(x * 40 + y) & 255])))
    seed("image_decode", "rgba8-adam7.png", png(9, 9, 6, 8, lambda x, y: rgb(x, y) + b"\x80",
                                                interlace=True))
    seed("image_decode", "grey16.png", png(4, 4, 0, 16, lambda x, y: struct.pack(">H", x * 4000 + y)))
    seed("image_decode", "palette8.png", png(6, 3, 3, 8, lambda x, y: bytes([(x + y) % 4]),
                                             palette=[(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]))
    seed("image_decode", "grey.jpg", jpeg(16, 8, 1, (1, 1), rgb))
    seed("image_decode", "ycbcr420.jpg", jpeg(16, 16, 3, (2, 2), rgb))
    seed("image_decode", "ycbcr444-restart.jpg", jpeg(24, 8, 3, (1, 1), rgb, restart=1))


# --- ONNX --------------------------------------------------------------------------------

def varint(v):
    out = b""
    while True:
        b = v & 0x7F
        v >>= 7
        if v == 0:
            return out + bytes([b])
        out += bytes([b | 0x80])


def field_bytes(num, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def field_varint(num, v):
    return varint(num << 3) + varint(v)


def value_info(name, elem, dims):
    shape = b""
    for d in dims:
        dim = field_varint(1, d) if isinstance(d, int) else field_bytes(2, d)
        shape += field_bytes(1, dim)
    tensor = field_varint(1, elem) + field_bytes(2, shape)
    return field_bytes(1, name) + field_bytes(2, field_bytes(1, tensor))


def model(graph):
    opset = field_bytes(1, "") + field_varint(2, 17)
    return field_varint(1, 8) + field_bytes(2, "jetvlm-fuzz") + field_bytes(8, opset) \
        + field_bytes(7, graph)


def onnx_seeds():
    init = field_varint(1, 64) + field_varint(1, 64) + field_varint(2, 1) + field_bytes(8, "proj") \
        + field_bytes(9, b"\x00" * 16)
    node = field_bytes(1, "pixel_values") + field_bytes(1, "proj") + field_bytes(2, "image_embeds") \
        + field_bytes(4, "MatMul")
    graph = field_bytes(1, node) + field_bytes(2, "encoder") + field_bytes(5, init) \
        + field_bytes(11, value_info("pixel_values", 1, ["batch", 3, 32, 32])) \
        + field_bytes(11, value_info("proj", 1, [64, 64])) \
        + field_bytes(12, value_info("image_embeds", 1, ["batch", 16, 64]))
    seed("onnx_signature", "encoder-f32.onnx", model(graph))
    graph = field_bytes(11, value_info("pixels", 2, [1, 128, 128, 3])) \
        + field_bytes(12, value_info("tokens", 10, [1, 16, 576])) \
        + field_bytes(12, value_info("extra", 16, []))
    seed("onnx_signature", "encoder-u8-nhwc.onnx", model(graph))
    seed("onnx_signature", "no-graph.onnx", field_varint(1, 8))


# --- text seeds from the repository ------------------------------------------------------

def text_seeds():
    for cfg in sorted((ROOT / "tests/fixtures").glob("**/config.json")):
        name = cfg.parent.relative_to(ROOT / "tests/fixtures").as_posix().replace("/", "-")
        seed("hf_config", f"{name}.json", cfg.read_bytes())
    seed("hf_config", "rope-llama3.json", json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "torch_dtype": "bfloat16", "eos_token_id": [1, 2], "bos_token_id": 0}))

    for rel, text in [("tests/fixtures/vlm/decoder/tokenizer.json", "USER: <image>\nwhat is in the picture? ASSISTANT:"),
                      ("models/demo/decoder/tokenizer.json", "<frames><f0></frames><q>how many objects are there?</q><a>"),
                      ("tests/fixtures/decoder/llama/tokenizer.json", "Hello, wörld! 123 \u00e9\u4e2d")]:
        name = Path(rel).parent.as_posix().replace("/", "-")
        seed("tokenizer", f"{name}.bin", fixture(rel) + b"\x00" + text.encode())

    # Inputs that once crashed a target (each has a unit test beside the fix).
    seed("tokenizer", "regress-truncated-decoder.bin", b'{"decoder": [1,}\0hello')
    seed("tokenizer", "regress-control-char-decoder.bin", b'{"decoder": {"type": "a\x01b"}}')
    seed("tokenizer", "regress-not-utf8-decoder.bin", b'{"decoder": {"add_p\xfeefix_space": true}}')

    for rel in ["models/demo/jetvlm.yaml", "tests/fixtures/vlm/jetvlm.yaml",
                "tests/fixtures/configs/package-demo/jetvlm.yaml"]:
        seed("package_manifest", Path(rel).parent.name + ".yaml", fixture(rel))
    vlm = fixture("tests/fixtures/vlm/jetvlm.yaml").decode()
    line = next(l for l in vlm.splitlines() if l.strip().startswith("template:"))
    seed("package_manifest", "regress-multibyte-after-placeholder.yaml",
         vlm.replace(line, '  template: "{frames}{question}{aaaaaaaaaa\u00e9\u00e9"'))

    seed("runtime_config", "full.yaml", """kv_policy: mixed
max_new_tokens: 128
sampling: {temperature: 0.7, top_k: 40, top_p: 0.9, repetition_penalty: 1.1, seed: 7}
window_frames: 4
capacity_tokens: 4096
session_max_position: 8192
device: cpu
vision:
  ort_library: /usr/lib/aarch64-linux-gnu/libonnxruntime.so
  execution_providers: [tensorrt, cuda, cpu]
  require: false
""")
    seed("runtime_config", "calibration.yaml", "kv_calibration: calib.yaml\nmax_new_tokens: 8\n")
    seed("runtime_config", "exact.yaml", "kv_policy: f32\nsampling:\n  temperature: 0.0\n")
    seed("runtime_config", "empty.yaml", "{}\n")

    rules = """model: ../../../models/demo
source: synthetic://scene?seed=3&pace=0
window: 4
every: 1
frames: 24
max_tokens: 8
kv: mixed
config: runtime.yaml
rules:
  - name: circle-colour
    question: what colour is the circle?
    when: changes
  - name: red-square-left
    question: where is the red square?
    when: { equals: left }
  - name: crowd
    question: how many objects are there?
    when: { at_least: 3 }
  - name: few
    question: how many?
    when: { at_most: 1.5 }
  - name: has-red
    question: colours?
    when: { contains: red }
  - name: not-empty
    question: anything?
    when: { not_equals: nothing }
"""
    seed("analytics_rules", "all-conditions.bin", rules + "\0left\n3\n red \nnothing\n2\nleft\n")
    seed("analytics_rules", "minimal.yaml", "source: synthetic://scene\nrules:\n  - {name: a, question: q, when: changes}\n")

    for i, p in enumerate(["fp16", "mixed", "int4-all", "int8-frames", "int2-frames",
                           "mixed:bits=4,group=32,keys=channel,budget=0.25,sinks=4",
                           "MIXED:Bits=2,salient=on,fblock=16,qblock=128",
                           "int4-all:text=quant,keys=token",
                           "mixed:layers=4c64/8t32/2c128/4t64",
                           "fp16,mixed:bits=2,group=32,int8-frames",
                           "4c64"]):
        seed("kv_policy", f"policy-{i:02}.txt", p)

    for i, u in enumerate(["synthetic://scene?fps=10&seed=7&width=128&height=128&frames=100&pace=1&objects=5",
                           "synthetic://shapes?fps=5&width=32&height=16&pace=0",
                           "file://path/to/image.png", "file:///abs/path.jpg",
                           "dir://frames/?fps=10&loop=0",
                           "v4l2:///dev/video0?width=640&height=480&fps=30",
                           "rtsp://camera/1", "frames/clip.png"]):
        seed("source_uri", f"uri-{i:02}.txt", u)

    detect = ROOT / "tests/fixtures/board/detect"

    def system(name):
        d = detect / name
        read = lambda rel: (d / rel).read_bytes() if (d / rel).is_file() else b""
        return read("proc/device-tree/model") + b"\0" + read("etc/nv_tegra_release") + b"\0" \
            + read("proc/meminfo")

    pairs = [("boards/orin-nano-8gb.yaml", "orin-nano-8gb"),
             ("boards/agx-orin-64gb.yaml", "agx-orin-64gb"),
             ("boards/thor-t5000.yaml", "thor"),
             ("boards/xavier-nx-16gb.yaml", "xavier-nx-16gb"),
             ("tests/fixtures/board/my-carrier.yaml", "unknown-jetson"),
             ("tests/fixtures/board/reserved-too-large.yaml", "bad-meminfo"),
             ("tests/fixtures/board/typo-field.yaml", "x86-workstation"),
             ("tests/fixtures/board/malformed.yaml", "orin-nano-4gb")]
    for rel, sysname in pairs:
        seed("board_profile", Path(rel).stem + ".bin", fixture(rel) + b"\0" + system(sysname))


if __name__ == "__main__":
    safetensors_seeds()
    gguf_seeds()
    image_seeds()
    onnx_seeds()
    text_seeds()
    total = sum(f.stat().st_size for f in CORPUS.glob("*/*"))
    print(f"corpus: {len(list(CORPUS.glob('*/*')))} files, {total // 1024} KiB in {CORPUS}")
