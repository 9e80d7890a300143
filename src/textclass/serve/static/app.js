// The web page's logic: plain JavaScript, no libraries, so it works without a network.
"use strict";

const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["X-API-Key"] = key;
  return h;
}

async function call(path, options) {
  const response = await fetch(path, { ...options, headers: headers() });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    if (response.status === 401) $("key-box").open = true;
    const detail = body && body.detail ? body.detail : response.statusText;
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function render(result) {
  const chosen = new Set(result.labels || [result.label]);
  $("decision").textContent = result.labels ? (result.labels.join(", ") || "(no label above the threshold)") : result.label;
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, score] of Object.entries(result.scores)) {
    const li = document.createElement("li");
    li.className = "bar" + (chosen.has(name) ? " chosen" : "");
    li.dataset.label = name;
    li.dataset.score = String(score);
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    label.title = name;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(score * 100).toFixed(2)}%`;
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(score * 100).toFixed(1)}%`;
    li.append(label, track, value);
    bars.appendChild(li);
  }
  $("result").hidden = false;
}

async function loadLabels() {
  try {
    const info = await call("/v1/labels", { method: "GET" });
    const kind = info.multi_label ? "multi-label" : "single-label";
    $("model-info").textContent = `${info.labels.length} labels (${kind}): ${info.labels.join(", ")}`;
  } catch (err) {
    $("model-info").textContent = `Labels unavailable (${err.message}).`;
  }
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim()) { showError("Type a text first."); return; }
  showError("");
  $("classify").disabled = true;
  try {
    const data = await call("/v1/classify", { method: "POST", body: JSON.stringify({ texts: [text] }) });
    render(data.results[0]);
  } catch (err) {
    showError(err.message);
  } finally {
    $("classify").disabled = false;
  }
});

$("api-key").addEventListener("change", loadLabels);
loadLabels();
