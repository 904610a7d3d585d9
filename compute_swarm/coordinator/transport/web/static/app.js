// compute-swarm's web page: the pages are rendered on the server; this makes them live.
// One file, no framework, no network beyond the coordinator. Each page's part runs by <body data-page>.
"use strict";

const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
const MICRO_PER_CREDIT = 1000000;

// ---- helpers shared by the pages

class ApiError extends Error {
  constructor(status, detail, fields) {
    super(detail);
    this.status = status;
    this.fields = fields || {};
  }
}

// The JSON API, with this browser's session cookie and its CSRF token.
async function api(path, { method = "GET", body, headers = {}, raw = false } = {}) {
  const options = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken, ...headers } };
  if (body !== undefined) {
    if (raw) options.body = body;
    else {
      options.body = JSON.stringify(body);
      options.headers["Content-Type"] = "application/json";
    }
  }
  const response = await fetch(path, options);
  if (response.status === 401) {
    location.href = (location.pathname.startsWith("/ops") ? "/ops/sign-in" : "/sign-in") + "?next=" + encodeURIComponent(location.pathname);
    throw new ApiError(401, "signed out");
  }
  const answer = (response.headers.get("content-type") || "").includes("json") ? await response.json() : null;
  if (!response.ok) {
    const detail = answer && (typeof answer.detail === "string" ? answer.detail : answer.error ? answer.error.message
      : Array.isArray(answer.detail) ? answer.detail.map((problem) => `${problem.loc.at(-1)}: ${problem.msg}`).join("; ") : JSON.stringify(answer.detail));
    throw new ApiError(response.status, detail || response.statusText, answer && answer.fields);
  }
  return answer;
}

// Micro-credits as credits, exactly: 2500000 → "2.5".
function credits(micro) {
  const sign = micro < 0 ? "-" : "";
  const whole = Math.floor(Math.abs(micro) / MICRO_PER_CREDIT);
  const fraction = String(Math.abs(micro) % MICRO_PER_CREDIT).padStart(6, "0").replace(/0+$/, "");
  return sign + whole.toLocaleString("en-US").replace(/,/g, "\u202f") + (fraction ? "." + fraction : "");
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function localTime(epochSeconds) {
  const moment = new Date(epochSeconds * 1000);
  const today = new Date().toDateString() === moment.toDateString();
  return today ? moment.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : moment.toLocaleString([], { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function timeElement(epochSeconds) {
  return element("time", { "data-epoch": epochSeconds, datetime: new Date(epochSeconds * 1000).toISOString() }, localTime(epochSeconds));
}

function ago(epochSeconds) {
  const seconds = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (seconds < 60) return Math.round(seconds) + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " d ago";
}

function stateBadge(state) {
  return element("span", { class: "state state-" + state }, state);
}

// Calls `step` now and every `seconds` while it returns true; pauses while the tab is hidden.
function every(seconds, step) {
  let timer = null;
  const run = async () => {
    timer = null;
    let again = true;
    try { again = (await step()) !== false; } catch (error) { if (error.status === 401) return; }
    if (again) timer = setTimeout(run, seconds * 1000);
  };
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer === null) run();
  });
  run();
}

function showFieldError(field, message) {
  const input = document.getElementById(field);
  let note = document.getElementById(field + "-error");
  if (!message) {
    if (input) input.removeAttribute("aria-invalid");
    if (note) note.remove();
    return;
  }
  if (!note && input) {
    note = element("p", { class: "field-error", id: field + "-error", role: "alert" });
    (input.closest(".field") || input.parentElement).append(note);
  }
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", field + "-error");
  }
  if (note) note.textContent = message;
}

function setUpCommon() {
  for (const node of document.querySelectorAll("time[data-epoch]")) node.textContent = localTime(Number(node.dataset.epoch));
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", async () => {
      const text = document.querySelector(button.dataset.copy).textContent;
      try { await navigator.clipboard.writeText(text); button.textContent = "Copied"; } catch {
        const range = document.createRange();
        range.selectNodeContents(document.querySelector(button.dataset.copy));
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        button.textContent = "Selected: copy it";
      }
    });
  }
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => { if (!confirm(form.dataset.confirm)) event.preventDefault(); });
  }
}

// ---- SHA-256, incremental (crypto.subtle exists only on https and localhost, and hashes whole buffers)

const SHA256_K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01,
  0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
  0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
  0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
  0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
  0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);

