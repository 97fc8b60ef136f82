#!/usr/bin/env python3
"""Drives a running `jetvlm serve` with the official `openai` Python client (and raw HTTP
for what the client cannot send: bad JSON, a missing key) and writes what it saw as JSON.

Run by apps/serve/tests/serve_api.rs, which starts the server (with --api-key, --queue 1
and a small --max-image-bytes) and checks the answers against `jetvlm ask` and the synthetic
scene's ground truth. Protocol checks (status codes, error bodies, chunk shapes) are
asserted here; a failed check exits non-zero with the reason.

usage: openai_client.py --base-url URL --api-key KEY --image PNG --big-image PNG
                        --question Q --questions FILE --out JSON
"""

import argparse
import base64
import concurrent.futures
import http.client
import json
import sys
import urllib.parse

import openai
from openai import OpenAI


def data_uri(path, mime="image/png"):
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def image_message(url, question):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]


class Raw:
    """What the client cannot send (bad JSON, no key): plain HTTP/1.1 with the stdlib."""

    def __init__(self, base_url):
        u = urllib.parse.urlsplit(base_url)
        self.host, self.port = u.hostname, u.port

    def request(self, method, path, headers=None, body=None):
        c = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()


def check(cond, what):
    if not cond:
        print(f"check failed: {what}", file=sys.stderr)
        sys.exit(1)


