// fmnist-service demo page: uploads, drawing, result cards, live stats and the 500-image load test.
// A plain ES module with no dependencies; it uses only the gateway's public HTTP API and websocket.

const KEY_STORAGE = "fmnist.apiKey";
const WAIT_SECONDS = 10; // POST ?wait=: most answers come back in the same request
const POLL_EVERY_MS = 300; // fallback when a result takes longer than WAIT_SECONDS
const POLL_FOR_MS = 60_000;
const STATS_EVERY_MS = 1000;
const SPLIT_EVERY_MS = 2000; // the split's figures cover a minute: every other stats tick is enough
const REPLAY_LAST = 500; // requests the shadow panel's replay button runs through the candidate
const THROUGHPUT_POINTS = 60;
const MAX_RESULT_CARDS = 12;
const GALLERY_SIZE = 36;
const TEST_IMAGE_COUNT = 500;
const LOAD_TEST_TIMEOUT_MS = 60_000;
const SKETCH_INPUT = 28; // the drawing is sent as a 28×28 PNG, the model's input size
const BRUSH_WIDTH = 24; // on the 280×280 canvas: solid shapes, not hairlines, once scaled to 28 px
const AUTH_CLOSE_CODES = new Set([1008, 4401, 4403]);
// The test images are Fashion-MNIST's: only a model of that input and those classes can score them.
const FASHION_MNIST_CLASSES = [
  "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
];

const $ = (id) => document.getElementById(id);

const state = {
  apiKey: readStoredKey(),
  config: { auth_required: false, test_images: { available: true, message: null, total: 10000 } },
  classNames: [], // the chosen model's label names, from /v1/models and from every result
  models: [], // what GET /v1/models says
  model: null, // the chosen model's name (null: the service's default)
  modelsTimer: null,
  socket: null,
  socketOpen: false,
  cursor: null, // last stream cursor seen, to resume after a reconnect
  reconnectDelayMs: 500,
  reconnectTimer: null,
  statsTimer: null,
  splitPolledAt: 0, // Date.now() of the last canary split refresh
  shadowVersion: null, // the shadow panel's candidate, for its replay button
  throughput: [],
  streamCount: 0,
  pendingCards: new Map(), // request id → result card still waiting
  run: null, // the running "send 500 test images" load test
  renderQueued: false,
  authBlocked: false,
};

// ---------------------------------------------------------------- HTTP helpers

class ApiError extends Error {
  constructor(status, code, message, requestId = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
  }
  get isAuth() {
    return this.status === 401 || this.status === 403;
  }
}

function readStoredKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    return ""; // storage disabled: the key lives for this page only
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled */
  }
}

function authHeaders() {
  return state.apiKey ? { "X-API-Key": state.apiKey } : {};
}

async function api(path, { method = "GET", body = undefined, headers = {} } = {}) {
  let response;
  try {
    response = await fetch(path, { method, body, headers: { ...authHeaders(), ...headers } });
  } catch (err) {
    throw new ApiError(0, "network", `Cannot reach the gateway (${err.message}). Is \`fmnist serve\` still running?`);
  }
  const text = await response.text();
  let payload = null;
  try {
    payload = text ? JSON.parse(text) : null;
  } catch {
    /* not JSON: keep the text for the message */
  }
  if (!response.ok) {
    const error = payload?.error ?? {};
    const detail = typeof payload?.detail === "string" ? payload.detail : null;
    throw new ApiError(
      response.status,
      error.code ?? `http_${response.status}`,
      error.message ?? detail ?? (text.slice(0, 300) || response.statusText),
      error.request_id ?? null,
    );
  }
  return { status: response.status, body: payload, headers: response.headers };
}

function describe(error) {
  if (error.status === 401) return "This gateway needs an API key: enter one of FMNIST_API_KEYS in the key field above.";
  if (error.status === 403) return "The gateway refused this API key: check it against FMNIST_API_KEYS.";
  return error.message || String(error);
}

// ---------------------------------------------------------------- errors and status

function showError(message) {
  const box = $("errors");
  for (const existing of box.querySelectorAll(".error p")) {
    if (existing.textContent === message) return; // already on screen
  }
  const item = document.createElement("div");
  item.className = "error";
  const text = document.createElement("p");
  text.textContent = message;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "×";
  close.setAttribute("aria-label", "Dismiss this error");
  close.addEventListener("click", () => item.remove());
  item.append(text, close);
  box.append(item);
  while (box.children.length > 4) box.firstElementChild.remove();
}

function clearErrors() {
  $("errors").replaceChildren();
}

function setConnection(kind, text) {
  const pill = $("connection");
  pill.dataset.state = kind;
  pill.textContent = text;
}

function handleAuthError(error) {
  state.authBlocked = true;
  stopLive();
  setConnection("key", error.status === 403 ? "Key refused" : "API key needed");
  $("key-form").classList.add("needs-key");
  showError(describe(error));
}