class Sha256 {
  constructor() {
    this.state = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
    this.buffer = new Uint8Array(64);
    this.buffered = 0;
    this.length = 0;
    this.words = new Uint32Array(64);
  }
  update(bytes) {
    this.length += bytes.length;
    let offset = 0;
    if (this.buffered) {
      const take = Math.min(64 - this.buffered, bytes.length);
      this.buffer.set(bytes.subarray(0, take), this.buffered);
      this.buffered += take;
      offset = take;
      if (this.buffered < 64) return;
      this.block(this.buffer, 0);
      this.buffered = 0;
    }
    for (; offset + 64 <= bytes.length; offset += 64) this.block(bytes, offset);
    this.buffer.set(bytes.subarray(offset), 0);
    this.buffered = bytes.length - offset;
  }
  block(bytes, offset) {
    const w = this.words, s = this.state;
    for (let i = 0; i < 16; i++) {
      const j = offset + i * 4;
      w[i] = (bytes[j] << 24) | (bytes[j + 1] << 16) | (bytes[j + 2] << 8) | bytes[j + 3];
    }
    for (let i = 16; i < 64; i++) {
      const a = w[i - 15], b = w[i - 2];
      const s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
      const s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) | 0;
    }
    let [a, b, c, d, e, f, g, h] = s;
    for (let i = 0; i < 64; i++) {
      const t1 = (h + (((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7))) + ((e & f) ^ (~e & g)) + SHA256_K[i] + w[i]) | 0;
      const t2 = ((((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10))) + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    s[0] += a; s[1] += b; s[2] += c; s[3] += d; s[4] += e; s[5] += f; s[6] += g; s[7] += h;
  }
  hex() {
    const bits = this.length * 8;
    const tail = new Uint8Array(((this.buffered + 9 + 63) >> 6) * 64 - this.buffered);
    tail[0] = 0x80;
    const view = new DataView(tail.buffer);
    view.setUint32(tail.length - 8, Math.floor(bits / 2 ** 32));
    view.setUint32(tail.length - 4, bits >>> 0);
    this.update(tail);
    return Array.from(this.state, (word) => word.toString(16).padStart(8, "0")).join("");
  }
}

// ---- Datasets: drop a file, check it line by line, upload it in resumable chunks

const READ_SLICE = 4 * 1024 * 1024;
// Checked here before uploading (the coordinator checks again): a bad line is named at once.
const CHECK_IN_BROWSER_BYTES = 64 * 1024 * 1024;

function lineProblem(text) {
  let row;
  try { row = JSON.parse(text); } catch { return "is not valid JSON"; }
  if (row === null || typeof row !== "object" || Array.isArray(row)) return "is not a JSON object";
  if (Array.isArray(row.messages)) {
    if (!row.messages.length) return "has an empty \"messages\" list";
    for (const message of row.messages) {
      if (!message || typeof message.content !== "string" || !["system", "user", "assistant"].includes(message.role))
        return "has a message without a role (system, user or assistant) and a text content";
    }
    if (!row.messages.some((message) => message.role === "assistant")) return "has no assistant message to learn from";
    return null;
  }
  if (typeof row.prompt === "string" && typeof row.completion === "string") return null;
  return "needs \"messages\" or \"prompt\" and \"completion\"";
}

async function checkLines(file) {
  const lines = (await file.text()).split("\n");
  const problems = [];
  let examples = 0;
  lines.forEach((line, index) => {
    if (!line.trim()) return;
    examples += 1;
    const problem = lineProblem(line);
    if (problem && problems.length < 20) problems.push(`line ${index + 1} ${problem}`);
  });
  if (!examples) problems.push("the file has no examples");
  return problems;
}

function setUpFiles() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("file-input");
  const status = document.getElementById("upload-status");
  const bar = document.getElementById("upload-progress");
  const label = document.getElementById("upload-name");
  const errors = document.getElementById("upload-errors");
  const maxBytes = Number(drop.dataset.maxBytes);
  let busy = false;

  const fail = (message) => {
    errors.hidden = false;
    errors.textContent = message;
    status.hidden = true;
  };

  async function upload(file) {
    if (busy) return;
    errors.hidden = true;
    if (file.size === 0) return fail(`${file.name} is empty.`);
    if (file.size > maxBytes) return fail(`${file.name} is larger than this coordinator takes.`);
    busy = true;
    status.hidden = false;
    try {
      if (file.size <= CHECK_IN_BROWSER_BYTES) {
        label.textContent = `Checking ${file.name}…`;
        const problems = await checkLines(file);
        if (problems.length) return fail(`${file.name} cannot be used:\n` + problems.join("\n"));
      }
      label.textContent = `Reading ${file.name}…`;
      const hash = new Sha256();
      for (let offset = 0; offset < file.size; offset += READ_SLICE) {
        hash.update(new Uint8Array(await file.slice(offset, offset + READ_SLICE).arrayBuffer()));
        bar.value = (50 * Math.min(file.size, offset + READ_SLICE)) / file.size;
      }
      let state = await api("/api/uploads", {
        method: "POST", body: { sha256: hash.hex(), size: file.size, filename: file.name, purpose: "dataset" },
      });
      label.textContent = `Uploading ${file.name}…`;
      while (!state.complete) {
        const chunk = file.slice(state.offset, state.offset + state.chunk_limit);
        try {
          state = await api(`/api/uploads/${state.upload_id}`, {
            method: "PATCH", raw: true, body: chunk,
            headers: { "Upload-Offset": String(state.offset), "Content-Type": "application/offset+octet-stream" },
          });
        } catch (error) {
          if (error.status !== 409) throw error;
          state = await api(`/api/uploads/${state.upload_id}`); // resume from where the coordinator is
        }
        bar.value = 50 + (50 * state.offset) / file.size;
      }
      bar.value = 100;
      label.textContent = `${file.name} is ready: ${state.file.lines} examples.`;
      addFileRow(state.file);
    } catch (error) {
      fail(`${file.name} was not stored: ${error.message}`);
    } finally {
      busy = false;
      input.value = "";
    }
  }

  drop.addEventListener("click", (event) => { if (event.target.tagName !== "LABEL") input.click(); });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); } });
  input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); });
  for (const name of ["dragenter", "dragover"]) drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) upload(event.dataTransfer.files[0]);
  });
}

function addFileRow(file) {
  const body = document.querySelector("#files tbody");
  body.querySelector("tr.empty")?.remove();
  for (const row of body.querySelectorAll("tr")) if (row.dataset.file === file.id) row.remove();
  const size = file.size < 1024 ? `${file.size} bytes` : file.size < 1048576 ? `${(file.size / 1024).toFixed(1)} KB` : `${(file.size / 1048576).toFixed(1)} MB`;
  body.prepend(element("tr", { "data-file": file.id },
    element("td", {}, file.filename, element("div", { class: "muted small" }, `${file.id} · ${file.purpose}`)),
    element("td", {}, String(file.lines)), element("td", {}, size), element("td", {}, timeElement(file.created_at)),
    element("td", {}, element("a", { href: `/jobs/new?dataset=${encodeURIComponent(file.id)}` }, "Fine-tune on it"),
      " · ", element("a", { href: `/sweeps?dataset=${encodeURIComponent(file.id)}#new-sweep` }, "Sweep on it"))));
}

