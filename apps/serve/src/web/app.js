// jetvlm live view: polls /api/status, refreshes the camera frame, draws the charts, asks.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let key = params.get("key") || localStorage.getItem("jetvlm-key") || "";
$("key").value = key;
let modelId = null;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function fmtBytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(2) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + " KiB";
  return n + " B";
}

// A small line chart: series = [{values, color}], x = sample index.
function chart(canvas, series) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  const all = series.flatMap((s) => s.values).filter((v) => Number.isFinite(v));
  canvas.dataset.points = String(series.length ? series[0].values.length : 0);
  ctx.fillStyle = "#888";
  ctx.font = "11px sans-serif";
  if (!all.length) {
    ctx.fillText("no answers yet", pad, h / 2);
    return;
  }
  const max = Math.max(...all) * 1.1 || 1;
  ctx.strokeStyle = "#333";
  ctx.beginPath();
  ctx.moveTo(pad, 4); ctx.lineTo(pad, h - pad); ctx.lineTo(w - 4, h - pad);
  ctx.stroke();
  ctx.fillText(max >= 1e4 ? fmtBytes(max) : max.toFixed(1), 2, 12);
  ctx.fillText("0", 2, h - pad);
  for (const s of series) {
    const n = s.values.length;
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.values.forEach((v, i) => {
      const x = pad + (n > 1 ? (i * (w - pad - 8)) / (n - 1) : 0);
      const y = h - pad - (v / max) * (h - pad - 8);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
}

async function refreshStatus() {
  let s;
  try {
    const r = await fetch("/api/status", { headers: headers() });
    if (r.status === 401) { $("model").textContent = "API key needed (enter it below)"; return; }
    s = await r.json();
  } catch (e) {
    $("model").textContent = "server unreachable";
    return;
  }
  modelId = s.model;
  $("model").textContent = s.ready
    ? `${s.model} · KV ${s.kv_policy} · encoder ${s.encoder_provider} · decoder ${s.decoder}`
    : "model loading…";
  if (s.camera) {
    $("camera").textContent = `${s.camera.uri} · ${s.camera.captured} captured · ${s.camera.windowed} windowed · ${s.camera.dropped} dropped` +
      (s.camera.stopped ? ` · ${s.camera.stopped}` : "");
  } else {
    $("camera").textContent = "no camera (--source)";
  }
  $("kvnow").textContent = `KV ${fmtBytes(s.kv.bytes)} (all-FP16 ${fmtBytes(s.kv.fp16_equivalent_bytes)})`;
  const tbody = $("standing").tBodies[0];
  if (s.standing.length) {
    tbody.innerHTML = "";
    for (const a of s.standing) {
      const tr = tbody.insertRow();
      tr.className = "standing-answer";
      tr.insertCell().textContent = a.name;
      tr.insertCell().textContent = a.question;
      const c = tr.insertCell();
      c.textContent = a.answer !== null ? a.answer : a.error;
      if (a.answer === null) c.className = "err";
      tr.insertCell().textContent = a.frame !== null ? `frame ${a.frame}` : "";
    }
  } else if (s.standing_questions.length) {
    tbody.innerHTML = "";
    for (const q of s.standing_questions) {
      const tr = tbody.insertRow();
      tr.insertCell().textContent = q.name;
      tr.insertCell().textContent = q.question;
      tr.insertCell().textContent = "(waiting for the window)";
    }
  }
  const h = s.history;
  chart($("latency"), [
    { values: h.map((p) => p.ttft_ms), color: "#6cf" },
    { values: h.map((p) => p.tpot_ms), color: "#fc6" },
  ]);
  chart($("kv"), [
    { values: h.map((p) => p.kv_bytes), color: "#6f9" },
    { values: h.map((p) => p.kv_fp16_bytes), color: "#f66" },
  ]);
}

let frameUrl = null;
async function refreshFrame() {
  try {
    const r = await fetch("/frame.jpg", { headers: headers(), cache: "no-store" });
    if (!r.ok) { $("frameinfo").textContent = r.status === 404 ? "no camera" : "no frame yet"; return; }
    const blob = await r.blob();
    const url = URL.createObjectURL(blob);
    const img = $("frame");
    img.onload = () => { if (frameUrl) URL.revokeObjectURL(frameUrl); frameUrl = url; };
    img.src = url;
    img.dataset.frameIndex = r.headers.get("x-frame-index") || "";
    $("frameinfo").textContent = `frame ${img.dataset.frameIndex}`;
  } catch (e) {
    $("frameinfo").textContent = "frame unavailable";
  }
}

async function ask(question, about) {
  const out = $("answer");
  out.className = "";
  out.textContent = "…";
  if (!modelId) await refreshStatus();
  const content = [{ type: "text", text: question }];
  if (about) content.unshift({ type: "image_url", image_url: { url: about } });
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model: modelId, messages: [{ role: "user", content }] }),
    });
    const body = await r.json();
    if (!r.ok) {
      out.className = "err";
      out.textContent = body.error ? body.error.message : `HTTP ${r.status}`;
      return;
    }
    const text = body.choices[0].message.content.trim();
    const j = body.jetvlm || {};
    out.textContent = `${question} → ${text}`;
    out.dataset.answer = text;
    out.dataset.frames = (j.frames || []).join(",");
    out.title = `TTFT ${(j.ttft_ms || 0).toFixed(1)} ms · ${body.usage.prompt_tokens} prompt tokens`;
  } catch (e) {
    out.className = "err";
    out.textContent = String(e);
  }
  refreshStatus();
}

$("ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  key = $("key").value.trim();
  localStorage.setItem("jetvlm-key", key);
  const q = $("question").value.trim() || $("question").placeholder;
  ask(q, $("about").value);
});

(async () => {
  await refreshStatus();
  await refreshFrame();
  // ?ask=QUESTION asks once on load (about the latest frame when there is a camera).
  const q = params.get("ask");
  if (q) {
    $("question").value = q;
    await ask(q, params.get("about") !== null ? params.get("about") : "camera://latest");
  }
  setInterval(refreshStatus, 1000);
  setInterval(refreshFrame, 500);
})();