// ---------------------------------------------------------------- API key

function bindKeyForm() {
  const input = $("api-key");
  input.value = state.apiKey;
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.apiKey = input.value.trim();
    storeKey(state.apiKey);
    $("key-form").classList.remove("needs-key");
    state.authBlocked = false;
    clearErrors();
    startLive();
  });
}

// ---------------------------------------------------------------- class names

function className(label) {
  return state.classNames[label] ?? `class ${label}`;
}

function setClassName(label, name) {
  if (state.classNames[label] === name) return;
  state.classNames[label] = name;
  // Bars drawn before the name was known said "class N": give them the name now.
  for (const cell of document.querySelectorAll(`.bar-label[data-label="${label}"]`)) cell.textContent = name;
}

function learnClassName(result) {
  if (Number.isInteger(result.label) && result.class_name) setClassName(result.label, result.class_name);
}

async function loadModelInfo() {
  try {
    const { body } = await api("/v1/models");
    state.models = Array.isArray(body?.models) ? body.models : [];
    const select = $("model-select");
    const names = state.models.map((model) => model.name);
    if (state.model === null || !names.includes(state.model)) state.model = body?.default ?? names[0] ?? null;
    select.replaceChildren(
      ...state.models.map((model) => {
        const option = document.createElement("option");
        option.value = model.name;
        option.textContent = model.ready ? model.name : `${model.name} (no live worker)`;
        option.selected = model.name === state.model;
        return option;
      }),
    );
    showChosenModel();
  } catch (error) {
    if (error.isAuth) handleAuthError(error);
    // Otherwise the names are learned from results as they arrive.
  }
}

function chosenModel() {
  return state.models.find((model) => model.name === state.model) ?? null;
}

// The chosen model's input (C×H×W, channels) and classes; "send test images" only where they fit.
function showChosenModel() {
  const model = chosenModel();
  const info = $("model-info");
  if (model === null) {
    info.textContent = "Waiting for a worker to announce a model…";
  } else {
    const [channels, height, width] = model.input_shape;
    const kind = channels === 1 ? "grayscale" : channels === 3 ? "RGB" : `${channels} channels`;
    info.textContent = `Input ${channels}×${height}×${width} (${kind}); classes: ${model.class_names.join(", ")}`
      + (model.ready ? "" : ". No live worker now.");
    state.classNames = [];
    model.class_names.forEach((name, label) => setClassName(label, String(name)));
  }
  updateLoadButton();
}

function testImagesFit() {
  const model = chosenModel();
  return model !== null
    && model.input_shape.join(",") === "1,28,28"
    && model.class_names.join("\n") === FASHION_MNIST_CLASSES.join("\n");
}

function predictionsPath() {
  return state.model === null ? "/v1/predictions" : `/v1/models/${encodeURIComponent(state.model)}/predictions`;
}

// ---------------------------------------------------------------- result cards

function addResultCard(altText) {
  const card = $("result-template").content.firstElementChild.cloneNode(true);
  card.querySelector(".thumb").alt = altText;
  const list = $("results");
  list.prepend(card);
  $("results-empty").hidden = true;
  while (list.children.length > MAX_RESULT_CARDS) {
    const old = list.lastElementChild;
    if (old.dataset.objectUrl) URL.revokeObjectURL(old.dataset.objectUrl);
    old.remove();
  }
  return card;
}

function formatMs(value) {
  if (typeof value !== "number") return "–";
  return value < 10 ? value.toFixed(2) : value < 100 ? value.toFixed(1) : value.toFixed(0);
}

function percent(p) {
  return `${(p * 100).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1)}%`;
}

function renderResult(card, result) {
  if (card.dataset.status !== "pending") return;
  state.pendingCards.delete(result.request_id);
  card.dataset.requestId = result.request_id;
  card.dataset.status = result.status;
  const title = card.querySelector(".class-name");
  const confidence = card.querySelector(".confidence");
  const meta = card.querySelector(".result-meta");
  if (result.status === "failed") {
    title.textContent = "Failed";
    confidence.textContent = "";
    meta.textContent = `${result.error?.code ?? "error"}: ${result.error?.message ?? "no reason given"}`;
    return;
  }
  learnClassName(result);
  const probabilities = result.probabilities ?? [];
  title.textContent = result.class_name ?? className(result.label);
  card.dataset.className = title.textContent;
  confidence.textContent = probabilities.length ? percent(probabilities[result.label]) : "";
  const bars = card.querySelector(".bars");
  bars.replaceChildren(
    ...probabilities.map((p, label) => {
      const row = document.createElement("li");
      row.className = label === result.label ? "bar top" : "bar";
      const name = document.createElement("span");
      name.className = "bar-label";
      name.dataset.label = String(label);
      name.textContent = className(label);
      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = percent(p);
      row.append(name, track, value);
      return row;
    }),
  );
  const parts = [
    `batch of ${result.batch_size ?? "?"}`,
    `queued ${formatMs(result.queue_ms)} ms`,
    `inference ${formatMs(result.inference_ms)} ms`,
  ];
  if (result.model_version) parts.push(`model ${result.model_version}`);
  if (result.worker_id) parts.push(`worker ${result.worker_id}`);
  meta.textContent = parts.join(" · ");
  meta.title = `request ${result.request_id}`;
}