// ---- Jobs: the list follows each job's state and progress

const OPEN_STATES = ["queued", "leased", "running", "verifying"];

function progressCell(job) {
  const cell = document.createDocumentFragment();
  const progress = job.progress;
  if (job.state === "completed" || job.state === "verified") {
    cell.append(element("progress", { max: 1, value: 1 }), " ", element("span", { class: "small" }, "done"));
  } else if (progress && progress.total_steps) {
    const loss = progress.loss === null || progress.loss === undefined ? "" : ` · loss ${progress.loss.toFixed(3)}`;
    cell.append(element("progress", { max: progress.total_steps, value: progress.step }), " ",
      element("span", { class: "small" }, `${progress.step}/${progress.total_steps}${loss}`));
  } else if (job.state === "verifying") {
    cell.append(element("span", { class: "muted small" }, "being verified by a trusted node"));
  } else if (job.state === "queued") {
    cell.append(element("span", { class: "muted small" }, "waiting for a node"));
  }
  return cell;
}

function jobRow(job) {
  const badge = stateBadge(job.state);
  badge.dataset.field = "state";
  return element("tr", { "data-job": job.id },
    element("td", {}, element("a", { href: `/jobs/${job.id}` }, job.id),
      element("div", { class: "muted small" }, `${job.spec.type} · ${job.spec.base_model}`)),
    element("td", {}, badge),
    element("td", { "data-field": "progress" }, progressCell(job)),
    element("td", {}, credits(job.price_micro)),
    element("td", {}, timeElement(job.created_at)));
}

function setUpJobs() {
  // Open jobs are followed; a job started elsewhere (the CLI, another tab) joins the top of the list.
  const body = document.querySelector("#jobs tbody");
  let newest = Math.max(0, ...[...body.querySelectorAll("time[data-epoch]")].map((node) => Number(node.dataset.epoch)));
  every(2, async () => {
    const jobs = await api("/api/jobs?limit=200");
    for (const job of [...jobs].reverse()) {
      const row = body.querySelector(`tr[data-job="${job.id}"]`);
      if (!row) {
        if (job.created_at < newest) continue;
        body.querySelector("tr.empty")?.remove();
        body.prepend(jobRow(job));
        newest = job.created_at;
        continue;
      }
      const badge = row.querySelector('[data-field="state"]');
      if (badge.textContent === job.state && !OPEN_STATES.includes(job.state)) continue;
      badge.textContent = job.state;
      badge.className = "state state-" + job.state;
      row.querySelector('[data-field="progress"]').replaceChildren(progressCell(job));
    }
    return true;
  });
}

// ---- New fine-tune: the price and the balance, as the form changes

const NUMBER_FIELDS = { max_steps: "int", rank: "int", alpha: "float", learning_rate: "float", batch_size: "int", gradient_accumulation_steps: "int", max_sequence_length: "int" };

function setUpNewJob() {
  const form = document.getElementById("launch");
  const price = document.getElementById("quote-price");
  const balance = document.getElementById("quote-balance");
  const note = document.getElementById("quote-note");
  const quote = document.getElementById("quote");
  const button = document.getElementById("launch-button");
  const usual = note.textContent;
  let timer = null, asked = 0;

  async function refresh() {
    const data = new FormData(form);
    const spec = { type: "lora", dataset: data.get("dataset") || "", base_model: data.get("base_model") };
    const local = {};
    for (const [name, kind] of Object.entries(NUMBER_FIELDS)) {
      const text = String(data.get(name) || "").trim();
      const value = kind === "int" ? Number.parseInt(text, 10) : Number.parseFloat(text);
      if (!text) local[name] = "required";
      else if (!Number.isFinite(value) || (kind === "int" && !/^\d+$/.test(text))) local[name] = kind === "int" ? "a whole number" : "a number, e.g. 0.0002";
      else spec[name] = value;
    }
    for (const name of Object.keys(NUMBER_FIELDS)) showFieldError(name, local[name]);
    if (!spec.dataset) { price.textContent = "–"; note.textContent = "Upload a dataset to see the price."; return; }
    if (Object.keys(local).length) { price.textContent = "–"; return; }
    const ticket = ++asked;
    try {
      const answer = await api("/api/jobs/quote", { method: "POST", body: { spec } });
      if (ticket !== asked) return;
      price.textContent = credits(answer.price_micro);
      balance.textContent = credits(answer.available_micro);
      quote.classList.toggle("short", !answer.affordable);
      note.textContent = answer.affordable ? usual : `Your balance does not cover this price: lower the steps or batch, or add credits.`;
      button.disabled = !answer.affordable;
      for (const name of ["dataset", "base_model", ...Object.keys(NUMBER_FIELDS)]) if (!local[name]) showFieldError(name, null);
    } catch (error) {
      if (ticket !== asked) return;
      price.textContent = "–";
      button.disabled = false; // the server says why on submit
      for (const [name, message] of Object.entries(error.fields)) showFieldError(name, message);
      if (!Object.keys(error.fields).length) note.textContent = error.message;
    }
  }
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(refresh, 250); });
  form.addEventListener("submit", () => { button.disabled = true; button.textContent = "Starting…"; });
  refresh();
}

// ---- charts: an SVG canvas and a loss axis, shared by a job's loss chart and a sweep's trial chart

function svgCanvas(width, height) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const add = (tag, attributes, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  return { svg, add };
}

// The span of a loss axis: the values, padded a little, never below 0.
function lossRange(values) {
  let low = Math.min(...values), high = Math.max(...values);
  if (high - low < 1e-6) { low -= 0.5; high += 0.5; }
  const pad = (high - low) * 0.08;
  return [Math.max(0, low - pad), high + pad];
}

