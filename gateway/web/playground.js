// The playground: build a fal-ai/birefnet request, upload the image through the gateway, submit it to the
// queue, follow the status stream (queue position, logs), then show the result and the same request as code.
"use strict";

const REQUESTS = "/queue/fal-ai/birefnet/requests/";
const FLAGS = ["refine_foreground", "output_mask", "mask_only"];
const VIDEO_SELECTS = ["video_quality", "video_write_mode"]; // shown only where the endpoint has them
let options = null; // /playground/options.json
let chosenFile = null;
let current = null; // {id, abort: AbortController}
let lastInput = null; // the body of the last request sent
let lastImageUrl = null;

function endpointSpec() {
  return options.endpoints[$("endpoint").value];
}

function fillSelect(select, choices, value) {
  const previous = select.value;
  select.replaceChildren(...choices.map((choice) => new Option(choice, choice)));
  select.value = choices.includes(previous) ? previous : value;
}

// Choices and defaults follow the endpoint; 2304x2304 only with General Use (Dynamic), mask_only only on v2.
function syncForm() {
  const spec = endpointSpec();
  const fields = spec.fields;
  fillSelect($("model"), fields.model.choices, fields.model.default);
  const format = fields[spec.format_field];  // output_format, or video_output_type for videos
  fillSelect($("output_format"), format.choices, format.default);
  syncResolutions();
  for (const name of VIDEO_SELECTS) {
    $(`${name}-field`).hidden = !(name in fields);
    if (name in fields) fillSelect($(name), fields[name].choices, fields[name].default);
  }
  const video = spec.url_field === "video_url";
  $("input-legend").textContent = video ? "Video" : "Image";
  $("file-label").textContent = video ? "Choose a video file" : "Choose an image file";
  $("url-label").textContent = video ? "…or a video URL" : "…or an image URL";
  $("url-field-name").textContent = spec.url_field;
  $("image-url").placeholder = video ? "https://example.com/clip.mp4" : "https://example.com/cat.jpg";
  const maskOnly = $("mask_only");
  maskOnly.disabled = !("mask_only" in fields);
  if (maskOnly.disabled) maskOnly.checked = false;
  $("mask-only-help").textContent = maskOnly.disabled ? "(v2 only: not on this endpoint)" : "";
}

function syncResolutions() {
  const spec = endpointSpec();
  const field = spec.fields.operating_resolution;
  const model = $("model").value;
  const allowed = field.choices.filter((r) => {
    const only = spec.resolution_limits[r];
    return !only || only.includes(model);
  });
  fillSelect($("operating_resolution"), allowed, field.default);
  const variant = spec.variants[model];
  $("model-help").textContent = variant ? `Served by the ${variant} workers.` : "";
  $("resolution-help").textContent =
    allowed.length < field.choices.length ? "2304x2304: General Use (Dynamic) only." : "";
}

function defaultsIntoForm() {
  const fields = endpointSpec().fields;
  for (const flag of FLAGS) {
    if (fields[flag]) $(flag).checked = Boolean(fields[flag].default);
  }
}

// The request body: only fields that differ from the endpoint's defaults, like a hand-written call.
function buildInput(imageUrl) {
  const spec = endpointSpec();
  const fields = spec.fields;
  const input = { [spec.url_field]: imageUrl };
  for (const name of ["model", "operating_resolution", "output_format", ...VIDEO_SELECTS]) {
    const key = name === "output_format" ? spec.format_field : name;
    if (fields[key] && $(name).value !== fields[key].default) input[key] = $(name).value;
  }
  for (const flag of FLAGS) {
    if (fields[flag] && !$(flag).disabled && $(flag).checked !== Boolean(fields[flag].default)) {
      input[flag] = $(flag).checked;
    }
  }
  return input;
}

// --- status, logs, errors ---
function setStatus(text) {
  $("status").textContent = text;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
}

function addLog(message, level = "INFO", kind = "log") {
  const item = document.createElement("li");
  item.className = `log-${kind} level-${level.toLowerCase()}`;
  item.textContent = kind === "status" ? message : `[${level}] ${message}`;
  $("logs").append(item);
  item.scrollIntoView({ block: "nearest" });
}

function describeStatus(event) {
  if (event.status === "IN_QUEUE") {
    const ahead = event.queue_position ?? 0;
    return ahead === 0 ? "In queue: position 0, next in line" : `In queue: position ${ahead} (${ahead} ahead)`;
  }
  if (event.status === "IN_PROGRESS") return "In progress";
  if (event.error) return `Completed with an error: ${event.error}`;
  const took = event.metrics && event.metrics.inference_time;
  return took ? `Completed (inference ${formatSeconds(took)})` : "Completed";
}