function renderFailure(card, error) {
  if (card.dataset.status !== "pending") return;
  card.dataset.status = "failed";
  card.querySelector(".class-name").textContent = "Not classified";
  card.querySelector(".confidence").textContent = "";
  card.querySelector(".result-meta").textContent = describe(error);
  if (error.isAuth) handleAuthError(error);
  else if (error.status === 0 || error.status >= 500 || error.status === 429) showError(describe(error));
}

async function pollPrediction(card, requestId) {
  const deadline = performance.now() + POLL_FOR_MS;
  while (card.dataset.status === "pending" && performance.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, POLL_EVERY_MS));
    if (card.dataset.status !== "pending") return; // the websocket got there first
    const { body } = await api(`/v1/predictions/${encodeURIComponent(requestId)}`);
    if (body.status !== "pending") {
      renderResult(card, body);
      return;
    }
  }
  if (card.dataset.status === "pending") {
    throw new ApiError(504, "timeout", `No result for request ${requestId} after ${POLL_FOR_MS / 1000} s: are workers running?`);
  }
}

// The thumbnail is what the model saw: the gateway decodes and normalises the image exactly as
// for a prediction (invert, trim, resize) and returns it as a PNG. The <img> stays hidden until it
// has loaded, so an image the gateway cannot read leaves a "No preview" box, never a broken icon.
async function showModelInput(card, blob) {
  const thumb = card.querySelector(".thumb");
  const placeholder = card.querySelector(".thumb-placeholder");
  const noPreview = () => {
    thumb.hidden = true;
    thumb.removeAttribute("src");
    placeholder.textContent = "No preview";
    placeholder.hidden = false;
  };
  let response;
  try {
    const query = state.model === null ? "" : `?model=${encodeURIComponent(state.model)}`;
    response = await fetch(`/v1/demo/model-input${query}`, {
      method: "POST",
      body: blob,
      headers: { ...authHeaders(), "Content-Type": blob.type || "application/octet-stream" },
    });
  } catch {
    noPreview();
    return;
  }
  if (!response.ok || !card.isConnected) {
    noPreview();
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  card.dataset.objectUrl = url;
  thumb.addEventListener("load", () => {
    thumb.hidden = false;
    placeholder.hidden = true;
  }, { once: true });
  thumb.addEventListener("error", noPreview, { once: true });
  thumb.src = url;
}

async function classifyBlob(blob, card) {
  showModelInput(card, blob);
  try {
    const { body } = await api(`${predictionsPath()}?wait=${WAIT_SECONDS}`, {
      method: "POST",
      body: blob,
      headers: { "Content-Type": blob.type || "application/octet-stream" },
    });
    if (body.status === "pending") {
      state.pendingCards.set(body.request_id, card);
      await pollPrediction(card, body.request_id);
    } else {
      renderResult(card, body);
    }
  } catch (error) {
    renderFailure(card, error);
  }
}

function bindResults() {
  $("clear-results").addEventListener("click", () => {
    for (const card of $("results").children) {
      if (card.dataset.objectUrl) URL.revokeObjectURL(card.dataset.objectUrl);
    }
    $("results").replaceChildren();
    state.pendingCards.clear();
    $("results-empty").hidden = false;
  });
}

// ---------------------------------------------------------------- uploads

function classifyFiles(files) {
  for (const file of files) {
    const card = addResultCard(`Uploaded image ${file.name}, as the model saw it`);
    classifyBlob(file, card);
  }
}

function bindUploads() {
  const input = $("file-input");
  input.addEventListener("change", () => {
    classifyFiles([...input.files]);
    input.value = ""; // choosing the same file again fires change again
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const files = [...event.dataTransfer.files].filter((f) => f.type.startsWith("image/") || f.type === "");
    if (files.length === 0) showError("Drop image files (PNG, JPEG, GIF, WebP, BMP).");
    classifyFiles(files);
  });
  window.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files ?? [])].filter((f) => f.type.startsWith("image/"));
    if (files.length > 0) {
      event.preventDefault();
      classifyFiles(files);
    }
  });
  // A file dropped outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

// ---------------------------------------------------------------- drawing

