// The console: one page shell, each path drawn by a view from the JSON API. Live pages poll.
import { api, ApiError, forgetKey, NotFound, pathOf, SignedOut, storedKey, storeKey } from "./api.js";
import { fmt, lineChart } from "./charts.js";

const POLL_MS = 3000;
const app = document.getElementById("app");
let me = null; // GET /v1/openloops/whoami of the signed-in key
let timer = null; // the current page's poll
let generation = 0; // bumped on every navigation: a late answer for an old page is dropped

// ---- DOM helpers (text only: nothing from the API is ever parsed as HTML) -------------------
function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}
const link = (href, text) => h("a", { href, "data-nav": true }, text);
const status = (name, reason) => h("span", { class: `status ${name}`, title: reason || "" }, name);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
const table = (heads, rows, attrs = {}) =>
  h("table", attrs, h("thead", {}, h("tr", {}, heads.map((x) => h("th", {}, x)))), h("tbody", {}, rows));
const replace = (...nodes) => app.replaceChildren(...nodes);

// ---- routing ----------------------------------------------------------------------------------
const ROUTES = [
  [/^\/console\/?$/, () => navigate("/console/runs", true)],
  [/^\/console\/sign-in$/, signIn],
  [/^\/console\/runs$/, runsPage],
  [/^\/console\/runs\/([^/]+)$/, runPage],
  [/^\/console\/samplers$/, samplersPage],
  [/^\/console\/served-models$/, servedModelsPage],
  [/^\/console\/served-models\/([^/]+)$/, servedModelPage],
  [/^\/console\/deployments$/, deploymentsPage],
  [/^\/console\/keys$/, keysPage],
];

function navigate(path, replaceState = false) {
  if (replaceState) history.replaceState({}, "", path);
  else history.pushState({}, "", path);
  route();
}

async function route() {
  clearInterval(timer);
  timer = null;
  const gen = ++generation;
  const path = location.pathname;
  if (path !== "/console/sign-in" && !storedKey()) return navigate(`/console/sign-in?next=${encodeURIComponent(path)}`, true);
  for (const [re, view] of ROUTES) {
    const m = path.match(re);
    if (!m) continue;
    try {
      if (path !== "/console/sign-in" && !me) me = await api("/v1/openloops/whoami");
      chrome(path);
      await view(gen, ...m.slice(1).map(decodeURIComponent));
    } catch (err) {
      failed(err);
    }
    return;
  }
  chrome(path);
  notFound(`There is no console page at ${path}.`);
}