def check_error_body(body, status, what, param=None):
    """An OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
    check(isinstance(body, dict) and isinstance(body.get("error"), dict), f"{what}: error body {body}")
    e = body["error"]
    for k in ("message", "type", "param", "code"):
        check(k in e, f"{what}: error body lacks {k}: {body}")
    check(isinstance(e["message"], str) and e["message"], f"{what}: empty message")
    if param is not None:
        check(e["param"] == param, f"{what}: param {e['param']!r}, expected {param!r}")
    return e


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--big-image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--questions", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = {}
    client = OpenAI(base_url=a.base_url + "/v1", api_key=a.api_key, max_retries=0, timeout=60)

    # /v1/models names the one model.
    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) == 1, f"models: {ids}")
    model = ids[0]
    out["model"] = model

    # A non-streamed answer about a data: image.
    r = client.chat.completions.create(
        model=model, messages=image_message(data_uri(a.image), a.question)
    )
    check(r.object == "chat.completion", f"object {r.object}")
    check(r.choices[0].message.role == "assistant", "role")
    check(r.choices[0].finish_reason in ("stop", "length"), f"finish {r.choices[0].finish_reason}")
    u = r.usage
    check(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage sums: {u}")
    out["data_answer"] = {
        "text": r.choices[0].message.content,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "cached_tokens": u.prompt_tokens_details.cached_tokens,
        "finish_reason": r.choices[0].finish_reason,
    }

    # Per-request sampling: temperature 0 is the greedy answer; a seed at temperature 1
    # gives the same answer twice; at temperature 2 a text-only question the demo model is
    # unsure of ("what shape is the red object?" with no image) is asked twice per seed,
    # seeds 0..8; a request without sampling fields after sampled ones is greedy again (the
    # configured sampling is restored); values outside OpenAI's ranges are 400s naming them.
    def sampled(messages=None, **kw):
        r = client.chat.completions.create(
            model=model, messages=messages or image_message(data_uri(a.image), a.question), **kw
        )
        return r.choices[0].message.content

    sampling = {"t0": sampled(temperature=0, seed=5)}
    sampling["seed7"] = [sampled(temperature=1.0, seed=7), sampled(temperature=1.0, seed=7)]
    unsure = [{"role": "user", "content": "what shape is the red object?"}]
    sampling["unsure_greedy"] = sampled(unsure)
    sampling["by_seed"] = [
        [sampled(unsure, temperature=2.0, top_p=1.0, seed=s) for _ in range(2)] for s in range(8)
    ]
    sampling["after"] = sampled()
    # Right after a sampled answer that differs from the greedy one, a request without
    # sampling fields is greedy.
    other = [s for s, p in enumerate(sampling["by_seed"]) if p[0] != sampling["unsure_greedy"]]
    if other:
        sampling["unsure_other"] = sampled(unsure, temperature=2.0, seed=other[0])
        sampling["unsure_after"] = sampled(unsure)
    errors = {}
    for name, kw, param in [
        ("temperature_3", {"temperature": 3}, "temperature"),
        ("temperature_neg", {"temperature": -1}, "temperature"),
        ("top_p_0", {"top_p": 0}, "top_p"),
        ("seed_float", {"seed": 1.5}, "seed"),
    ]:
        try:
            sampled(**kw)
            check(False, f"{name} was accepted")
        except openai.BadRequestError as e:
            check(e.status_code == 400, f"{name}: {e.status_code}")
            errors[name] = check_error_body(e.response.json(), 400, name, param)
    sampling["400"] = errors
    out["sampling"] = sampling

    # The same question streamed: chunks join to the same text, usage in the last chunk.
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=image_message(data_uri(a.image), a.question),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    check(all(c.object == "chat.completion.chunk" for c in chunks), "chunk objects")
    check(len({c.id for c in chunks}) == 1, "one id per stream")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(len(finishes) == 1, f"one finish_reason in the stream: {finishes}")
    check(chunks[-1].usage is not None and not chunks[-1].choices, "usage chunk last")
    out["stream_answer"] = {
        "text": text,
        "chunks": len(chunks),
        "finish_reason": finishes[0],
        "prompt_tokens": chunks[-1].usage.prompt_tokens,
        "completion_tokens": chunks[-1].usage.completion_tokens,
    }
    # The raw stream ends with `data: [DONE]`.
    raw = Raw(a.base_url)
    status, headers, body = raw.request(
        "POST",
        "/v1/chat/completions",
        {"Authorization": f"Bearer {a.api_key}", "Content-Type": "application/json"},
        json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": a.question}]}),
    )
    check(status == 200, f"raw stream status {status}")
    check(headers["content-type"].startswith("text/event-stream"), "SSE content type")
    events = [line for line in body.decode().splitlines() if line.startswith("data: ")]
    check(events[-1] == "data: [DONE]", f"stream ends with [DONE]: {events[-1:]}")
    out["text_only_stream_events"] = len(events)

    # camera://latest: one answer per question, with the frame it was about.
    with open(a.questions) as f:
        questions = [q.strip() for q in f if q.strip()]
    latest = []
    for q in questions:
        r = client.chat.completions.create(model=model, messages=image_message("camera://latest", q))
        extra = r.model_extra["jetvlm"]
        check(len(extra["frames"]) == 1, f"latest: one frame: {extra}")
        latest.append({"question": q, "answer": r.choices[0].message.content, "frame": extra["frames"][0],
                       "prompt_tokens": r.usage.prompt_tokens, "cached_tokens": r.usage.prompt_tokens_details.cached_tokens})
    out["latest"] = latest

    # camera://window, twice in a row: the window's frames are cached, only the question's
    # tokens are new.
    window = []
    for q in questions[:2]:
        r = client.chat.completions.create(model=model, messages=image_message("camera://window", q))
        window.append({"question": q, "answer": r.choices[0].message.content,
                       "frames": r.model_extra["jetvlm"]["frames"],
                       "prompt_tokens": r.usage.prompt_tokens,
                       "cached_tokens": r.usage.prompt_tokens_details.cached_tokens})
    out["window"] = window

    # 401 without the key, and with a wrong one.
    status, headers, body = raw.request(
        "POST", "/v1/chat/completions", {"Content-Type": "application/json"},
        json.dumps({"model": model, "messages": []}),
    )
    check(status == 401, f"no key: {status}")
    check_error_body(json.loads(body), 401, "no key")
    check(headers.get("www-authenticate") == "Bearer", "WWW-Authenticate")
    status, _, _ = raw.request("GET", "/metrics")
    check(status == 401, f"metrics without the key: {status}")
    status, _, _ = raw.request("GET", "/health")
    check(status == 200, f"health needs no key: {status}")
    wrong = OpenAI(base_url=a.base_url + "/v1", api_key="not-the-key", max_retries=0)
    try:
        wrong.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        check(False, "a wrong key was accepted")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, f"wrong key: {e.status_code}")
        out["401"] = check_error_body(e.response.json(), 401, "wrong key")

    # 413 for an image over --max-image-bytes.
    try:
        client.chat.completions.create(model=model, messages=image_message(data_uri(a.big_image), a.question))
        check(False, "an oversize image was accepted")
    except openai.APIStatusError as e:
        check(e.status_code == 413, f"oversize image: {e.status_code}")
        body = e.response.json()
        out["413"] = check_error_body(body, 413, "oversize image", "messages[0].content[0].image_url.url")

    # 400 with an OpenAI-style body: bad JSON, unknown model, bad image data, a file:// URL.
    errors = {}
    status, _, body = raw.request(
        "POST", "/v1/chat/completions",
        {"Authorization": f"Bearer {a.api_key}", "Content-Type": "application/json"},
        b'{"model": "x", "messages": [',
    )
    check(status == 400, f"bad JSON: {status}")
    errors["bad_json"] = check_error_body(json.loads(body), 400, "bad JSON", "body")
    cases = {
        "unknown_model": ("no-such-model", image_message("camera://latest", a.question), "model"),
        "bad_image_data": (model, image_message("data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==", a.question),
                           "messages[0].content[0].image_url.url"),
        "file_url": (model, image_message("file:///etc/passwd", a.question), "messages[0].content[0].image_url.url"),
    }
    for name, (m, msgs, param) in cases.items():
        try:
            client.chat.completions.create(model=m, messages=msgs)
            check(False, f"{name} was accepted")
        except openai.BadRequestError as e:
            check(e.status_code == 400, f"{name}: {e.status_code}")
            errors[name] = check_error_body(e.response.json(), 400, name, param)
    out["400"] = errors

    # 429 when the queue is full: more concurrent requests than the model and its queue
    # (--queue 1) hold.
    def one(i):
        try:
            client.chat.completions.create(
                model=model, messages=image_message("camera://latest", a.question)
            )
            return (200, None)
        except openai.RateLimitError as e:
            check_error_body(e.response.json(), 429, "queue full")
            return (429, e.response.headers.get("retry-after"))
    n = 16
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    statuses = [s for s, _ in results]
    retry_after = [ra for s, ra in results if s == 429]
    check(statuses.count(429) >= 1, f"no 429 among {n} concurrent requests: {statuses}")
    check(statuses.count(200) >= 1, f"no request got through: {statuses}")
    check(all(ra is not None and int(ra) >= 1 for ra in retry_after), f"Retry-After: {retry_after}")
    out["429"] = {"ok": statuses.count(200), "rejected": statuses.count(429), "retry_after": retry_after}

    # /metrics after all that.
    status, _, body = raw.request("GET", "/metrics", {"Authorization": f"Bearer {a.api_key}"})
    check(status == 200, f"metrics: {status}")
    out["metrics"] = body.decode()

    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