// Five level lines across the plot, each with its value at the left.
function lossGrid(add, y, low, high, left, right, width) {
  for (let i = 0; i <= 4; i++) {
    const value = low + ((high - low) * i) / 4;
    add("line", { class: "grid-line", x1: left, x2: width - right, y1: y(value), y2: y(value) });
    add("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, value.toFixed(value < 10 ? 2 : 1));
  }
}

// ---- A job: live loss chart, progress, attempts and log

function lossChart(container, points) {
  const train = points.filter((point) => point.loss !== null);
  const held = points.filter((point) => point.eval_loss !== null);
  if (!train.length && !held.length) return;
  const width = 640, height = 260, left = 46, right = 12, top = 12, bottom = 30;
  const steps = points.map((point) => point.step);
  const values = [...train.map((point) => point.loss), ...held.map((point) => point.eval_loss)];
  const minStep = Math.min(...steps), maxStep = Math.max(...steps, minStep + 1);
  const [low, high] = lossRange(values);
  const x = (step) => left + ((step - minStep) / (maxStep - minStep)) * (width - left - right);
  const y = (value) => top + (1 - (value - low) / (high - low)) * (height - top - bottom);
  const { svg, add } = svgCanvas(width, height);
  lossGrid(add, y, low, high, left, right, width);
  add("line", { class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom });
  // Whole steps at a round spacing (1, 2, 5, 10, 20, 50, ...), about six of them.
  const rough = (maxStep - minStep) / 6;
  const magnitude = 10 ** Math.floor(Math.log10(Math.max(1, rough)));
  const spacing = Math.max(1, [1, 2, 5, 10].map((factor) => factor * magnitude).find((candidate) => candidate >= rough));
  for (let step = Math.ceil(minStep / spacing) * spacing; step <= maxStep; step += spacing) {
    add("text", { x: x(step), y: height - bottom + 16, "text-anchor": "middle" }, String(step));
  }
  add("text", { x: width - right, y: height - 2, "text-anchor": "end" }, "step");
  const path = (series, key) => series.map((point, i) => `${i ? "L" : "M"}${x(point.step).toFixed(1)},${y(point[key]).toFixed(1)}`).join("");
  if (train.length) add("path", { class: "train", d: path(train, "loss") });
  if (held.length > 1) add("path", { class: "eval", d: path(held, "eval_loss") });
  for (const point of held) add("circle", { class: "eval-dot", cx: x(point.step), cy: y(point.eval_loss), r: 3.5 });
  const last = train[train.length - 1];
  const legend = element("div", { class: "legend" },
    element("span", {}, element("span", { class: "swatch" }), `training loss${last ? " " + last.loss.toFixed(3) : ""}`),
    held.length ? element("span", {}, element("span", { class: "swatch eval" }), `held-out loss ${held[held.length - 1].eval_loss.toFixed(3)}`) : null);
  container.replaceChildren(svg, legend);
}

function setUpJob() {
  const root = document.getElementById("job");
  const id = root.dataset.job;
  const chart = document.getElementById("chart");
  const points = [];
  let lastPoint = 0, shownEvents = document.querySelectorAll("#log li").length, state = root.dataset.state;

  async function refresh() {
    const [job, fresh] = await Promise.all([api(`/api/jobs/${id}`), api(`/api/jobs/${id}/progress?after=${lastPoint}`)]);
    if (fresh.length) {
      points.push(...fresh);
      lastPoint = fresh[fresh.length - 1].id;
      // A retried job restarts from its checkpoint: the chart shows the latest attempt's view of each step.
      const byStep = new Map();
      for (const point of points) byStep.set(point.step, { ...byStep.get(point.step), ...point, loss: point.loss ?? byStep.get(point.step)?.loss ?? null, eval_loss: point.eval_loss ?? byStep.get(point.step)?.eval_loss ?? null });
      lossChart(chart, [...byStep.values()].sort((a, b) => a.step - b.step));
    }
    const progress = job.progress;
    const bar = document.getElementById("job-progress");
    if (progress && progress.total_steps) {
      bar.max = progress.total_steps;
      bar.value = progress.step;
      const eta = progress.eta_seconds ? ` · about ${Math.ceil(progress.eta_seconds / 60)} min left` : "";
      document.getElementById("job-progress-text").textContent = `step ${progress.step} of ${progress.total_steps}${eta}`;
    }
    document.getElementById("job-attempt").textContent = `${job.attempt} of ${job.max_attempts}`;
    const badge = document.getElementById("job-state");
    badge.textContent = job.state;
    badge.className = "state state-" + job.state;
    const events = await api(`/api/jobs/${id}/events`);
    const log = document.getElementById("log");
    for (const event of events.slice(shownEvents)) {
      log.append(element("li", {}, timeElement(event.at), " ", stateBadge(event.state), " " + event.message));
    }
    shownEvents = events.length;
    if (job.state !== state && !OPEN_STATES.includes(job.state)) {
      location.reload(); // finished: the page shows the cost, the downloads and the model
      return false;
    }
    state = job.state;
    return OPEN_STATES.includes(job.state);
  }
  // A finished job's chart is drawn once; an open one follows the node.
  every(2, refresh);
}

// ---- Sweeps: the launch form priced as it changes; a sweep's trials, live

// A trial still running or waiting, its price held (a verifying one is charged already).
const HELD_STATES = ["queued", "leased", "running"];

// A trial's setting to 4 significant digits, written out (0.00001, not 1e-5), as the page renders it.
function settingText(value) {
  if (value === null || value === undefined) return "";
  const rounded = Number(value.toPrecision(4));
  if (Number.isInteger(rounded)) return String(rounded);
  const decimals = Math.min(100, Math.max(0, 3 - Math.floor(Math.log10(Math.abs(rounded)))));
  return rounded.toFixed(decimals).replace(/0+$/, "").replace(/\.$/, "");
}

function trialSettings(row, swept) {
  return swept.map((name) => `${name}=${settingText(row[name])}`).join(", ");
}

function setUpSweeps() {
  const form = document.getElementById("new-sweep");
  const price = document.getElementById("quote-price");
  const trialCount = document.getElementById("quote-trials");
  const balance = document.getElementById("quote-balance");
  const note = document.getElementById("quote-note");
  const quote = document.getElementById("quote");
  const button = document.getElementById("launch-button");
  const trials = document.getElementById("trials");
  const usual = note.textContent;
  const names = [...new Set([...form.elements].map((field) => field.name).filter((name) => name && name !== "csrf_token"))];
  let timer = null, asked = 0;

  // Sent back with a problem: bring the form into view at the first field in trouble.
  const trouble = form.querySelector('[aria-invalid="true"]') || form.querySelector(".form-error");
  if (trouble) {
    trouble.scrollIntoView({ block: "center" });
    if (trouble.matches("input, select")) trouble.focus();
  }

  // The coordinator reads the form (the same reading as the launch's) and prices every trial.
  async function refresh() {
    const ticket = ++asked;
    let answer;
    try {
      answer = await api("/sweeps/quote", { method: "POST", body: new FormData(form), raw: true });
    } catch (error) {
      if (ticket !== asked) return;
      price.textContent = "–";
      note.textContent = `No price now: ${error.message}`;
      return;
    }
    if (ticket !== asked) return;
    for (const name of names) showFieldError(name, answer.fields[name] || null);
    if (answer.price_micro === undefined) {
      price.textContent = "–";
      trialCount.textContent = "";
      quote.classList.remove("short");
      button.disabled = !document.getElementById("dataset");
      if (answer.fields.dataset && !document.getElementById("dataset")) note.textContent = "Upload a dataset to see the price.";
      else note.textContent = answer.form || "Mend the fields marked in red to see the price.";
      return;
    }
    price.textContent = credits(answer.price_micro);
    trialCount.textContent = answer.trials === 1 ? "for 1 trial" : `for ${answer.trials} trials, at most ${credits(answer.most_per_trial_micro)} each`;
    balance.textContent = credits(answer.available_micro);
    quote.classList.toggle("short", !answer.affordable);
    const capped = Object.keys(answer.fields).length > 0;
    note.textContent = !answer.affordable ? "Your balance does not cover this price: fewer trials or steps, or add credits."
      : capped ? "Above your cost cap: the sweep would be refused. Raise the cap or try fewer trials." : usual;
    button.disabled = !answer.affordable;
  }
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(refresh, 300); });
  for (const choice of form.querySelectorAll('input[name="strategy"]')) {
    choice.addEventListener("change", () => {
      // Random search needs a count; a grid runs every combination unless capped.
      if (choice.checked && choice.value === "random" && !trials.value.trim()) trials.value = "8";
    });
  }
  form.addEventListener("submit", () => { button.disabled = true; button.textContent = "Starting…"; });
  refresh();
}

