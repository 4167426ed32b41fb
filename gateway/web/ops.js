// The ops page: GET /admin/ops/status (admin key) rendered as tables, refreshed every few seconds.
"use strict";

const REFRESH_MS = 5000;
let timer = null;
let loading = false;

function short(text, width = 60) {
  if (!text) return "–";
  return text.length <= width ? text : `${text.slice(0, width - 1)}…`;
}

function fillTable(id, rows, empty, columns) {
  const body = document.querySelector(`#${id} tbody`);
  const out = rows.map((row) => {
    const tr = document.createElement("tr");
    columns.forEach((make, i) => {
      const td = make(row);
      const el = td instanceof HTMLElement ? td : cell(i === 0 ? "th" : "td", td, i === 0 ? { scope: "row" } : {});
      tr.append(el);
    });
    return tr;
  });
  if (!out.length) {
    const tr = document.createElement("tr");
    tr.append(cell("td", empty, { colspan: String(columns.length), class: "empty" }));
    out.push(tr);
  }
  body.replaceChildren(...out);
}

function flagged(text, bad) {
  const td = cell("td", text);
  if (bad) td.className = "bad";
  return td;
}

function render(data) {
  const untrained = $("untrained");
  untrained.hidden = !data.untrained_variants.length;
  untrained.textContent = data.untrained_variants.length
    ? `Variants on UNTRAINED recipe weights: ${data.untrained_variants.join(", ")}. Their masks are meaningless: ` +
      "put trained checkpoints in place before real work."
    : "";
  $("queues-caption").textContent =
    `Queues at ${clockTime(data.at)}; throughput and latency over the last ${formatSeconds(data.window_seconds)}`;
  const variants = Object.entries(data.variants).map(([name, v]) => ({ name, ...v }));
  fillTable("queues", variants, "No queued jobs, workers or recent completions (tick “List every configured variant”).", [
    (v) => v.name,
    (v) => (v.fal_models || []).join("; ") || "–",
    (v) => flagged(v.paused ? "paused" : "active", v.paused),
    (v) => (v.waiting_jobs !== v.queued_messages ? `${v.queued_messages} (${v.waiting_jobs} jobs)` : v.queued_messages),
    (v) => formatSeconds(v.oldest_waiting_seconds),
    (v) => `${v.in_progress}${v.reserved ? ` +${v.reserved} held` : ""}`,
    (v) => {
      const starving = !v.workers.length && (v.waiting_jobs || v.queued_messages);
      const text = v.workers.length
        ? `${v.workers.length}${v.untrained_workers.length ? " (untrained)" : ""}: ${v.workers.join(", ")}`
        : starving ? "none: jobs wait" : "0";
      return flagged(text, starving || v.untrained_workers.length);
    },
    (v) => flagged(`${v.done} / ${v.failed}`, v.failed > 0),
    (v) => (v.jobs_per_minute ?? 0).toFixed(1),
    (v) => formatSeconds(v.latency_p50),
    (v) => formatSeconds(v.latency_p95),
    (v) => formatSeconds(v.run_p50),
  ]);
  fillTable("workers", data.workers, "No worker heartbeat in the last 30 seconds.", [
    (w) => w.name,
    (w) => w.variants.join(", "),
    (w) => w.device || "–",
    (w) => flagged(w.untrained.length ? `UNTRAINED: ${w.untrained.join(", ")}` : "trained", w.untrained.length),
    (w) => `${Math.round(w.seen_seconds_ago)} s ago`,
    (w) => formatSeconds(w.up_seconds),
  ]);
  const hooks = data.webhooks;
  $("webhooks-summary").textContent = `${hooks.failed} failed after every retry, ${hooks.retrying} retrying.`;
  fillTable("webhooks", hooks.recent_failures, "No failed webhooks.", [
    (f) => f.request_id,
    (f) => clockTime(f.failed_at),
    (f) => f.attempts,
    (f) => short(f.last_error, 50),
    (f) => short(f.webhook_url, 50),
  ]);
  const dead = data.deadletters;
  $("dead-summary").textContent = `${dead.count} dead letter${dead.count === 1 ? "" : "s"}.`;
  fillTable("deadletters", dead.entries, "No dead letters.", [
    (e) => e.request_id,
    (e) => e.variant || "–",
    (e) => clockTime(e.dead_at),
    (e) => e.attempts,
    (e) => short(e.last_error || e.error, 60),
    (e) => short(e.image_url, 50),
  ]);
}

async function refresh() {
  if (loading) return;
  loading = true;
  const params = new URLSearchParams();
  const minutes = Number($("window").value);
  if (minutes > 0) params.set("minutes", String(minutes));
  if ($("all-variants").checked) params.set("all", "true");
  try {
    const data = await apiJson(`/admin/ops/status?${params}`);
    render(data);
    $("error").hidden = true;
    const workers = data.workers.length;
    $("ops-status").textContent =
      `Updated ${clockTime(data.at)}: ${Object.keys(data.variants).length} variant(s) listed, ` +
      `${workers} worker${workers === 1 ? "" : "s"} online.`;
    document.body.dataset.loaded = String(data.at);
  } catch (err) {
    $("error").textContent =
      err.status === 401 || err.status === 403 ? `${err.message}. The ops page needs an admin key.` : err.message;
    $("error").hidden = false;
    $("ops-status").textContent = "Not updated: see the error.";
  } finally {
    loading = false;
  }
}

function schedule() {
  clearInterval(timer);
  timer = $("auto-refresh").checked ? setInterval(refresh, REFRESH_MS) : null;
}

function init() {
  setupKeyField($("api-key"));
  $("ops-form").addEventListener("submit", (e) => {
    e.preventDefault();
    refresh();
  });
  $("auto-refresh").addEventListener("change", schedule);
  $("all-variants").addEventListener("change", refresh);
  schedule();
  refresh(); // with auth off no key is needed; otherwise the error asks for one
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", init);
