// bild's page: chat and translation over the OpenAI-compatible API, streamed as server-sent events.
// Plain JavaScript, no build step and nothing from a CDN: the page works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // the conversation: {role, content}
let controller = null; // the AbortController of the request in flight

// ---- settings -------------------------------------------------------------------------------

const SETTINGS = ["mode", "max-tokens", "temperature", "api-key"];
for (const id of SETTINGS) {
  const saved = localStorage.getItem("bild-" + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("bild-" + id, $(id).value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function requestBody(messages) {
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = $("temperature").value;
  if (temperature !== "") body.temperature = parseFloat(temperature);
  if ($("mode").value) body.mode = $("mode").value;
  return body;
}

// ---- statistics -----------------------------------------------------------------------------

function showStats(bild, started, firstAt) {
  const now = performance.now();
  const tokens = bild.generated_tokens || 0;
  $("stat-tokens").textContent = tokens;
  // Decoding speed: tokens after the first over the time since it came (time to first token is apart).
  if (firstAt !== null && tokens > 1 && now > firstAt + 50) {
    $("stat-tps").textContent = ((tokens - 1) / ((now - firstAt) / 1000)).toFixed(1);
  }
  const settled = (bild.small_tokens || 0) + (bild.large_tokens || 0);
  if (settled > 0) $("stat-small").textContent = Math.round((100 * bild.small_tokens) / settled) + "%";
  if (firstAt !== null) $("stat-ttft").textContent = ((firstAt - started) / 1000).toFixed(2) + " s";
}

function resetStats() {
  for (const id of ["stat-tps", "stat-small", "stat-ttft"]) $(id).textContent = "–";
  $("stat-tokens").textContent = "0";
}

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").className = kind || "muted";
}

// ---- streaming ------------------------------------------------------------------------------

// POST a chat completion with stream: true; call onText with each piece of text. Resolves with the
// finish reason; rejects with an Error (an AbortError when stopped).
async function streamChat(messages, onText, signal) {
  const started = performance.now();
  let firstAt = null;
  let finish = null;
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify(requestBody(messages)),
    signal,
  });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      message = (await response.json()).error.message;
    } catch (e) {
      /* not OpenAI's error shape: keep the status line */
    }
    if (response.status === 401) message += " (set the API key under Settings)";
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) {
          if (firstAt === null) firstAt = performance.now();
          onText(choice.delta.content);
        }
        if (choice && choice.finish_reason) finish = choice.finish_reason;
        if (chunk.bild) showStats(chunk.bild, started, firstAt);
      }
    }
  }
  return finish;
}

// Run one request with its Stop button; `run(signal)` streams. Only one request at a time.
// Resolves with "done", "stopped" or "error".
async function withStop(stopButton, run) {
  controller = new AbortController();
  document.body.dataset.state = "streaming";
  for (const b of document.querySelectorAll("#chat-send, #translate-go")) b.disabled = true;
  stopButton.disabled = false;
  resetStats();
  setStatus("streaming…");
  try {
    const finish = await run(controller.signal);
    setStatus(finish === "length" ? "done (max tokens reached)" : "done");
    return "done";
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("stopped");
      return "stopped";
    }
    setStatus(error.message, "error");
    return "error";
  } finally {
    controller = null;
    stopButton.disabled = true;
    for (const b of document.querySelectorAll("#chat-send, #translate-go")) b.disabled = false;
    document.body.dataset.state = "idle";
  }
}

// ---- chat -----------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function sendChat() {
  const text = $("chat-input").value.trim();
  if (!text || controller) return;
  $("chat-input").value = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  let reply = "";
  const outcome = await withStop($("chat-stop"), (signal) =>
    streamChat(conversation, (piece) => {
      reply += piece;
      div.textContent = reply;
      div.scrollIntoView({ block: "end" });
    }, signal),
  );
  div.classList.remove("streaming");
  if (outcome === "stopped") div.classList.add("stopped");
  if (reply) conversation.push({ role: "assistant", content: reply }); // a stopped reply stays in the conversation
  else if (outcome === "error") div.remove();
  $("chat-input").focus();
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sendChat();
});
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    sendChat();
  }
});
$("chat-clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
  resetStats();
  setStatus("");
});

// ---- translate ------------------------------------------------------------------------------

async function translate() {
  const text = $("source").value.trim();
  if (!text || controller) return;
  const language = $("target-lang").value;
  // The instruction the default draft was aligned on (align/prompts.py), so that it drafts well here.
  const messages = [{ role: "user", content: `Translate the following sentence into ${language}: ${text}` }];
  const out = $("translation");
  out.textContent = "";
  await withStop($("translate-stop"), (signal) => streamChat(messages, (piece) => (out.textContent += piece), signal));
}

$("translate-go").addEventListener("click", translate);

for (const stop of [$("chat-stop"), $("translate-stop")]) {
  stop.addEventListener("click", () => controller && controller.abort());
}

// ---- tabs and server state ------------------------------------------------------------------

for (const tab of document.querySelectorAll("nav [role=tab]")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll("nav [role=tab]")) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      $(other.dataset.panel).hidden = !selected;
    }
  });
}

async function refreshServer() {
  try {
    const health = await (await fetch("/health")).json();
    $("health").textContent = health.status;
    $("health").className = "badge " + health.status;
  } catch (e) {
    $("health").textContent = "unreachable";
    $("health").className = "badge down";
  }
  try {
    const models = await fetch("/v1/models", { headers: headers() });
    if (models.ok) {
      const card = (await models.json()).data[0];
      const small = card.bild && card.bild.small_model;
      $("model").textContent = card.id + (small ? " + " + small : "");
    }
  } catch (e) {
    /* shown by the health badge */
  }
}
refreshServer();
setInterval(refreshServer, 10000);
