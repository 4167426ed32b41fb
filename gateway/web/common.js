// Shared by the playground and the ops page: the API key, authorised fetches and fal-style error text.
"use strict";

const KEY_STORE = "birefnet-serve.key";

function $(id) {
  return document.getElementById(id);
}

// The key lives in this tab's sessionStorage only (both pages share it); it is sent as fal's
// `Authorization: Key <key>` header and never put into a URL or a snippet.
function setupKeyField(input) {
  input.value = sessionStorage.getItem(KEY_STORE) || input.value;
  input.addEventListener("change", () => sessionStorage.setItem(KEY_STORE, input.value.trim()));
}

function currentKey() {
  return ($("api-key").value || "").trim();
}

function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = currentKey();
  if (key) headers.set("Authorization", `Key ${key}`);
  return fetch(path, { ...options, headers });
}

// `{"detail": "..."}` or FastAPI/fal's `{"detail": [{loc, msg, type}]}` as one readable line.
function describeError(status, body) {
  const detail = body && body.detail;
  let text;
  if (Array.isArray(detail)) {
    text = detail
      .map((d) => {
        const where = (d.loc || []).filter((p) => p !== "body").join(".");
        return `${where ? where + ": " : ""}${d.msg}${d.type ? ` (${d.type})` : ""}`;
      })
      .join("; ");
  } else if (typeof detail === "string") {
    text = detail + (body.error_type ? ` (${body.error_type})` : "");
  } else {
    text = JSON.stringify(body);
  }
  return `HTTP ${status}: ${text}`;
}

async function readJson(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { detail: text || response.statusText };
  }
}

class ApiError extends Error {
  constructor(status, body) {
    super(describeError(status, body));
    this.status = status;
    this.body = body;
  }
}

async function apiJson(path, options = {}) {
  const response = await api(path, options);
  const body = await readJson(response);
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || seconds === "") return "–";
  const s = Number(seconds);
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function formatBytes(n) {
  if (!n && n !== 0) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function clockTime(unix) {
  if (!unix) return "–";
  return new Date(Number(unix) * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

// A <td>/<th> with text (never HTML: values come from requests and workers).
function cell(tag, text, attrs = {}) {
  const el = document.createElement(tag);
  el.textContent = text === null || text === undefined ? "–" : String(text);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}