function sweepChart(container, sweep, swept) {
  const rows = sweep.trials;
  const measured = rows.filter((row) => row.eval_loss !== null);
  if (!measured.length) return;
  const width = 640, height = 260, left = 46, right = 12, top = 18, bottom = 34;
  const [low, high] = lossRange(measured.map((row) => row.eval_loss));
  const slot = (width - left - right) / rows.length;
  const x = (trial) => left + (trial - 0.5) * slot;
  const y = (value) => top + (1 - (value - low) / (high - low)) * (height - top - bottom);
  const { svg, add } = svgCanvas(width, height);
  lossGrid(add, y, low, high, left, right, width);
  add("line", { class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom });
  // Every trial's number under its place, or every few where there are many.
  const labelEvery = Math.ceil(rows.length / 20);
  for (const row of rows) {
    if (row.trial % labelEvery === 0 || row.trial === 1) add("text", { x: x(row.trial), y: height - bottom + 16, "text-anchor": "middle" }, String(row.trial));
  }
  add("text", { x: width - right, y: height - 2, "text-anchor": "end" }, "trial");
  const best = sweep.best;
  if (best && best.eval_loss !== null) {
    add("line", { class: "best-line", x1: left, x2: width - right, y1: y(best.eval_loss), y2: y(best.eval_loss) });
  }
  for (const row of measured) {
    const isBest = best && row.job_id === best.job_id;
    const kind = isBest ? "best" : HELD_STATES.includes(row.state) ? "open" : row.state === "stopped_early" ? "stopped" : ["completed", "verified"].includes(row.state) ? "done" : "other";
    const dot = add("circle", { class: `trial-dot trial-${kind}`, cx: x(row.trial), cy: y(row.eval_loss), r: isBest ? 7 : 5.5, "data-trial": row.trial });
    const latest = HELD_STATES.includes(row.state) ? ` (latest, at step ${row.step})` : "";
    const title = document.createElementNS(svg.namespaceURI, "title");
    title.textContent = `trial ${row.trial}: ${trialSettings(row, swept)} · held-out loss ${row.eval_loss.toFixed(4)}${latest} · ${row.state.replace("_", " ")}`;
    dot.append(title);
    if (isBest) add("text", { class: "best-label", x: x(row.trial), y: y(row.eval_loss) - 11, "text-anchor": "middle" }, "best");
  }
  // The legend names the kinds of dot the chart shows.
  const shown = new Set([...svg.querySelectorAll("circle")].map((dot) => dot.classList[1]));
  const swatch = (kind, label) => shown.has(`trial-${kind}`) ? element("span", {}, element("span", { class: `dot-swatch trial-${kind}` }), label) : null;
  container.replaceChildren(svg, element("div", { class: "legend" },
    swatch("best", best ? `best: trial ${best.trial}` : "best"), swatch("done", "completed"),
    swatch("stopped", "stopped early"), swatch("open", "running (latest)"), swatch("other", "failed or cancelled")));
}