function bindSketch() {
  const canvas = $("sketch");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  let drawing = false;
  let last = null;
  let dirty = false;
  let autoTimer = null;

  const clear = () => {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    dirty = false;
    $("sketch-cue").hidden = false;
    const small = $("sketch-small").getContext("2d");
    small.fillStyle = "#000";
    small.fillRect(0, 0, SKETCH_INPUT, SKETCH_INPUT);
  };
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * canvas.width) / box.width,
      y: ((event.clientY - box.top) * canvas.height) / box.height,
    };
  };
  const stroke = (from, to) => {
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = BRUSH_WIDTH;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    dirty = true;
    $("sketch-cue").hidden = true;
  };
  const submit = () => {
    clearTimeout(autoTimer);
    const input = sketchToInput(canvas);
    if (!input) {
      showError("Draw something on the black canvas first.");
      return;
    }
    input.canvas.toBlob((blob) => {
      const card = addResultCard("Your drawing, as the model saw it");
      classifyBlob(blob, card);
    }, "image/png");
  };

  canvas.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    clearTimeout(autoTimer);
    drawing = true;
    last = point(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const e of events.length ? events : [event]) {
      const next = point(e);
      stroke(last, next);
      last = next;
    }
  });
  const finish = () => {
    if (!drawing) return;
    drawing = false;
    sketchToInput(canvas); // refresh the 28×28 preview
    if ($("auto-classify").checked && dirty) autoTimer = setTimeout(submit, 400);
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  canvas.addEventListener("keydown", (event) => {
    if (event.key === "Enter") submit();
    if (event.key === "Escape" || event.key === "Delete" || event.key === "Backspace") clear();
  });
  $("classify-drawing").addEventListener("click", submit);
  $("clear-drawing").addEventListener("click", clear);
  clear();
}

// Crop the sketch to its bounding box and scale its longer side to 28 px, centred, the way
// Fashion-MNIST itself was made (trim, fit the longer edge, pad); the box filter averages whole
// 10×10 blocks so thin strokes keep their grey levels instead of aliasing away.
function sketchToInput(canvas) {
  const { width, height } = canvas;
  const pixels = canvas.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, width, height).data;
  let left = width;
  let top = height;
  let right = -1;
  let bottom = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (pixels[(y * width + x) * 4] > 16) {
        if (x < left) left = x;
        if (x > right) right = x;
        if (y < top) top = y;
        if (y > bottom) bottom = y;
      }
    }
  }
  if (right < 0) return null;
  const side = Math.max(right - left + 1, bottom - top + 1);
  const sx = (left + right + 1) / 2 - side / 2;
  const sy = (top + bottom + 1) / 2 - side / 2;

  const scale = 10;
  const work = document.createElement("canvas");
  work.width = work.height = SKETCH_INPUT * scale;
  const workCtx = work.getContext("2d", { willReadFrequently: true });
  workCtx.fillStyle = "#000";
  workCtx.fillRect(0, 0, work.width, work.height);
  workCtx.imageSmoothingQuality = "high";
  workCtx.drawImage(canvas, sx, sy, side, side, 0, 0, work.width, work.height);
  const big = workCtx.getImageData(0, 0, work.width, work.height).data;

  const small = $("sketch-small");
  const smallCtx = small.getContext("2d");
  const out = smallCtx.createImageData(SKETCH_INPUT, SKETCH_INPUT);
  for (let y = 0; y < SKETCH_INPUT; y++) {
    for (let x = 0; x < SKETCH_INPUT; x++) {
      let sum = 0;
      for (let dy = 0; dy < scale; dy++) {
        const row = (y * scale + dy) * work.width;
        for (let dx = 0; dx < scale; dx++) sum += big[(row + x * scale + dx) * 4];
      }
      const value = Math.round(sum / (scale * scale));
      const at = (y * SKETCH_INPUT + x) * 4;
      out.data[at] = out.data[at + 1] = out.data[at + 2] = value;
      out.data[at + 3] = 255;
    }
  }
  smallCtx.putImageData(out, 0, 0);
  return { canvas: small };
}

// ---------------------------------------------------------------- live stats

function renderStats(stats) {
  const n = (v) => (typeof v === "number" ? v.toLocaleString() : "–");
  $("stat-throughput").textContent = typeof stats.throughput_per_s === "number" ? stats.throughput_per_s.toFixed(1) : "–";
  $("stat-in-flight").textContent = n(stats.in_flight);
  $("stat-completed").textContent = n(stats.completed);
  $("stat-failed").textContent = n(stats.failed);
  $("stat-queue").textContent = `${formatMs(stats.queue_ms?.p50)} / ${formatMs(stats.queue_ms?.p99)}`;
  $("stat-inference").textContent = `${formatMs(stats.inference_ms?.p50)} / ${formatMs(stats.inference_ms?.p99)}`;
  state.throughput.push(Number(stats.throughput_per_s) || 0);
  if (state.throughput.length > THROUGHPUT_POINTS) state.throughput.shift();
  drawThroughput();
  renderHistogram(stats.batch_sizes ?? {});
}