function resetOutput() {
  $("error").hidden = true;
  $("error").textContent = "";
  $("logs").replaceChildren();
  $("result-json").textContent = "";
  $("request-id").textContent = "";
  for (const id of ["original-img", "original-video", "cutout-img", "mask-img", "cutout-video", "mask-video",
    "cutout-download", "mask-download"]) {
    $(id).hidden = true;
    $(id).removeAttribute("src");
    $(id).removeAttribute("href");
  }
  $("cutout-caption").textContent = "Cut-out";
  $("result-warning").hidden = true;
}

// --- the request ---
async function upload(file) {
  const name = file.name.replace(/[^A-Za-z0-9._-]+/g, "_") || "upload";
  const body = await apiJson("/files/upload", {
    method: "POST",
    body: file,
    headers: { "Content-Type": file.type || "application/octet-stream", "X-Fal-File-Name": name },
  });
  return body.access_url;
}

// fal's SSE status stream (`data: <status JSON>` per change, new logs only), read with fetch because
// EventSource cannot send the Authorization header. Resolves with the last event.
async function followStatus(id, signal, onEvent) {
  const response = await api(`${REQUESTS}${id}/status/stream?logs=1`, { signal });
  if (!response.ok) throw new ApiError(response.status, await readJson(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (data) {
        last = JSON.parse(data);
        onEvent(last);
      }
    }
  }
  return last;
}

