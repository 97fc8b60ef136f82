#!/usr/bin/env python3
"""Load benchmark for `jetvlm serve` (a script, not a test).

Starts `jetvlm serve` on a free loopback port (demo model, synthetic camera), then runs N
concurrent clients (the official `openai` client, streaming) for a fixed time, in rounds;
each client asks in turn about camera://latest, camera://window and a data: image. Prints
requests/s, p50/p95 time to first token (client side, queue wait included), errors and
429s, and the server's RSS before the first round and after each round (flat RSS: no
growth round over round).

usage: .venv/bin/python apps/serve/bench/load.py [--jetvlm target/release/jetvlm]
         [--clients 4] [--seconds 20] [--rounds 3] [--queue 8] [--json OUT]
"""

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
import struct

from openai import OpenAI

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
QUESTIONS = ["how many objects are there?", "is there a red circle?", "how many circles are there?"]


def png(w, h):
    """A small PNG (a gradient), for the data: requests."""
    raw = b"".join(b"\x00" + bytes(((x * 7 + y * 3) % 256) for x in range(w * 3)) for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_server(jetvlm, queue, source):
    p = subprocess.Popen(
        [jetvlm, "serve", "--port", "0", "--source", source, "--queue", str(queue),
         "--model", os.path.join(ROOT, "models", "demo")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    deadline = time.time() + 60
    addr = None
    while time.time() < deadline and addr is None:
        line = p.stderr.readline()
        if not line:
            break
        m = re.search(r"listening on http://(\S+)", line)
        if m:
            addr = m.group(1)
    if addr is None:
        p.kill()
        sys.exit("jetvlm serve did not start")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{addr}/health", timeout=2) as r:
                if r.status == 200:
                    return p, addr
        except Exception:
            time.sleep(0.1)
    p.kill()
    sys.exit("the model did not load within 60 s")


def client_loop(base, model, image_uri, stop_at, out, lock, idx):
    c = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    i = idx
    while time.time() < stop_at:
        kind = ("camera://latest", "camera://window", image_uri)[i % 3]
        q = QUESTIONS[i % len(QUESTIONS)]
        i += 1
        t0 = time.perf_counter()
        ttft = None
        try:
            stream = c.chat.completions.create(
                model=model, stream=True,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": kind}},
                    {"type": "text", "text": q}]}],
            )
            for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - t0
            rec = ("ok", ttft if ttft is not None else time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - every failure is counted
            status = getattr(e, "status_code", None)
            rec = ("429" if status == 429 else "error", None)
            if status == 429:
                time.sleep(0.05)
        with lock:
            out.append(rec)


def run_round(base, model, image_uri, clients, seconds):
    out, lock = [], threading.Lock()
    stop_at = time.time() + seconds
    threads = [threading.Thread(target=client_loop, args=(base, model, image_uri, stop_at, out, lock, k))
               for k in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    ok = [t for s, t in out if s == "ok"]
    ttfts = sorted(ok)
    pct = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] * 1e3 if ttfts else float("nan")
    return {
        "requests": len(out), "ok": len(ok), "rejected_429": sum(1 for s, _ in out if s == "429"),
        "errors": sum(1 for s, _ in out if s == "error"), "wall_s": round(wall, 2),
        "ok_per_s": round(len(ok) / wall, 2),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1e3, 1) if ttfts else None,
        "ttft_p95_ms": round(pct(0.95), 1) if ttfts else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jetvlm", default=os.path.join(ROOT, "target", "release", "jetvlm"))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queue", type=int, default=8)
    ap.add_argument("--source", default="synthetic://scene?seed=3")
    ap.add_argument("--json")
    a = ap.parse_args()
    if not os.access(a.jetvlm, os.X_OK):
        sys.exit(f"{a.jetvlm} not found: cargo build --release -p jetvlm, or pass --jetvlm")
    proc, addr = start_server(a.jetvlm, a.queue, a.source)
    base = f"http://{addr}"
    try:
        model = OpenAI(base_url=base + "/v1", api_key="none").models.list().data[0].id
        image_uri = "data:image/png;base64," + base64.b64encode(png(128, 128)).decode()
        # One request of each kind before measuring (first-use allocations).
        run_round(base, model, image_uri, 1, 1.0)
        report = {"clients": a.clients, "seconds": a.seconds, "queue": a.queue,
                  "rss_kib_before": rss_kib(proc.pid), "rounds": []}
        print(f"jetvlm serve {base}: {a.clients} clients x {a.seconds:g} s x {a.rounds} rounds, "
              f"queue {a.queue}; RSS before {report['rss_kib_before']} KiB")
        print("round  requests  ok/s   p50 TTFT ms  p95 TTFT ms  429s  errors  RSS after KiB")
        for r in range(a.rounds):
            res = run_round(base, model, image_uri, a.clients, a.seconds)
            res["rss_kib_after"] = rss_kib(proc.pid)
            report["rounds"].append(res)
            print(f"{r + 1:>5}  {res['requests']:>8}  {res['ok_per_s']:>5}  {res['ttft_p50_ms']:>11}  "
                  f"{res['ttft_p95_ms']:>11}  {res['rejected_429']:>4}  {res['errors']:>6}  {res['rss_kib_after']:>13}")
        with urllib.request.urlopen(base + "/metrics", timeout=5) as m:
            metrics = m.read().decode()
        report["server_frames_dropped"] = next(
            (float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("jetvlm_frames_dropped_total ")), None)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        print(f"server exit status after SIGTERM: {code}")


if __name__ == "__main__":
    main()