function trialRow(row, swept, maxSteps, best) {
  const total = row.max_steps ?? maxSteps;
  return element("tr", { "data-job": row.job_id, class: best && best.job_id === row.job_id ? "best" : null },
    element("td", {}, String(row.trial)),
    element("td", {}, element("span", { class: "state state-" + row.state }, row.state.replace("_", " "))),
    ...swept.map((name) => element("td", { class: "number" }, settingText(row[name]))),
    element("td", {}, row.step === null || row.step === undefined ? element("span", { class: "muted" }, "–") : `${row.step}/${total}`),
    element("td", { class: "number" }, row.eval_loss === null ? "–" : row.eval_loss.toFixed(4)),
    element("td", { class: "number" }, row.cost_micro === null ? element("span", { class: "muted" }, `${credits(row.held_micro)} held`) : credits(row.cost_micro)),
    element("td", {}, element("a", { href: `/jobs/${row.job_id}`, class: "mono small" }, row.job_id)));
}

function bestTrial(best, swept) {
  const loss = best.eval_loss === null ? "–" : best.eval_loss.toFixed(4);
  const parts = [element("h2", {}, "Best trial"),
    element("p", {}, element("strong", {}, `Trial ${best.trial}`), ` · ${trialSettings(best, swept)} · held-out loss `, element("strong", {}, loss),
      best.final_loss === null ? "" : element("span", { class: "muted" }, ` (training ${best.final_loss.toFixed(4)})`),
      " · ", element("a", { href: `/jobs/${best.job_id}`, class: "mono" }, best.job_id))];
  const downloads = element("p", { class: "downloads" },
    element("a", { class: "button", href: `/api/jobs/${best.job_id}/result`, download: "", id: "download-peft" }, "Adapter (peft, .tar)"));
  if (best.fine_tuned_model) {
    downloads.append(" ", element("a", { class: "button", href: `/api/jobs/${best.job_id}/adapter.gguf`, download: "", id: "download-gguf" }, "Adapter (GGUF)"),
      " ", element("a", { class: "button primary", href: `/playground?model=${encodeURIComponent(best.fine_tuned_model)}`, id: "chat-link" }, "Chat with it"));
  }
  parts.push(downloads);
  if (best.fine_tuned_model) parts.push(element("p", { class: "muted small mono" }, best.fine_tuned_model));
  return parts;
}

function setUpSweep() {
  const root = document.getElementById("sweep");
  const id = root.dataset.sweep;
  const swept = root.dataset.swept ? root.dataset.swept.split(",") : [];
  const maxSteps = root.dataset.maxSteps;
  const chart = document.getElementById("chart");
  const bestCard = document.getElementById("best");

  every(3, async () => {
    const sweep = await api(`/api/sweeps/${id}`);
    // The API says running or completed; a sweep whose every trial was cancelled reads as that.
    const cancelled = sweep.trials.length && sweep.trials.every((row) => row.state === "cancelled");
    const label = sweep.state === "completed" && cancelled ? "cancelled" : sweep.state;
    const badge = document.getElementById("sweep-state");
    badge.textContent = label;
    badge.className = "state state-" + label;
    const done = sweep.trials.filter((row) => !HELD_STATES.includes(row.state)).length;
    document.getElementById("sweep-done").textContent = `${done} of ${sweep.trials.length}`;
    document.getElementById("sweep-cost").textContent = credits(sweep.cost_micro);
    document.getElementById("sweep-held").textContent = credits(sweep.held_micro);
    document.getElementById("cancel-form").hidden = sweep.state !== "running";
    sweepChart(chart, sweep, swept);
    document.querySelector("#trials tbody").replaceChildren(...sweep.trials.map((row) => trialRow(row, swept, maxSteps, sweep.best)));
    const bestKey = sweep.best ? `${sweep.best.job_id} ${sweep.best.fine_tuned_model}` : "";
    if (sweep.best && bestCard.dataset.key !== bestKey) {
      bestCard.replaceChildren(...bestTrial(sweep.best, swept));
      bestCard.dataset.key = bestKey;
    }
    // A trial being verified holds its result back until it passes: follow it too.
    return sweep.state === "running" || sweep.trials.some((row) => row.state === "verifying");
  });
}

// ---- Playground: chat with a model, streamed

function setUpPlayground() {
  const root = document.getElementById("playground");
  const form = document.getElementById("chat-form");
  const prompt = document.getElementById("prompt");
  const list = document.getElementById("messages");
  const send = document.getElementById("send");
  const errorNote = document.getElementById("chat-error");
  const usage = document.getElementById("chat-usage");
  const history = [];

  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  document.getElementById("model").addEventListener("change", () => { history.length = 0; list.replaceChildren(); usage.textContent = ""; });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || send.disabled) return;
    const temperature = Number.parseFloat(document.getElementById("temperature").value || "0");
    if (!Number.isFinite(temperature) || temperature < 0 || temperature > 2) {
      showFieldError("temperature", "a number from 0 to 2");
      return;
    }
    showFieldError("temperature", null);
    errorNote.hidden = true;
    history.push({ role: "user", content: text });
    list.append(element("li", { class: "user" }, text));
    const answer = element("li", { class: "assistant streaming" }, "");
    list.append(answer);
    prompt.value = "";
    send.disabled = true;
    const system = document.getElementById("system").value.trim();
    const messages = system ? [{ role: "system", content: system }, ...history] : [...history];
    const started = performance.now();
    let content = "", finalUsage = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken },
        body: JSON.stringify({
          model: document.getElementById("model").value, messages, stream: true, temperature,
          max_tokens: Number(root.dataset.maxTokens), stream_options: { include_usage: true },
        }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        throw new Error(body && body.error ? body.error.message : response.statusText);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let pending = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending += decoder.decode(value, { stream: true });
        const events = pending.split("\n\n");
        pending = events.pop();
        for (const block of events) {
          const data = block.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("");
          if (!data || data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the node stopped answering");
          if (chunk.usage) finalUsage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) { content += delta.content; answer.textContent = content; }
        }
      }
      history.push({ role: "assistant", content });
      if (finalUsage) {
        const seconds = (performance.now() - started) / 1000;
        usage.textContent = `${finalUsage.prompt_tokens} prompt + ${finalUsage.completion_tokens} answer tokens in ${seconds.toFixed(1)} s`;
      }
    } catch (error) {
      history.pop();
      if (!content) answer.remove();
      errorNote.hidden = false;
      errorNote.textContent = error.message;
    } finally {
      answer.classList.remove("streaming");
      send.disabled = false;
      prompt.focus();
    }
  });
}

