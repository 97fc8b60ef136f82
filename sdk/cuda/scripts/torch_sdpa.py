#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention, FP16, one query (decode), per call on the GPU: the
reference that `jetvlm bench kv --device cuda` is compared with.

    python3 sdk/cuda/scripts/torch_sdpa.py --shape 9/3/64 --context 8192,32768,131072

Prints one JSON object per (shape, context): microseconds per call (CUDA events over
--iters calls after a warm-up, median of --reps), bytes of K/V read and GB/s. Each call
attends a different layer's K/V (cycled over enough layers to exceed 4x the L2 cache), as a
decode step does, so K/V come from device memory. `us_per_call_graph` is the same calls
replayed from a CUDA graph: the kernel time without Python's launch cost, for small shapes
whose eager time is the host's.
"""

import argparse
import json
import sys


def graph_time(torch, call, iters, reps):
    """Median microseconds per call of `iters` calls captured in one CUDA graph and replayed."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):
                call(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(iters):
                call(i)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / iters)
        times.sort()
        return times[len(times) // 2]
    except Exception as e:  # noqa: BLE001 - any capture failure just leaves the column empty
        print(f"torch_sdpa: CUDA graph capture failed: {e}", file=sys.stderr)
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", default=[], help="q_heads/kv_heads/head_dim")
    ap.add_argument("--context", default="8192,32768,131072")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"SKIP torch_sdpa: {e}")
        return 0
    if not torch.cuda.is_available():
        print("SKIP torch_sdpa: no CUDA device visible to PyTorch")
        return 0
    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    shapes = args.shape or ["9/3/64", "32/32/64"]
    for shape in shapes:
        hq, hkv, d = (int(x) for x in shape.split("/"))
        for ctx in (int(c) for c in args.context.split(",")):
            kv_bytes = 2 * ctx * hkv * d * 2
            layers = max(1, min(64, (4 * l2 + (1 << 30)) // kv_bytes + 1))
            free = torch.cuda.mem_get_info()[0]
            layers = max(1, min(layers, int(0.5 * free // kv_bytes)))
            q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.float16)
            ks = [torch.randn(1, hkv, ctx, d, device=dev, dtype=torch.float16) for _ in range(layers)]
            vs = [torch.randn(1, hkv, ctx, d, device=dev, dtype=torch.float16) for _ in range(layers)]
            gqa = hq != hkv

            def call(i):
                return F.scaled_dot_product_attention(q, ks[i % layers], vs[i % layers], enable_gqa=gqa)

            try:
                call(0)
            except TypeError:
                # Older PyTorch without enable_gqa: repeat the KV heads (reads more bytes).
                rep = hq // hkv
                ks = [k.repeat_interleave(rep, dim=1) for k in ks]
                vs = [v.repeat_interleave(rep, dim=1) for v in vs]

                def call(i):
                    return F.scaled_dot_product_attention(q, ks[i % layers], vs[i % layers])

            for i in range(layers):
                call(i)
            torch.cuda.synchronize()
            times = []
            for _ in range(args.reps):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                for i in range(args.iters):
                    call(i)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) * 1e3 / args.iters)
            times.sort()
            us = times[len(times) // 2]
            graph_us = graph_time(torch, call, args.iters, args.reps)
            print(json.dumps({
                "impl": "torch_sdpa_fp16",
                "shape": shape,
                "context": ctx,
                "layers_cycled": layers,
                "us_per_call": round(us, 2),
                # The same calls replayed from a CUDA graph: the kernels' own time, without
                # Python's per-call launch cost (None where capture failed).
                "us_per_call_graph": None if graph_us is None else round(graph_us, 2),
                "kv_bytes": kv_bytes,
                "gbs": round(kv_bytes / (us * 1e-6) / 1e9, 1),
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name(0),
            }))
            sys.stdout.flush()
            del ks, vs
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