function cssColor(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function drawThroughput() {
  const canvas = $("throughput-chart");
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
  const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  const values = state.throughput;
  const peak = Math.max(1, ...values);
  const pad = 6 * ratio;
  const x = (i) => width - pad - ((values.length - 1 - i) * (width - 2 * pad)) / (THROUGHPUT_POINTS - 1);
  const y = (v) => height - pad - (v / peak) * (height - 2 * pad);
  if (values.length > 1) {
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
    ctx.strokeStyle = cssColor("--accent");
    ctx.lineWidth = 2 * ratio;
    ctx.stroke();
    ctx.lineTo(x(values.length - 1), height - pad);
    ctx.lineTo(x(0), height - pad);
    ctx.closePath();
    ctx.globalAlpha = 0.15;
    ctx.fillStyle = cssColor("--accent");
    ctx.fill();
    ctx.globalAlpha = 1;
  }
  ctx.fillStyle = cssColor("--muted");
  ctx.font = `${11 * ratio}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  ctx.fillText(`peak ${peak.toFixed(0)} img/s`, pad, pad);
  canvas.setAttribute("aria-label", `Throughput over the last minute, now ${(values.at(-1) ?? 0).toFixed(1)} images per second, peak ${peak.toFixed(0)}`);
}

// The server counts batches per size; weighting each size by the images it carried shows what a
// typical request experienced. Many distinct sizes are grouped by powers of two to stay legible.
function histogramBuckets(batchSizes) {
  const entries = Object.entries(batchSizes)
    .map(([size, batches]) => [Number(size), Number(batches)])
    .filter(([size, batches]) => Number.isFinite(size) && size > 0 && batches > 0)
    .sort((a, b) => a[0] - b[0]);
  const grouped = entries.length > 16;
  const buckets = new Map();
  for (const [size, batches] of entries) {
    const low = grouped ? 2 ** Math.floor(Math.log2(size)) : size;
    const label = !grouped || low === 1 ? String(low) : `${low}–${2 * low - 1}`;
    const bucket = buckets.get(label) ?? { label, batches: 0, images: 0 };
    bucket.batches += batches;
    bucket.images += batches * size;
    buckets.set(label, bucket);
  }
  return [...buckets.values()];
}

function renderHistogram(batchSizes) {
  const buckets = histogramBuckets(batchSizes);
  const box = $("batch-histogram");
  $("batch-empty").hidden = buckets.length > 0;
  const total = buckets.reduce((sum, b) => sum + b.images, 0);
  const peak = Math.max(1, ...buckets.map((b) => b.images));
  const describeBucket = (b) =>
    `batch size ${b.label}: ${b.batches.toLocaleString()} batches, ${b.images.toLocaleString()} images (${percent(b.images / total)})`;
  box.replaceChildren(
    ...buckets.map((bucket) => {
      const bar = document.createElement("div");
      bar.className = "hist-bar";
      bar.style.height = `${Math.max(2, (bucket.images / peak) * 100)}%`;
      bar.title = describeBucket(bucket);
      bar.dataset.size = bucket.label;
      bar.dataset.batches = String(bucket.batches);
      const tick = document.createElement("span");
      tick.textContent = bucket.label;
      bar.append(tick);
      return bar;
    }),
  );
  box.setAttribute("aria-label", buckets.length ? buckets.map(describeBucket).join("; ") : "No batches yet");
}

async function pollStats() {
  state.statsTimer = null;
  if (state.authBlocked) return;
  if (!document.hidden) {
    try {
      const { body } = await api("/v1/stats");
      renderStats(body);
      await pollShadow();
      if (Date.now() - state.splitPolledAt >= SPLIT_EVERY_MS) {
        state.splitPolledAt = Date.now();
        await pollSplit();
      }
    } catch (error) {
      if (error.isAuth) {
        handleAuthError(error);
        return;
      }
      setConnection("down", "Gateway unreachable");
    }
  }
  if (!state.authBlocked) state.statsTimer = setTimeout(pollStats, STATS_EVERY_MS);
}

// ---------------------------------------------------------------- shadow candidate

// The chosen model's newest shadow comparison; the panel stays hidden while none runs.
async function pollShadow() {
  const panel = $("shadow");
  if (state.model === null) {
    panel.hidden = true;
    return;
  }
  let candidate = null;
  try {
    const { body } = await api(`/v1/models/${encodeURIComponent(state.model)}/shadow`);
    candidate = body.candidates?.[0] ?? null;
  } catch (error) {
    if (error.isAuth) throw error;
  }
  panel.hidden = candidate === null;
  state.shadowVersion = candidate?.version ?? null;
  if (candidate === null) return;
  const share = (v) => (typeof v === "number" ? percent(v) : "–");
  $("shadow-model").textContent = state.model;
  $("shadow-version").textContent = candidate.version;
  $("shadow-samples").textContent = candidate.samples.toLocaleString();
  $("shadow-agreement").textContent = share(candidate.agreement);
  $("shadow-accuracy").textContent = `${share(candidate.live_accuracy)} / ${share(candidate.candidate_accuracy)}`;
  $("shadow-latency").textContent = `${formatMs(candidate.live_latency_ms?.p50)} / ${formatMs(candidate.candidate_latency_ms?.p50)}`;
  $("shadow-labelled").textContent = candidate.labelled.toLocaleString();
  const cells = Object.entries(candidate.disagreement ?? {})
    .flatMap(([live, row]) => Object.entries(row).map(([other, count]) => [live, other, count]))
    .sort((a, b) => b[2] - a[2])
    .slice(0, 3);
  $("shadow-disagreements").textContent = cells.length
    ? cells.map(([live, other, count]) => `${live} → ${other} (${count})`).join(", ")
    : "none yet";
}

// Replays the newest retained requests through the shadow's candidate (`fmnist serve` only; other
// gateways answer 409 with what to run instead, shown as the result).
async function replayShadow() {
  const version = state.shadowVersion;
  if (state.model === null || version === null) return;
  const button = $("replay-shadow");
  const result = $("replay-result");
  button.disabled = true;
  result.textContent = "Replaying…";
  try {
    const { body } = await api(`/v1/models/${encodeURIComponent(state.model)}/replay`, {
      method: "POST",
      body: JSON.stringify({ candidate: version, last: REPLAY_LAST }),
      headers: { "Content-Type": "application/json" },
    });
    const share = (v) => (typeof v === "number" ? percent(v) : "–");
    result.textContent =
      `Replayed ${body.replayed.toLocaleString()} retained requests: agreement ${share(body.agreement)}, ` +
      `accuracy live / candidate ${share(body.live_accuracy)} / ${share(body.candidate_accuracy)}` +
      ` (${body.labelled.toLocaleString()} labelled)`;
  } catch (error) {
    result.textContent = describe(error);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- canary split

// The chosen model's traffic weights in force and each weighted version's live figures on this
// gateway; the panel stays hidden while no split is set.
async function pollSplit() {
  const panel = $("split");
  let model = null;
  if (state.model !== null) {
    try {
      ({ body: model } = await api(`/v1/models/${encodeURIComponent(state.model)}`));
    } catch (error) {
      if (error.isAuth) throw error;
    }
  }
  const weights = Object.entries(model?.weights ?? {}).sort(([a], [b]) => a.localeCompare(b));
  panel.hidden = weights.length === 0;
  if (weights.length === 0) return;
  const versions = new Map((model.versions ?? []).map((info) => [info.version, info]));
  $("split-model").textContent = state.model;
  const rows = weights.map(([version, weight]) => {
    const info = versions.get(version);
    const live = info?.live ?? null;
    if (live) $("split-window").textContent = String(Math.round(live.window_s));
    const row = document.createElement("tr");
    row.dataset.version = version;
    const cells = [
      info?.tag ? `${version} (${info.tag})` : version,
      `${weight}%`,
      live ? live.requests.toLocaleString() : "–",
      live ? live.failed.toLocaleString() : "–",
      live ? `${formatMs(live.p50_ms)} / ${formatMs(live.p99_ms)}` : "–",
    ];
    const classes = ["version", "weight", "requests", "failed", "latency"];
    row.append(
      ...cells.map((text, i) => {
        const cell = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) cell.scope = "row";
        cell.className = classes[i];
        cell.textContent = text;
        return cell;
      }),
    );
    if (info && !info.ready) row.title = "No live worker now: its share goes to the others.";
    return row;
  });
  $("split-rows").replaceChildren(...rows);
}

// ---------------------------------------------------------------- websocket

function openSocket() {
  clearTimeout(state.reconnectTimer);
  const url = new URL("/v1/predictions/stream", window.location.href);
  url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
  if (state.apiKey) url.searchParams.set("api_key", state.apiKey);
  if (state.cursor !== null) url.searchParams.set("after", String(state.cursor));
  const socket = new WebSocket(url);
  state.socket = socket;
  setConnection("connecting", "Connecting…");
  socket.addEventListener("open", () => {
    if (state.socket !== socket) return;
    state.socketOpen = true;
    state.reconnectDelayMs = 500;
    setConnection("live", "Live");
    updateLoadButton();
  });
  socket.addEventListener("message", (event) => {
    if (state.socket !== socket) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return; // not ours to interpret
    }
    handleStreamMessage(message);
  });
  socket.addEventListener("close", (event) => {
    if (state.socket !== socket) return;
    state.socket = null;
    state.socketOpen = false;
    updateLoadButton();
    abandonUnacceptedSubmissions();
    if (AUTH_CLOSE_CODES.has(event.code)) {
      const status = event.code === 4401 ? 401 : 403;
      handleAuthError(new ApiError(status, "auth", event.reason || "not authorised"));
      return;
    }
    const seconds = (state.reconnectDelayMs / 1000).toFixed(1);
    setConnection("down", `Reconnecting in ${seconds} s`);
    state.reconnectTimer = setTimeout(openSocket, state.reconnectDelayMs);
    state.reconnectDelayMs = Math.min(state.reconnectDelayMs * 2, 10_000);
  });
}

function handleStreamMessage(message) {
  if (message.type === "result") {
    if (Number.isInteger(message.cursor)) state.cursor = message.cursor;
    state.streamCount += 1;
    learnClassName(message);
    const card = state.pendingCards.get(message.request_id);
    if (card) renderResult(card, message);
    if (state.run && message.metadata?.demo_run === state.run.id) recordRunResult(message);
    scheduleRender();
  } else if (message.type === "accepted") {
    if (state.run && message.client_ref?.startsWith(`${state.run.id}:`)) {
      state.run.accepted.add(message.client_ref);
      scheduleRender();
    }
  } else if (message.type === "error") {
    const error = message.error ?? {};
    if (state.run && message.client_ref?.startsWith(`${state.run.id}:`)) {
      state.run.errors += 1;
      state.run.accepted.add(message.client_ref);
      state.run.lastError = `${error.code ?? "error"}: ${error.message ?? ""}`;
      scheduleRender();
    } else {
      showError(error.message ?? "The stream reported an error.");
    }
  }
}

function stopLive() {
  clearTimeout(state.statsTimer);
  clearTimeout(state.reconnectTimer);
  state.statsTimer = null;
  if (state.socket) {
    const socket = state.socket;
    state.socket = null;
    state.socketOpen = false;
    socket.close();
  }
  updateLoadButton();
}

function startLive() {
  stopLive();
  if (state.config.auth_required && !state.apiKey) {
    state.authBlocked = true;
    setConnection("key", "API key needed");
    $("key-form").classList.add("needs-key");
    $("api-key").focus();
    return;
  }
  state.authBlocked = false;
  openSocket();
  pollStats();
  loadModelInfo();
  // Models come and go with their workers.
  if (state.modelsTimer === null) state.modelsTimer = setInterval(loadModelInfo, 5000);
}

// ---------------------------------------------------------------- load test

function updateLoadButton() {
  const button = $("send-test-images");
  const available = state.config.test_images?.available !== false;
  const fits = state.models.length === 0 || testImagesFit();
  button.disabled = !available || !fits || !state.socketOpen || Boolean(state.run && !state.run.finished);
  const status = $("load-status");
  if (!available) {
    button.textContent = "Test images not installed";
    status.textContent = state.config.test_images?.message ?? "The Fashion-MNIST test set is not on the server.";
    status.classList.add("problem");
  } else if (!fits) {
    button.textContent = "No test set for this model";
    status.textContent = "The test images are Fashion-MNIST's: choose a 1×28×28 Fashion-MNIST model to send them.";
    status.classList.remove("problem");
  } else if (button.textContent === "No test set for this model") {
    button.textContent = "Send 500 test images";
    status.textContent = "Real Fashion-MNIST test images, all at once over the websocket.";
  }
}

function randomId() {
  const bytes = new Uint8Array(6);
  crypto.getRandomValues(bytes);
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function sendTestImages() {
  const status = $("load-status");
  status.classList.remove("problem");
  status.textContent = `Fetching ${TEST_IMAGE_COUNT} test images…`;
  const total = state.config.test_images?.total ?? 10_000;
  const offset = Math.floor(Math.random() * Math.max(1, total - TEST_IMAGE_COUNT));
  let images;
  try {
    const { body } = await api(`/v1/demo/test-images?count=${TEST_IMAGE_COUNT}&offset=${offset}`);
    images = body.images;
  } catch (error) {
    status.textContent = describe(error);
    status.classList.add("problem");
    if (error.isAuth) handleAuthError(error);
    return;
  }
  if (!state.socketOpen) {
    status.textContent = "The live connection dropped; try again when it shows Live.";
    status.classList.add("problem");
    return;
  }
  const run = {
    id: randomId(),
    total: images.length,
    images: new Map(images.map((image) => [String(image.index), image])),
    sent: new Set(),
    accepted: new Set(),
    completed: 0,
    failed: 0,
    errors: 0,
    correct: 0,
    batchSizeSum: 0,
    startedAt: performance.now(),
    finishedAt: null,
    finished: false,
    lastError: null,
    gallery: [],
  };
  state.run = run;
  $("load-progress").max = run.total;
  $("load-gallery").replaceChildren();
  updateLoadButton();
  for (const image of images) {
    const clientRef = `${run.id}:${image.index}`;
    state.socket.send(
      JSON.stringify({
        type: "submit",
        image: image.png,
        ...(state.model === null ? {} : { model: state.model }),
        metadata: { label: String(image.label), demo_run: run.id, index: String(image.index) },
        client_ref: clientRef,
      }),
    );
    run.sent.add(clientRef);
  }
  run.timeout = setTimeout(() => finishRun(run, "timed out"), LOAD_TEST_TIMEOUT_MS);
  scheduleRender();
}

function recordRunResult(result) {
  const run = state.run;
  if (run.finished) return;
  if (result.status === "completed") {
    run.completed += 1;
    run.batchSizeSum += result.batch_size ?? 0;
    const expected = Number(result.metadata.label);
    const correct = result.label === expected;
    if (correct) run.correct += 1;
    const image = run.images.get(result.metadata.index);
    if (image) {
      run.gallery.push({ png: image.png, predicted: result.class_name ?? className(result.label), expected, correct });
      if (run.gallery.length > GALLERY_SIZE) run.gallery.shift();
    }
  } else {
    run.failed += 1;
    run.lastError = `${result.error?.code ?? "failed"}: ${result.error?.message ?? ""}`;
  }
  if (run.completed + run.failed + run.errors >= run.total) finishRun(run, null);
}

// Submissions the server never acknowledged cannot be resumed after a reconnect: count them lost.
function abandonUnacceptedSubmissions() {
  const run = state.run;
  if (!run || run.finished) return;
  const lost = [...run.sent].filter((ref) => !run.accepted.has(ref)).length;
  if (lost > 0) {
    run.errors += lost;
    run.lastError = `${lost} submissions were lost when the connection dropped`;
    for (const ref of run.sent) run.accepted.add(ref);
    if (run.completed + run.failed + run.errors >= run.total) finishRun(run, null);
  }
  scheduleRender();
}

function finishRun(run, reason) {
  if (run.finished) return;
  run.finished = true;
  run.finishedAt = performance.now();
  clearTimeout(run.timeout);
  if (reason) run.lastError = `${reason}: ${run.total - run.completed - run.failed - run.errors} images unanswered`;
  updateLoadButton();
  scheduleRender();
}

function scheduleRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => {
    state.renderQueued = false;
    renderRun();
    $("stream-count").textContent = state.streamCount.toLocaleString();
  });
}

function renderRun() {
  const run = state.run;
  if (!run) return;
  const answered = run.completed + run.failed + run.errors;
  const seconds = ((run.finishedAt ?? performance.now()) - run.startedAt) / 1000;
  $("load-progress").value = answered;
  $("load-done").textContent = `${answered} / ${run.total}`;
  $("load-accuracy").textContent = run.completed ? `${((100 * run.correct) / run.completed).toFixed(1)}%` : "–";
  $("load-rate").textContent = run.completed && seconds > 0 ? `${(run.completed / seconds).toFixed(0)} img/s` : "–";
  $("load-batch").textContent = run.completed ? (run.batchSizeSum / run.completed).toFixed(1) : "–";
  const status = $("load-status");
  if (run.finished) {
    status.textContent =
      `Done: ${run.completed} classified in ${seconds.toFixed(2)} s, ${run.correct} correct` +
      (run.failed + run.errors ? `, ${run.failed + run.errors} not classified (${run.lastError})` : ".");
    status.classList.toggle("problem", run.failed + run.errors > 0);
  } else {
    status.textContent = `Sent ${run.sent.size}, accepted ${run.accepted.size}, answered ${answered} of ${run.total}…`;
  }
  const gallery = $("load-gallery");
  gallery.replaceChildren(
    ...run.gallery
      .slice()
      .reverse()
      .map((item) => {
        const li = document.createElement("li");
        if (!item.correct) li.className = "wrong";
        const img = document.createElement("img");
        img.src = `data:image/png;base64,${item.png}`;
        img.alt = item.correct
          ? `Predicted ${item.predicted}, correct`
          : `Predicted ${item.predicted}, actually ${className(item.expected)}`;
        li.title = img.alt;
        const caption = document.createElement("span");
        caption.textContent = item.predicted;
        li.append(img, caption);
        return li;
      }),
  );
}

function bindLoadTest() {
  $("model-select").addEventListener("change", (event) => {
    state.model = event.target.value;
    showChosenModel();
  });
  $("send-test-images").addEventListener("click", () => {
    sendTestImages().catch((error) => showError(describe(error)));
  });
  $("replay-shadow").addEventListener("click", () => {
    replayShadow().catch((error) => showError(describe(error)));
  });
}

// ---------------------------------------------------------------- start

async function loadConfig() {
  try {
    const { body } = await api("/demo/config");
    state.config = body;
  } catch (error) {
    showError(`Cannot read the demo configuration: ${describe(error)}`);
  }
}

async function main() {
  bindKeyForm();
  bindUploads();
  bindSketch();
  bindResults();
  bindLoadTest();
  await loadConfig();
  updateLoadButton();
  startLive();
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !state.authBlocked && state.statsTimer === null) pollStats();
  });
  window.addEventListener("resize", drawThroughput);
}

main();