// ---- Ops: the swarm, refreshed

function setUpOps() {
  const errorNote = document.getElementById("ops-error");
  async function act(node, what, path, body, question) {
    if (question && !confirm(question)) return;
    try {
      await api(`/api/ops/nodes/${node.id}/${path}`, { method: "POST", body });
      errorNote.hidden = true;
      await refresh();
    } catch (error) {
      errorNote.hidden = false;
      errorNote.textContent = `Could not ${what} ${node.name}: ${error.message}`;
    }
  }
  function actionButton(label, className, handler) {
    const button = element("button", { class: className, type: "button" }, label);
    button.addEventListener("click", handler);
    return button;
  }
  function actions(node) {
    if (node.state === "revoked") return element("span", { class: "muted" }, "revoked");
    const cell = element("div", { class: "actions" });
    if (node.state === "awaiting approval") {
      cell.append(actionButton("Approve", "small", () => act(node, "approve", "approve", undefined,
        `Let ${node.name} (${node.id}) take jobs and serve requests? Approve only machines you expected.`)));
    }
    if (node.quarantined) {
      cell.append(actionButton("Lift quarantine", "small", () => act(node, "lift the quarantine of", "lift-quarantine", undefined,
        `Let ${node.name} take jobs again? Its jobs are re-run at twice a new node's rate until it proves clean.`)));
    }
    cell.append(actionButton(node.trusted_by_ops ? "Untrust" : "Trust", "small", () => act(node, "change the trust of", "trust",
      { trusted: !node.trusted_by_ops }, node.trusted_by_ops ? null : `Trust ${node.name} to verify other nodes' jobs? Only trust machines you run.`)));
    cell.append(actionButton("Revoke", "danger small", () => act(node, "revoke", "revoke", undefined,
      `Revoke ${node.name} (${node.id})? It is disconnected now, its jobs go back to the queue, and its token never works again.`)));
    return cell;
  }
  async function refresh() {
    const overview = await api("/api/ops/overview");
    document.getElementById("nodes-connected").textContent = overview.nodes_connected;
    document.getElementById("queue-depth").textContent = overview.queue_depth;
    document.getElementById("oldest-queued").textContent = overview.oldest_queued_seconds === null ? "nothing waiting" : `oldest waits ${Math.round(overview.oldest_queued_seconds)} s`;
    const most = Math.max(1, ...Object.values(overview.jobs_by_state));
    document.getElementById("jobs-by-state").replaceChildren(...Object.entries(overview.jobs_by_state).map(([state, count]) =>
      element("div", { class: "bar" }, stateBadge(state),
        element("div", { class: "track" }, element("div", { class: "fill", style: null, "data-width": count })),
        element("span", { class: "count" }, String(count)))));
    // Widths are set through the CSS object model: the page's CSP allows no inline style attributes.
    for (const fill of document.querySelectorAll("#jobs-by-state .fill")) fill.style.width = `${(100 * Number(fill.dataset.width)) / most}%`;
    const body = document.querySelector("#nodes tbody");
    if (!overview.nodes.length) {
      body.replaceChildren(element("tr", { class: "empty" }, element("td", { colspan: 9 }, "No node has registered yet.")));
      return true;
    }
    body.replaceChildren(...overview.nodes.map((node) => {
      const gpus = node.gpus.length ? node.gpus.map((gpu) => gpu.name).join(", ") : `CPU only (${node.backends.join(", ") || "?"})`;
      const temperatures = node.gpus.map((gpu) => gpu.temperature_celsius).filter((value) => value !== null);
      return element("tr", { "data-node": node.id },
        element("td", {}, node.name, element("div", { class: "muted small mono" }, node.id)),
        element("td", {}, stateBadge(node.state), node.running_jobs ? element("div", { class: "small muted" }, `${node.running_jobs} running`) : null),
        element("td", {}, gpus),
        element("td", { class: "number" }, temperatures.length ? `${Math.round(Math.max(...temperatures))} °C` : "–"),
        element("td", { class: "number" }, `${Math.round(node.reputation * 100)} %`,
          element("div", { class: "small muted" }, `${node.jobs_completed} of ${node.leases} leases done`)),
        element("td", {}, `${node.verifications} checked · ${node.mismatches} mismatch${node.mismatches === 1 ? "" : "es"}`,
          element("div", { class: "small muted" }, `re-run at ${Math.round(node.sampling_rate * 100)} %`),
          node.trusted ? element("span", { class: "state state-trusted" }, node.trusted_by_ops ? "trusted by ops" : "trusted") : null),
        element("td", { class: "number" }, credits(node.pending_micro + node.available_micro)),
        element("td", {}, node.last_seen_at ? (node.state === "offline" || node.state === "revoked" ? ago(node.last_seen_at) : "now") : "never",
          node.round_trip_ms !== null ? element("div", { class: "small muted" }, `${Math.round(node.round_trip_ms)} ms round trip`) : null,
          node.reachability ? element("div", { class: "small muted", title: node.peer_address || "" }, REACHABILITY[node.reachability] || node.reachability) : null,
          node.reported_by_peers ? element("div", { class: "small" }, `reported ${node.reported_by_peers}× for bad pieces`) : null),
        element("td", {}, actions(node)));
    }));
    return true;
  }
  every(3, refresh);
  setUpPayouts();
}