async function pollUntilDone(id, signal) {
  for (;;) {
    const status = await apiJson(`${REQUESTS}${id}/status`, { signal });
    if (status.status === "COMPLETED") return status;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function run(event) {
  event.preventDefault();
  if (current) return;
  resetOutput();
  const urlText = $("image-url").value.trim();
  if (!currentKey()) {
    showError("Enter an API key first (any value works when the gateway's auth is off).");
    $("api-key").focus();
    return;
  }
  if (!chosenFile && !urlText) {
    showError("Choose a file, drop one on the drop zone, or enter a URL.");
    $("image-file").focus();
    return;
  }
  const abort = new AbortController();
  current = { id: null, abort };
  $("run").disabled = true;
  try {
    let imageUrl = urlText;
    if (chosenFile) {
      setStatus(`Uploading ${chosenFile.name}…`);
      imageUrl = await upload(chosenFile);
      addLog(`uploaded ${chosenFile.name} (${formatBytes(chosenFile.size)})`, "INFO", "status");
    }
    const videoInput = endpointSpec().url_field === "video_url";
    const preview = chosenFile ? URL.createObjectURL(chosenFile) : imageUrl;
    if (videoInput) showVideo("original-video", preview);
    else showImage("original-img", preview, chosenFile && chosenFile.name);
    const input = buildInput(imageUrl);
    lastInput = input;
    lastImageUrl = imageUrl;
    renderSnippet();
    const spec = endpointSpec();
    setStatus("Submitting…");
    const submitted = await apiJson(`/queue/${spec.app_id}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(input),
      signal: abort.signal,
    });
    current.id = submitted.request_id;
    $("request-id").textContent = `Request ${submitted.request_id}`;
    $("cancel").disabled = false;
    let previous = "";
    const onEvent = (status) => {
      const text = describeStatus(status);
      setStatus(text);
      if (text !== previous) addLog(text, "INFO", "status");
      previous = text;
      for (const entry of status.logs || []) addLog(entry.message, entry.level);
    };
    onEvent(submitted);
    let final = await followStatus(submitted.request_id, abort.signal, onEvent).catch((err) => {
      if (abort.signal.aborted) throw err;
      addLog(`status stream broke (${err.message}); polling instead`, "WARN", "status");
      return null;
    });
    if (!final || final.status !== "COMPLETED") final = await pollUntilDone(submitted.request_id, abort.signal);
    await showResult(submitted.request_id, final);
  } catch (err) {
    if (!abort.signal.aborted) {
      setStatus("Failed");
      showError(err.message);
    }
  } finally {
    current = null;
    $("run").disabled = false;
    $("cancel").disabled = true;
  }
}

function showVideo(id, url, name) {
  const video = $(id);
  video.onerror = () => {
    addLog(`this browser cannot play ${name || url.slice(0, 80)} (ProRes, for one): download it instead`, "WARN",
      "status");
  };
  video.src = url;
  video.hidden = false;
}

// A GIF output is an image: shown in an <img>, not played.
function isStill(file) {
  return (file.content_type || "").startsWith("image/");
}

async function showResult(id, final) {
  const response = await api(`${REQUESTS}${id}`);
  const body = await readJson(response);
  $("result-json").textContent = JSON.stringify(body, null, 2);
  if (!response.ok) {
    setStatus(`Failed: ${final.error || `HTTP ${response.status}`}`);
    showError(`The request failed. ${describeError(response.status, body)}`);
    $("result-heading").focus();
    return;
  }
  if (body.warning) {
    $("result-warning").textContent = body.warning;
    $("result-warning").hidden = false;
  }
  if (body.video) {  // the video endpoint: play both outputs
    const { video, mask_video: mask } = body;
    if (isStill(video)) showImage("cutout-img", video.url, video.file_name);
    else showVideo("cutout-video", video.url, video.file_name);
    showDownload("cutout-download", video, "cut-out video");
    if (mask) {
      if (isStill(mask)) showImage("mask-img", mask.url, mask.file_name);
      else showVideo("mask-video", mask.url, mask.file_name);
      showDownload("mask-download", mask, "mask video");
    }
    $("result-heading").focus();
    return;
  }
  const maskOnly = lastInput.mask_only === true;
  $("cutout-caption").textContent = maskOnly ? "Output (mask only)" : "Cut-out";
  showImage("cutout-img", body.image.url);
  showDownload("cutout-download", body.image, maskOnly ? "mask" : "cut-out");
  if (body.mask_image) {
    showImage("mask-img", body.mask_image.url);
    showDownload("mask-download", body.mask_image, "mask");
  }
  $("result-heading").focus();
}

function showImage(id, url, name) {
  const img = $(id);
  img.onerror = () => {
    img.hidden = true;
    addLog(`this browser cannot display ${name || url.slice(0, 80)} as an image`, "WARN", "status");
  };
  img.src = url;
  img.hidden = false;
}

function showDownload(id, file, what) {
  const link = $(id);
  link.href = file.url;
  link.download = file.file_name || "";
  link.textContent = `Download ${what} (${file.file_name}, ${formatBytes(file.file_size)}, ${file.width}×${file.height})`;
  link.hidden = false;
}

async function cancel() {
  if (!current || !current.id) return;
  const id = current.id;
  $("cancel").disabled = true;
  try {
    const body = await apiJson(`${REQUESTS}${id}/cancel`, { method: "PUT" });
    addLog(`cancel: ${body.status}`, "INFO", "status");
  } catch (err) {
    addLog(`cancel: ${err.message}`, "WARN", "status");
  }
}

// --- snippets: the same request with fal's clients or curl (the key stays in $FAL_KEY) ---
function pythonLiteral(value, indent = "") {
  if (value === true) return "True";
  if (value === false) return "False";
  if (value === null) return "None";
  if (typeof value === "object") {
    const inner = indent + "    ";
    const items = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pythonLiteral(v, inner)},`);
    return `{\n${items.join("\n")}\n${indent}}`;
  }
  return JSON.stringify(value);
}

function jsLiteral(value, indent = "") {
  if (typeof value === "object" && value !== null) {
    const inner = indent + "  ";
    const items = Object.entries(value).map(([k, v]) => {
      const key = /^[A-Za-z_$][\w$]*$/.test(k) ? k : JSON.stringify(k);
      return `${inner}${key}: ${jsLiteral(v, inner)},`;
    });
    return `{\n${items.join("\n")}\n${indent}}`;
  }
  return JSON.stringify(value);
}

// The output's main file: `video` for the video endpoint, `image` for the others.
function outputField(appId) {
  return appId.endsWith("/video") ? "video" : "image";
}

function snippet(lang, appId, input) {
  const origin = window.location.origin;
  const host = window.location.host;
  const https = window.location.protocol === "https:";
  if (lang === "curl") {
    const body = JSON.stringify(input).replace(/'/g, "'\\''");
    return [
      "# Submit; the answer carries request_id, status_url and response_url.",
      `curl -s -X POST "${origin}/queue/${appId}" \\`,
      '  -H "Authorization: Key $FAL_KEY" -H "Content-Type: application/json" \\',
      `  -d '${body}'`,
      "# Then, with that request_id:",
      `curl -s -H "Authorization: Key $FAL_KEY" "${origin}${REQUESTS}$REQUEST_ID/status?logs=1"`,
      `curl -s -H "Authorization: Key $FAL_KEY" "${origin}${REQUESTS}$REQUEST_ID"`,
      ...(https ? ["# A self-signed gateway (make up): add --cacert <the CA file make up prints>."] : []),
    ].join("\n");
  }
  if (lang === "python") {
    const setup = https
      ? [
          "# pip install fal-client; then, in the shell:",
          `#   export FAL_KEY=<your key> FAL_RUN_HOST=${host}/run FAL_QUEUE_RUN_HOST=${host}/queue`,
          "#   (and SSL_CERT_FILE=<CA file> if the gateway's certificate is self-signed)",
          "import fal_client",
        ]
      : [
          "# pip install fal-client; export FAL_KEY=<your key>",
          "import fal_client",
          "import fal_client.client",
          "",
          "# This gateway speaks plain http: point the client's (https-only) URL formats at it.",
          `fal_client.client.RUN_URL_FORMAT = "${origin}/run/"`,
          `fal_client.client.QUEUE_URL_FORMAT = "${origin}/queue/"`,
        ];
    return [
      ...setup,
      "",
      "result = fal_client.subscribe(",
      `    ${JSON.stringify(appId)},`,
      `    arguments=${pythonLiteral(input, "    ")},`,
      "    with_logs=True,",
      "    on_queue_update=print,",
      ")",
      `print(result[${JSON.stringify(outputField(appId))}]["url"])`,
    ].join("\n");
  }
  return [
    '// npm install @fal-ai/client; FAL_KEY in the environment.',
    ...(https ? ["// Self-signed gateway: NODE_EXTRA_CA_CERTS=<CA file> node this.mjs"] : []),
    'import { fal } from "@fal-ai/client";',
    "",
    `const GATEWAY = ${JSON.stringify(origin)};`,
    "fal.config({",
    "  credentials: process.env.FAL_KEY,",
    "  // fal's hosts are fixed in the client: rewrite them to this gateway.",
    "  requestMiddleware: async (request) => ({",
    "    ...request,",
    "    url: request.url",
    '      .replace("https://queue.fal.run/", `${GATEWAY}/queue/`)',
    '      .replace("https://fal.run/", `${GATEWAY}/run/`)',
    '      .replace("https://rest.fal.ai/", `${GATEWAY}/rest/`),',
    "  }),",
    "});",
    "",
    `const result = await fal.subscribe(${JSON.stringify(appId)}, {`,
    `  input: ${jsLiteral(input, "  ")},`,
    "  logs: true,",
    "  onQueueUpdate: (update) => console.log(update.status, update.logs ?? []),",
    "});",
    `console.log(result.data.${outputField(appId)}.url);`,
  ].join("\n");
}

function renderSnippet() {
  const lang = document.querySelector('input[name="lang"]:checked').value;
  const input = buildInput(lastImageUrl || $("image-url").value.trim() || $("image-url").placeholder);
  $("snippet").textContent = snippet(lang, endpointSpec().app_id, input);
}

async function copySnippet() {
  const text = $("snippet").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copy-status").textContent = "Copied to the clipboard.";
  } catch {
    const range = document.createRange();
    range.selectNodeContents($("snippet"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    $("copy-status").textContent = "Could not copy: the snippet is selected, press Ctrl+C.";
  }
}

// --- the image picker and drop zone ---
function chooseFile(file) {
  chosenFile = file || null;
  lastImageUrl = null; // the next run uploads this file
  $("file-chosen").textContent = chosenFile ? `Chosen: ${chosenFile.name} (${formatBytes(chosenFile.size)})` : "";
}

function setupDropZone() {
  const zone = $("drop-zone");
  $("image-file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    const file = e.dataTransfer.files[0];
    if (file) chooseFile(file);
  });
}

async function init() {
  setupKeyField($("api-key"));
  setupDropZone();
  try {
    const response = await fetch("/playground/options.json");
    options = await response.json();
  } catch (err) {
    showError(`Could not load the endpoints' options: ${err.message}`);
    return;
  }
  if (options.auth === "off") {
    $("auth-note").textContent = "This gateway runs with auth off: any key works.";
    if (!$("api-key").value) $("api-key").value = "dev";
  }
  syncForm();
  defaultsIntoForm();
  $("endpoint").addEventListener("change", () => {
    syncForm();
    renderSnippet();
  });
  $("model").addEventListener("change", () => {
    syncResolutions();
    renderSnippet();
  });
  $("run-form").addEventListener("change", () => {
    if (!current) renderSnippet();
  });
  for (const radio of document.querySelectorAll('input[name="lang"]')) radio.addEventListener("change", renderSnippet);
  $("run-form").addEventListener("submit", run);
  $("cancel").addEventListener("click", cancel);
  $("copy-snippet").addEventListener("click", copySnippet);
  renderSnippet();
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", init);