function chrome(path) {
  const signedIn = Boolean(me && storedKey());
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("who").hidden = !signedIn;
  document.getElementById("nav-keys").hidden = !(signedIn && me.scopes.includes("manage_org_api_keys"));
  if (signedIn) document.getElementById("who-name").textContent = `${me.principal_name} · ${me.org_name}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("current", path.startsWith(`/console/${a.dataset.section}`));
}

function failed(err) {
  if (err instanceof SignedOut) {
    me = null;
    const next = location.pathname;
    history.replaceState({}, "", `/console/sign-in?next=${encodeURIComponent(next)}&why=${encodeURIComponent(err.message)}`);
    route();
    return;
  }
  if (err instanceof NotFound) return notFound(err.message);
  replace(h("h1", {}, "Something went wrong"), h("p", { class: "error", role: "alert" }, err.message || String(err)));
}

function notFound(detail) {
  document.title = "Not found · openloops";
  replace(h("h1", { dataset: { page: "not-found" } }, "404: not found"), h("p", { class: "muted" }, detail), link("/console/runs", "Back to runs"));
}

// a page that refreshes itself until the user leaves it
function live(gen, draw) {
  timer = setInterval(async () => {
    if (gen !== generation) return;
    try {
      await draw();
    } catch (err) {
      if (gen === generation) failed(err);
    }
  }, POLL_MS);
}

// ---- sign in ----------------------------------------------------------------------------------
async function signIn() {
  document.title = "Sign in · openloops";
  const params = new URLSearchParams(location.search);
  const error = h("p", { class: "error", role: "alert" }, params.get("why") && params.get("why") !== "not signed in" ? `Signed out: ${params.get("why")}` : "");
  const input = h("input", { type: "password", name: "api_key", autocomplete: "off", required: true, id: "api-key" });
  const form = h(
    "form",
    {
      onsubmit: async (ev) => {
        ev.preventDefault();
        const key = input.value.trim();
        try {
          me = await api("/v1/openloops/whoami", { key });
        } catch (err) {
          error.textContent = err instanceof SignedOut ? "That API key was not accepted." : err.message;
          return;
        }
        storeKey(key);
        const next = params.get("next");
        navigate(next && next.startsWith("/console/") && next !== "/console/sign-in" ? next : "/console/runs", true);
      },
    },
    h("label", { for: "api-key" }, "API key", input),
    h("button", { type: "submit" }, "Sign in"),
  );
  replace(
    h("div", { class: "signin card" }, h("h1", {}, "Sign in to openloops"),
      h("p", { class: "muted" }, "Your API key stays in this browser tab and is sent only to this server."), form, error),
  );
  input.focus();
}

// ---- runs ---------------------------------------------------------------------------------------
async function runsPage(gen) {
  document.title = "Runs · openloops";
  const params = new URLSearchParams(location.search);
  const statusSel = h("select", { name: "status" },
    ["", "ACTIVE", "DEPLOYING", "WAKING_UP", "SCALED_TO_ZERO", "INACTIVE", "FAILED"].map((s) => h("option", { value: s, selected: params.get("status") === s }, s || "any")));
  const modelIn = h("input", { name: "base_model", value: params.get("base_model") || "", placeholder: "any base model" });
  const body = h("div", {});
  const apply = (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    if (statusSel.value) q.set("status", statusSel.value);
    if (modelIn.value.trim()) q.set("base_model", modelIn.value.trim());
    navigate(`/console/runs${q.toString() ? "?" + q : ""}`);
  };
  replace(
    h("h1", { dataset: { page: "runs" } }, "Runs"),
    h("form", { class: "filters", onsubmit: apply }, h("label", {}, "Status", statusSel), h("label", {}, "Base model", modelIn), h("button", { type: "submit" }, "Filter")),
    body,
  );
  const draw = async () => {
    const q = new URLSearchParams({ limit: "100" });
    for (const k of ["status", "base_model", "cursor"]) if (params.get(k)) q.set(k, params.get(k));
    const data = await api(`/v1/openloops/runs?${q}`);
    if (gen !== generation) return;
    const rows = data.runs.map((r) =>
      h("tr", { dataset: { runId: r.id } },
        h("td", {}, link(`/console/runs/${encodeURIComponent(r.id)}`, r.name || r.id), h("div", { class: "muted" }, h("code", {}, r.id))),
        h("td", {}, status(r.status, r.status_reason)),
        h("td", {}, r.base_model),
        h("td", {}, r.created_by),
        h("td", {}, r.origin),
        h("td", {}, when(r.last_request_at || r.created_at))));
    body.replaceChildren(
      rows.length ? table(["Run", "Status", "Base model", "Creator", "API", "Last activity"], rows, { id: "runs" }) : h("p", { class: "muted" }, "No runs yet."),
      data.next_cursor ? h("p", {}, link(`/console/runs?${new URLSearchParams({ ...Object.fromEntries(params), cursor: data.next_cursor })}`, "Older runs →")) : "",
    );
  };
  await draw();
  live(gen, draw);
}

async function runPage(gen, runId) {
  const { run } = await api(`/v1/loops/runs/${encodeURIComponent(runId)}`);
  document.title = `${run.name || run.id} · openloops`;
  const smoothing = h("input", { type: "range", min: "0", max: "0.99", step: "0.01", value: sessionStorage.getItem("openloops.smoothing") || "0.6", id: "smoothing" });
  const head = h("div", { class: "card" });
  const charts = h("div", { class: "grid", id: "charts" });
  const historyBox = h("div", {});
  const checkpoints = h("div", {});
  const sampling = h("div", { id: "sampling" });
  replace(
    h("h1", { dataset: { page: "run" } }, run.name || run.id),
    head,
    h("h2", {}, "Training metrics"),
    h("div", { class: "filters" }, h("label", { for: "smoothing" }, "Smoothing", smoothing)),
    charts,
    h("h2", {}, "Sampling (last hour)"),
    sampling,
    h("h2", {}, "Checkpoints"),
    checkpoints,
    h("h2", {}, "Status history"),
    historyBox,
  );
  let metrics = null;
  let lastSampled = null;
  const drawCharts = () => {
    const weight = Number(smoothing.value);
    sessionStorage.setItem("openloops.smoothing", smoothing.value);
    if (!metrics || !metrics.steps.length) {
      charts.replaceChildren(h("p", { class: "muted" }, "No training steps recorded yet."));
      return;
    }
    const all = new Set(metrics.steps.flatMap((s) => Object.keys(s.metrics)));
    const names = [...all]
      .filter((k) => metrics.steps.some((s) => typeof s.metrics[k] === "number"))
      // the worker reports grad_norm:mean and learning_rate:mean, the telemetry grad_norm and
      // learning_rate too: one chart each
      .filter((k) => !(k.endsWith(":mean") && all.has(k.slice(0, -":mean".length))))
      .sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
    charts.replaceChildren(
      ...names.map((name) =>
        lineChart([{ name, points: metrics.steps.filter((s) => typeof s.metrics[name] === "number").map((s) => [s.step, s.metrics[name]]) }], {
          id: name, title: name, smoothing: name.startsWith("loss") ? weight : 0, xLabel: "step",
        })),
    );
  };
  smoothing.addEventListener("input", drawCharts);
  const draw = async () => {
    const [{ run: now }, m, sampled, hist, ckpts] = await Promise.all([
      api(`/v1/loops/runs/${encodeURIComponent(runId)}`),
      api(`/v1/loops/runs/${encodeURIComponent(runId)}/training_metrics?max_points=500`),
      api(`/v1/loops/runs/${encodeURIComponent(runId)}/sampling_metrics`),
      api(`/v1/openloops/runs/${encodeURIComponent(runId)}/status_history`),
      api(`/v1/loops/checkpoints?run_id=${encodeURIComponent(runId)}&scope=org`),
    ]);
    if (gen !== generation) return;
    head.replaceChildren(
      h("dl", { class: "kv" },
        h("dt", {}, "Run"), h("dd", {}, h("code", {}, now.id)),
        h("dt", {}, "Status"), h("dd", {}, status(now.status.name, now.status.reason), " ", h("span", { class: "muted" }, now.status.reason || "")),
        h("dt", {}, "Base model"), h("dd", {}, now.base_model),
        h("dt", {}, "Creator"), h("dd", {}, now.user.email || now.user.service_account || now.user.id),
        h("dt", {}, "Created"), h("dd", {}, when(now.created_at)),
        h("dt", {}, "LoRA rank"), h("dd", {}, now.lora_rank),
        h("dt", {}, "Replicas"), h("dd", {}, now.replicas),
        h("dt", {}, "Sampler"), h("dd", {}, now.sampler ? [status(now.sampler.status.name, now.sampler.status.reason), " ", h("code", {}, now.sampler.id)] : "none"),
        h("dt", {}, "Deployment"), h("dd", {}, now.deployment_id ? h("code", {}, now.deployment_id) : "–")),
    );
    const changed = !metrics || JSON.stringify(metrics.steps) !== JSON.stringify(m.steps);
    metrics = m;
    if (changed) drawCharts();
    historyBox.replaceChildren(
      table(["When", "What", "From", "To", "Why"], hist.changes.map((c) =>
        h("tr", {}, h("td", {}, when(c.at)), h("td", {}, c.resource_type), h("td", {}, c.from_status || "–"), h("td", {}, status(c.to_status)), h("td", {}, c.reason || ""))), { id: "history" }),
    );
    drawCheckpoints(checkpoints, ckpts.checkpoints);
    const sampledNow = JSON.stringify(sampled);
    if (sampledNow !== lastSampled) drawSampling(sampling, sampled);
    lastSampled = sampledNow;
  };
  await draw();
  live(gen, draw);
}

// loss first, then throughput, then the rest
const rank = (name) => (name.startsWith("loss") ? 0 : /tokens|per_s|time|duration/.test(name) ? 1 : 2);

function drawCheckpoints(box, list) {
  if (box.dataset.ids === list.map((c) => c.id).join(",")) return; // keep opened file lists
  box.dataset.ids = list.map((c) => c.id).join(",");
  if (!list.length) return box.replaceChildren(h("p", { class: "muted" }, "No checkpoints yet."));
  box.replaceChildren(
    table(["Checkpoint", "Kind", "Created", "Size", "Files"], list.map((c) => {
      const files = h("td", {});
      files.append(h("button", {
        type: "button", class: "secondary",
        onclick: async () => {
          try {
            const page = await api(`/v1/loops/checkpoints/${encodeURIComponent(c.id)}/files`);
            files.replaceChildren(...page.presigned_urls.map((f) => h("div", {}, h("a", { href: f.url, download: f.relative_file_name, rel: "noopener" }, f.relative_file_name), h("span", { class: "muted" }, ` ${fmt(f.size_bytes / 1024)} KiB`))));
          } catch (err) {
            files.replaceChildren(h("span", { class: "error" }, err.message));
          }
        },
      }, "Download links"));
      return h("tr", {}, h("td", {}, h("code", {}, c.checkpoint_id)), h("td", {}, c.checkpoint_type), h("td", {}, when(c.created_at)), h("td", {}, `${fmt(c.size_bytes / 1024)} KiB`), files);
    }), { id: "checkpoints" }),
  );
}

// ---- samplers, deployments ------------------------------------------------------------------------
async function samplersPage(gen) {
  document.title = "Samplers · openloops";
  const body = h("div", {});
  replace(h("h1", { dataset: { page: "samplers" } }, "Samplers"), body);
  const draw = async () => {
    const { samplers } = await api("/v1/loops/samplers?scope=org");
    if (gen !== generation) return;
    body.replaceChildren(samplers.length
      ? table(["Sampler", "Status", "Base model", "Run", "Creator", "Created"], samplers.map((s) =>
        h("tr", {}, h("td", {}, h("code", {}, s.id)), h("td", {}, status(s.status.name, s.status.reason)), h("td", {}, s.base_model),
          h("td", {}, s.run_id ? link(`/console/runs/${encodeURIComponent(s.run_id)}`, s.run_id) : "–"),
          h("td", {}, s.user.email || s.user.service_account || s.user.id), h("td", {}, when(s.created_at)))), { id: "samplers" })
      : h("p", { class: "muted" }, "No samplers."));
  };
  await draw();
  live(gen, draw);
}

async function deploymentsPage(gen) {
  document.title = "Deployments · openloops";
  const body = h("div", {});
  replace(h("h1", { dataset: { page: "deployments" } }, "Loops deployments"), body);
  const draw = async () => {
    const { deployments } = await api("/v1/loops/deployments");
    if (gen !== generation) return;
    body.replaceChildren(deployments.length
      ? table(["Deployment", "Status", "Base model", "Active run", "Capacity", "Created"], deployments.map((d) =>
        h("tr", {}, h("td", {}, h("code", {}, d.id)), h("td", {}, status(d.status.detail || d.status.name, d.status.reason)), h("td", {}, d.base_model),
          h("td", {}, d.active_run_id ? link(`/console/runs/${encodeURIComponent(d.active_run_id)}`, d.active_run_id) : "–"),
          h("td", {}, d.availability_model), h("td", {}, when(d.created_at)))), { id: "deployments" })
      : h("p", { class: "muted" }, "No deployments."));
  };
  await draw();
  live(gen, draw);
}

// ---- served models ----------------------------------------------------------------------------------
async function servedModelsPage(gen) {
  document.title = "Served models · openloops";
  const body = h("div", {});
  replace(h("h1", { dataset: { page: "served-models" } }, "Served models"), body);
  const draw = async () => {
    const { served_models: list } = await api("/v1/loops/served_models");
    if (gen !== generation) return;
    body.replaceChildren(list.length
      ? table(["Served model", "Status", "Base model", "Checkpoints", "Verification", "Last request"], list.map((s) =>
        h("tr", {}, h("td", {}, link(`/console/served-models/${encodeURIComponent(s.id)}`, s.name || s.id)), h("td", {}, status(s.status.name, s.status.reason)),
          h("td", {}, s.base_model), h("td", {}, s.checkpoints.map((c) => c.model).join(", ")), h("td", {}, s.verification), h("td", {}, when(s.last_request_at)))), { id: "served-models" })
      : h("p", { class: "muted" }, "No served models."));
  };
  await draw();
  live(gen, draw);
}

async function servedModelPage(gen, id) {
  const { served_model: sm } = await api(`/v1/loops/served_models/${encodeURIComponent(id)}`);
  document.title = `${sm.name || sm.id} · openloops`;
  const head = h("div", { class: "card" });
  const charts = h("div", { class: "grid", id: "charts" });
  replace(h("h1", { dataset: { page: "served-model" } }, sm.name || sm.id), head, h("h2", {}, "Requests (last hour)"), charts, h("h2", {}, "Playground"), playground(sm));
  const draw = async () => {
    const [{ served_model: now }, m] = await Promise.all([
      api(`/v1/loops/served_models/${encodeURIComponent(id)}`),
      api(`/v1/loops/served_models/${encodeURIComponent(id)}/metrics`, { method: "POST", body: {} }),
    ]);
    if (gen !== generation) return;
    head.replaceChildren(h("dl", { class: "kv" },
      h("dt", {}, "Status"), h("dd", {}, status(now.status.name, now.status.reason)),
      h("dt", {}, "Base model"), h("dd", {}, now.base_model),
      h("dt", {}, "OpenAI base URL"), h("dd", {}, h("code", {}, now.base_url)),
      h("dt", {}, "Checkpoints"), h("dd", {}, now.checkpoints.map((c) => `${c.model} (${c.verification || "unverified"})`).join(", ")),
      h("dt", {}, "Last request"), h("dd", {}, when(now.last_request_at))));
    charts.replaceChildren(...requestCharts(m.metrics));
  };
  await draw();
  live(gen, draw);
}

// request volume and latency percentiles of a metrics window (per-minute steps)
const stamp = (p) => Date.parse(p.timestamp) / 1000;
function requestCharts(metrics, prefix = "") {
  const lat = metrics.response_time_stats || [];
  return [
    lineChart([{ name: "requests", points: (metrics.inference_volume || []).map((p) => [stamp(p), p.value]) }], { id: `${prefix}inference_volume`, title: "Requests per minute", xTime: true }),
    lineChart(["p50", "p95", "p99"].map((q) => ({ name: `${q} ms`, points: lat.filter((p) => p[q] !== null).map((p) => [stamp(p), p[q]]) })), { id: `${prefix}latency`, title: "Latency percentiles (ms)", xTime: true }),
  ];
}

function drawSampling(box, m) {
  const t = m.totals;
  if (!t.requests) {
    box.replaceChildren(h("p", { class: "muted" }, "No sampling in the last hour."));
    return;
  }
  const series = (name) => (m.metrics[name] || []).map((p) => [stamp(p), p.value]);
  box.replaceChildren(
    h("p", { id: "sampling-totals" }, `${t.requests} requests (${t.errors} failed), ${t.samples} samples, ${t.prompt_tokens} prompt tokens, ${t.completion_tokens} generated tokens`),
    h("div", { class: "grid" },
      ...requestCharts(m.metrics, "sampling_"),
      lineChart([{ name: "generated", points: series("completion_tokens") }, { name: "prompt", points: series("prompt_tokens") }], { id: "sampling_tokens", title: "Tokens per minute", xTime: true })),
  );
}

function playground(sm) {
  const base = pathOf(sm.base_url);
  const model = h("select", { name: "model", id: "pg-model" }, sm.checkpoints.map((c) => h("option", { value: c.model }, c.model)));
  const prompt = h("textarea", { rows: "3", name: "prompt", id: "pg-prompt", placeholder: "Say something to the model" });
  const maxTokens = h("input", { type: "number", min: "1", max: "4096", value: "64", id: "pg-max-tokens" });
  const log = h("div", { class: "log", id: "pg-log" });
  const messages = [];
  const send = async (ev) => {
    ev.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    messages.push({ role: "user", content: text });
    log.append(h("div", { class: "msg user" }, `you: ${text}`));
    prompt.value = "";
    try {
      const out = await api(`${base}/chat/completions`, { method: "POST", body: { model: model.value, messages, max_tokens: Number(maxTokens.value) } });
      const reply = out.choices?.[0]?.message?.content ?? "";
      messages.push({ role: "assistant", content: reply });
      log.append(h("div", { class: "msg assistant" }, `${model.value}: ${reply}`));
    } catch (err) {
      messages.pop();
      log.append(h("div", { class: "error" }, err.message));
    }
  };
  return h("form", { class: "chat card", onsubmit: send }, h("div", { class: "filters" }, h("label", {}, "Model", model), h("label", {}, "Max tokens", maxTokens)), log, prompt, h("button", { type: "submit" }, "Send"));
}

// ---- API keys (org admins) --------------------------------------------------------------------------
async function keysPage(gen) {
  document.title = "API keys · openloops";
  if (!me.scopes.includes("manage_org_api_keys")) {
    replace(h("h1", {}, "API keys"), h("p", { class: "error" }, "This key lacks the manage_org_api_keys scope."));
    return;
  }
  const body = h("div", {});
  const created = h("div", { id: "created-key" });
  const name = h("input", { name: "name", placeholder: "what it is for", id: "key-name", maxlength: "200" });
  const create = async (ev) => {
    ev.preventDefault();
    try {
      const out = await api("/v1/openloops/api_keys", { method: "POST", body: name.value.trim() ? { name: name.value.trim() } : {} });
      name.value = "";
      created.replaceChildren(h("div", { class: "card" }, h("p", {}, "Copy this key now: it is not shown again."), h("div", { class: "secret", id: "new-secret" }, out.api_key)));
      await draw();
    } catch (err) {
      created.replaceChildren(h("p", { class: "error" }, err.message));
    }
  };
  replace(h("h1", { dataset: { page: "keys" } }, "API keys"),
    h("form", { class: "filters", onsubmit: create }, h("label", { for: "key-name" }, "New key", name), h("button", { type: "submit" }, "Create key")),
    created, body);
  const draw = async () => {
    const { keys } = await api("/v1/openloops/api_keys");
    if (gen !== generation) return;
    body.replaceChildren(table(["Key", "Name", "Owner", "Scopes", "Created", "Last used", ""], keys.map((k) =>
      h("tr", { dataset: { keyId: k.id } }, h("td", {}, h("code", {}, `${k.prefix}…`)), h("td", {}, k.name || ""), h("td", {}, k.owner), h("td", {}, k.scopes.join(", ")),
        h("td", {}, when(k.created_at)), h("td", {}, when(k.last_used_at)),
        h("td", {}, h("button", {
          type: "button", class: "danger",
          onclick: async () => {
            if (!confirm(`Revoke key ${k.prefix}…? Clients using it stop working at once.`)) return;
            await api(`/v1/openloops/api_keys/${encodeURIComponent(k.id)}/revoke`, { method: "POST" }).catch(failed);
            if (k.id === me.key_id) return failed(new SignedOut("this key was revoked"));
            await draw();
          },
        }, "Revoke")))), { id: "keys" }));
  };
  await draw();
}

// ---- wiring -------------------------------------------------------------------------------------------
document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a[data-nav]");
  if (!a || ev.metaKey || ev.ctrlKey || ev.shiftKey || a.target) return;
  ev.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", route);
document.getElementById("sign-out").addEventListener("click", () => {
  forgetKey();
  me = null;
  navigate("/console/sign-in", true);
});
route();