// ---- Ops: the payout queue, exported in batches and marked paid or rejected one by one

function setUpPayouts() {
  const errorNote = document.getElementById("payouts-error");
  const form = document.getElementById("export-form");
  const currency = document.getElementById("export-currency");
  const rate = document.getElementById("export-rate");
  const button = document.getElementById("export-button");
  const result = document.getElementById("export-result");
  let prefilled = false;

  function fail(message) {
    errorNote.hidden = false;
    errorNote.textContent = message;
  }
  async function decide(payout, what, path, body) {
    try {
      await api(`/api/ops/payouts/${payout.id}/${path}`, { method: "POST", body });
      errorNote.hidden = true;
    } catch (error) {
      fail(`Could not ${what} ${payout.id} (${payout.node_name}): ${error.message}`);
    }
    await refresh();
  }
  // Ops type the payment's reference, or the reason its seller will read; nothing is sent without one.
  function ask(payout, question, what, path, field) {
    const answer = prompt(question);
    if (answer === null) return;
    if (!answer.trim()) return fail(`Nothing was sent: ${field === "reference" ? "a payment needs its reference" : "a rejection needs its reason"}.`);
    decide(payout, what, path, { [field]: answer.trim() });
  }
  function actions(payout) {
    const cell = element("div", { class: "actions" });
    const amount = payout.amount === null ? `${credits(payout.amount_micro)} credits` : `${payout.amount} ${payout.currency}`;
    if (payout.state === "exported") {
      const paid = element("button", { class: "small", type: "button" }, "Mark paid");
      paid.addEventListener("click", () => ask(payout, `Payment reference for ${amount} to ${payout.payee} (the transfer's id, so it can be traced):`, "mark paid", "paid", "reference"));
      cell.append(paid);
    }
    const reject = element("button", { class: "danger small", type: "button" }, "Reject");
    reject.addEventListener("click", () => ask(payout, `Why is the payout of ${amount} to ${payout.payee} rejected? Its seller reads this, and the credit goes back to them.`, "reject", "reject", "reason"));
    cell.append(reject);
    return cell;
  }
  function row(payout) {
    const amount = payout.amount === null ? element("span", { class: "muted" }, "at export")
      : element("span", { class: "nowrap" }, `${payout.amount} ${payout.currency}`,
        element("div", { class: "small" }, element("a", { href: `/api/ops/payouts/batches/${payout.batch_id}.csv`, download: "" }, "batch CSV")));
    return element("tr", { "data-payout": payout.id },
      element("td", {}, payout.node_name, element("div", { class: "muted small mono" }, payout.node_id)),
      element("td", { class: "payee" }, payout.payee, element("div", { class: "muted small mono" }, payout.id)),
      element("td", { class: "number" }, credits(payout.amount_micro)),
      element("td", { class: "number" }, amount),
      element("td", {}, stateBadge(payout.state)),
      element("td", {}, timeElement(payout.requested_at), element("div", { class: "muted small" }, ago(payout.requested_at))),
      element("td", {}, actions(payout)));
  }
  async function refresh() {
    let queue;
    try {
      queue = await api("/api/ops/payouts");
    } catch (error) {
      if (error.status !== 401) fail(`Could not read the payout queue: ${error.message}`);
      return true;
    }
    if (!prefilled) {
      currency.value = queue.default_rate.currency;
      rate.value = queue.default_rate.rate;
      prefilled = true;
    }
    const totals = queue.totals_micro;
    document.getElementById("payouts-owed").textContent = credits(totals.requested + totals.exported);
    document.getElementById("payouts-split").textContent =
      `· ${credits(totals.requested)} waiting for export, ${credits(totals.exported)} exported and to pay · ${credits(totals.paid)} paid so far`;
    const waiting = queue.payouts.filter((payout) => payout.state === "requested").length;
    button.disabled = !waiting;
    button.title = waiting ? "" : "no payout is waiting to be exported";
    const body = document.querySelector("#payout-queue tbody");
    body.replaceChildren(...(queue.payouts.length ? queue.payouts.map(row)
      : [element("tr", { class: "empty" }, element("td", { colspan: 7 }, "No payout waits: sellers ask for theirs from the app."))]));
    return true;
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    try {
      const batch = await api("/api/ops/payouts/export", {
        method: "POST", body: { currency: currency.value.trim().toUpperCase(), rate: rate.value.trim() },
      });
      errorNote.hidden = true;
      result.hidden = false;
      result.replaceChildren(element("p", {}, "Batch ", element("code", {}, batch.batch_id), " exported: ",
        element("a", { href: batch.csv_url, download: "", id: "batch-csv" }, "download its CSV"), " and pay from it."));
    } catch (error) {
      fail(`Could not export: ${error.message}`);
    }
    await refresh();
  });
  every(5, refresh);
}

// ---- start

// What the coordinator found when it connected to a node's transfer port from outside.
const REACHABILITY = { reachable: "reachable", tunnelled: "behind NAT, tunnelled", unreachable: "not reachable" };

const PAGES = {
  files: setUpFiles, jobs: setUpJobs, "new-job": setUpNewJob, job: setUpJob, sweeps: setUpSweeps, sweep: setUpSweep,
  playground: setUpPlayground, ops: setUpOps,
};
document.addEventListener("DOMContentLoaded", () => {
  setUpCommon();
  const setUp = PAGES[document.body.dataset.page];
  if (setUp) setUp();
});
