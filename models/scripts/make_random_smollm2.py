#!/usr/bin/env python3
"""Writes a SmolLM2-135M-shaped Llama model with random BF16 weights (plus a small byte-level
BPE tokenizer) for benchmarks, into the git-ignored models/gen/ (nothing is downloaded).

    .venv/bin/python models/scripts/make_random_smollm2.py [--out models/gen/smollm2-135m-random]
        [--dtype bfloat16|float16|float32] [--seed 0]

Needs only numpy and tokenizers (installed by `.ci/setup`), not torch.

Shape: hidden 576, intermediate 1536, 30 layers, 9 query / 3 KV heads (head_dim 64), vocab
49152, tied embeddings, RoPE theta 100000: 134.5M parameters, 269 MB in BF16.
"""

import argparse
import json
import os
import struct
import tempfile

import numpy as np

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tokenizer_files(out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["The camera sees a red car parked next to a tree. A person walks by."] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def to_bytes(x, dtype):
    """float32 array -> little-endian bytes of `dtype` (bfloat16 rounded to nearest even)."""
    if dtype == "float32":
        return x.astype("<f4").tobytes()
    if dtype == "float16":
        return x.astype("<f2").tobytes()
    bits = x.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def save_safetensors(tensors, path, dtype):
    """The safetensors format: an 8-byte header length, a JSON header, the raw data."""
    name = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, x in tensors.items():
        b = to_bytes(x, dtype)
        header[key] = {"dtype": name, "shape": list(x.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "gen", "smollm2-135m-random"))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    g = np.random.default_rng(args.seed)
    c = CONFIG
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def rand(*shape, std=0.02):
        return (g.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": ones(h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = ones(h)
        t[f"{p}.post_attention_layernorm.weight"] = ones(h)
        t[f"{p}.self_attn.q_proj.weight"] = rand(q, h)
        t[f"{p}.self_attn.k_proj.weight"] = rand(kv, h)
        t[f"{p}.self_attn.v_proj.weight"] = rand(kv, h)
        t[f"{p}.self_attn.o_proj.weight"] = rand(h, q)
        t[f"{p}.mlp.gate_proj.weight"] = rand(i, h)
        t[f"{p}.mlp.up_proj.weight"] = rand(i, h)
        t[f"{p}.mlp.down_proj.weight"] = rand(h, i)
    # Write to a temporary name, then rename: never a half-written model.
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    os.close(fd)
    save_safetensors(t, tmp, args.dtype)
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    cfg = dict(c, torch_dtype=args.dtype)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    tokenizer_files(out)
    n = sum(x.size for x in t.values())
    print(f"wrote {out}: {n / 1e6:.1f}M parameters, {args.dtype}")


if __name__ == "__main__":
    main()
