// The page that shows the model drawing: server-sent events from GET /generate/stream, one column
// per run (each with its model of GET /models), x_t beside the x0 prediction at every step; the
// forward process from GET /schedule. edit.js adds the edit panel and the interpolation strip.
// Plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"];
const KEY_STORAGE = "fashion-api-key";
const MAX_RUNS = 3;
const $ = (selector, root = document) => root.querySelector(selector);

let schedule = null; // {name, T, alpha_bar, log_snr, sigma}
let models = []; // GET /models data: [{id, default, sampler, steps, guidance, distilled_guidance, ...}]
let runs = []; // the columns of the current generation
let forwardImage = null; // Float32Array(784) in [-1, 1]

// --- access ------------------------------------------------------------------------------------

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text) {
  $("#status").textContent = text;
}

// --- the form ----------------------------------------------------------------------------------

function runSpecs() {
  return [...document.querySelectorAll(".run-spec")].map((row) => ({
    model: $("[name=model]", row).value,
    sampler: $("[name=sampler]", row).value,
    steps: Number($("[name=steps]", row).value),
    guidance: Number($("[name=guidance]", row).value),
    guidance_method: $("[name=guidance_method]", row).value,
  }));
}

function addRunSpec(spec) {
  const rows = document.querySelectorAll(".run-spec");
  if (rows.length >= MAX_RUNS) return;
  const last = rows[rows.length - 1];
  const row = last.cloneNode(true);
  row.dataset.run = String(rows.length);
  for (const name of ["model", "sampler", "guidance_method"]) $(`[name=${name}]`, row).value = $(`[name=${name}]`, last).value;
  if (spec) fillRunSpec(row, spec);
  $("#runs-spec").appendChild(row);
  syncRunButtons();
}

function fillRunSpec(row, spec) {
  row.dataset.touched = "1"; // the link's values win over the model's defaults
  if (spec.model) {
    row.dataset.model = spec.model; // chosen once GET /models has filled the list
    if (modelById(spec.model)) $("[name=model]", row).value = spec.model;
  }
  if (spec.sampler) $("[name=sampler]", row).value = spec.sampler;
  if (spec.steps) $("[name=steps]", row).value = spec.steps;
  if (spec.guidance !== undefined && spec.guidance !== "") $("[name=guidance]", row).value = spec.guidance;
  if (spec.guidance_method) $("[name=guidance_method]", row).value = spec.guidance_method;
}

// --- models ------------------------------------------------------------------------------------

function modelById(id) {
  return models.find((m) => m.id === id);
}

function rowModel(row) {
  return modelById($("[name=model]", row).value);
}

// A student with guidance distilled into it takes guidance 1 only: the field shows it and stays locked.
function lockGuidance(row) {
  const model = rowModel(row);
  const input = $("[name=guidance]", row);
  const distilled = Boolean(model && model.distilled_guidance !== null && model.distilled_guidance !== 1);
  input.disabled = distilled;
  input.title = distilled ? `guidance ${model.distilled_guidance} is distilled into ${model.id}` : "";
  if (distilled) input.value = "1";
  // Autoguidance needs the model's guide network; a distilled student is guided by neither.
  const method = $("[name=guidance_method]", row);
  const guided = Boolean(model && model.guide);
  $("option[value=autoguidance]", method).disabled = !guided;
  if (!guided) method.value = "classifier-free";
  method.disabled = distilled;
  method.title = model && !guided ? `${model.id} has no guide network` : "";
}

function showModelDefaults(row) {
  const model = rowModel(row);
  if (!model) return;
  $("[name=sampler]", row).value = model.sampler;
  $("[name=steps]", row).value = String(model.steps);
  $("[name=guidance]", row).value = String(model.guidance);
  $("[name=guidance_method]", row).value = model.guidance_method;
  lockGuidance(row);
}

function fillModels(row) {
  const select = $("[name=model]", row);
  const wanted = row.dataset.model || select.value;
  select.replaceChildren(
    ...models.map((m) => {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      return option;
    }),
  );
  if (wanted && modelById(wanted)) select.value = wanted;
  else if (wanted) setStatus(`this server has no model ${wanted}; using ${select.value}`);
  if (row.dataset.touched) lockGuidance(row);
  else showModelDefaults(row); // what the user has not set shows the chosen model's card
}

async function loadModels() {
  try {
    const response = await fetch("/models", { headers: authHeaders() });
    if (!response.ok) return; // loadSchedule says why (an API key, say)
    models = (await response.json()).data;
  } catch {
    return;
  }
  document.querySelectorAll(".run-spec").forEach(fillModels);
  document.dispatchEvent(new Event("models-loaded")); // edit.js fills its own model lists
}

function syncRunButtons() {
  const count = document.querySelectorAll(".run-spec").length;
  $("#add-run").disabled = count >= MAX_RUNS;
  $("#remove-run").disabled = count <= 1;
}

function common() {
  if ($("#seed").value === "") {
    const word = new Uint32Array(1);
    crypto.getRandomValues(word);
    $("#seed").value = String(word[0] % 2 ** 31);
  }
  return {
    class: $("#class").value,
    n: Number($("#n").value),
    seed: Number($("#seed").value),
    preview_every: Number($("#preview_every").value) || 1,
  };
}

function streamQuery(base, spec) {
  const q = new URLSearchParams({
    ...(spec.model ? { model: spec.model } : {}),
    class: base.class,
    n: String(base.n),
    seed: String(base.seed),
    sampler: spec.sampler,
    guidance: String(spec.guidance),
    guidance_method: spec.guidance_method,
    preview_every: String(base.preview_every),
  });
  if (spec.sampler !== "ddpm") q.set("steps", String(spec.steps)); // ddpm always runs every step
  return q;
}

// The page's own URL carries the parameters, so a link reruns the same generation.
function writeUrl(base, specs) {
  const q = new URLSearchParams({ class: base.class, n: String(base.n), seed: String(base.seed) });
  if (specs.every((s) => s.model)) q.set("model", specs.map((s) => s.model).join(","));
  q.set("sampler", specs.map((s) => s.sampler).join(","));
  q.set("steps", specs.map((s) => s.steps).join(","));
  q.set("guidance", specs.map((s) => s.guidance).join(","));
  q.set("guidance_method", specs.map((s) => s.guidance_method).join(","));
  q.set("preview_every", String(base.preview_every));
  history.replaceState(null, "", "/?" + q.toString());
}

function readUrl() {
  const q = new URLSearchParams(location.search);
  if (!q.has("class")) return false;
  const cls = q.get("class");
  const index = /^\d+$/.test(cls) ? Number(cls) : CLASSES.indexOf(cls.toLowerCase());
  if (index >= 0 && index < CLASSES.length) $("#class").value = CLASSES[index];
  for (const name of ["n", "seed", "preview_every"]) if (q.has(name)) $("#" + name).value = q.get(name);
  const samplers = (q.get("sampler") || "").split(",").filter(Boolean);
  const steps = (q.get("steps") || "").split(",");
  const guidance = (q.get("guidance") || "").split(",");
  const methods = (q.get("guidance_method") || "").split(",");
  const chosen = (q.get("model") || "").split(",");
  samplers.slice(0, MAX_RUNS).forEach((sampler, i) => {
    const model = chosen[i] || chosen[0];
    const spec = {
      model,
      sampler,
      steps: steps[i] || steps[0],
      guidance: guidance[i] || guidance[0],
      guidance_method: methods[i] || methods[0],
    };
    if (i === 0) fillRunSpec($(".run-spec"), spec);
    else addRunSpec(spec);
  });
  return true;
}

// --- running ----------------------------------------------------------------------------------

function cancelAll(reason) {
  let stopped = 0;
  for (const run of runs) {
    if (run.source && !run.finished) {
      run.source.close(); // the server sees the disconnect and cancels the job within one tick
      run.finished = true;
      $(".step-text", run.el).textContent = reason || "cancelled";
      stopped += 1;
    }
  }
  $("#cancel").disabled = true;
  return stopped;
}

function generate() {
  cancelAll("replaced");
  const base = common();
  const specs = runSpecs();
  writeUrl(base, specs);
  $("#runs").replaceChildren();
  runs = specs.map((spec, i) => startRun(base, spec, i));
  $("#cancel").disabled = false;
  setStatus(`running ${runs.length} generation${runs.length > 1 ? "s" : ""} of ${base.class}, seed ${base.seed}`);
}

// One run's view (the template: progress, x_t and x0 at the step the timeline shows, the finals);
// generations and edits both fill it, through onStep and their own "done".
function runView(title) {
  const el = $("#run-template").content.firstElementChild.cloneNode(true);
  $(".run-title", el).textContent = title;
  const run = { el, frames: [], finished: false, followLive: true, source: null };
  const slider = $(".timeline input", el);
  slider.addEventListener("input", () => {
    run.followLive = Number(slider.value) === run.frames.length - 1;
    showFrame(run, Number(slider.value));
  });
  return run;
}

function startRun(base, spec, i) {
  const label = spec.sampler === "ddpm" ? "ddpm, 1000 steps" : `${spec.sampler}, ${spec.steps} steps`;
  const who = models.length > 1 && spec.model ? `${spec.model}: ` : "";
  const method = spec.guidance_method === "autoguidance" ? " (autoguidance)" : "";
  const run = Object.assign(runView(`Run ${i + 1}: ${who}${label}, guidance ${spec.guidance}${method}`), { spec, base });
  const el = run.el;
  $("#runs").appendChild(el);
  const query = streamQuery(base, spec);
  const key = apiKey();
  if (key) query.set("api_key", key); // EventSource cannot set headers; the server strips it from the URL
  const source = new EventSource("/generate/stream?" + query.toString());
  run.source = source;
  source.addEventListener("start", (e) => {
    const data = JSON.parse(e.data);
    $(".step-text", el).textContent = `accepted (job ${data.job})`;
  });
  source.addEventListener("queued", (e) => {
    const data = JSON.parse(e.data);
    $(".step-text", el).textContent = `queued: position ${data.position}, starts in about ${data.estimated_start_s.toFixed(1)} s`;
  });
  source.addEventListener("step", (e) => onStep(run, JSON.parse(e.data)));
  source.addEventListener("done", (e) => onDone(run, JSON.parse(e.data)));
  source.addEventListener("error", (e) => {
    // An "error" event from the server carries data; a dropped connection does not. Either way stop:
    // EventSource would otherwise reconnect and start the generation again.
    const message = e.data ? JSON.parse(e.data).error.message : "the connection was lost";
    if (!run.finished) $(".step-text", el).textContent = "error: " + message;
    run.finished = true;
    source.close();
    checkAllDone();
  });
  return run;
}

function onStep(run, step) {
  const el = run.el;
  $("progress", el).value = (step.index + 1) / step.total;
  const sigma = schedule ? schedule.sigma[step.t] : null;
  const sigmaText = sigma === null ? "" : ` · sigma ${sigma < 100 ? sigma.toFixed(3) : sigma.toExponential(2)}`;
  $(".step-text", el).textContent = `step ${step.index + 1}/${step.total} · t ${step.t}${sigmaText}`;
  if (step.x0_png) {
    run.frames.push({ index: step.index, total: step.total, t: step.t, x0: step.x0_png, xt: step.xt_png });
    const slider = $(".timeline input", el);
    slider.max = String(run.frames.length - 1);
    slider.disabled = false;
    if (run.followLive) {
      slider.value = slider.max;
      showFrame(run, run.frames.length - 1);
    }
  }
}

function showFrame(run, i) {
  const frame = run.frames[i];
  if (!frame) return;
  $(".x0", run.el).src = "data:image/png;base64," + frame.x0;
  $(".xt", run.el).src = "data:image/png;base64," + frame.xt;
  $(".timeline output", run.el).textContent = `${frame.index + 1}/${frame.total} (t ${frame.t})`;
}

function onDone(run, body) {
  run.finished = true;
  run.source.close();
  const el = run.el;
  $("progress", el).value = 1;
  $(".step-text", el).textContent = `done in ${(body.timings.total_ms / 1000).toFixed(2)} s`;
  const name = fileName(body.params.class_name);
  for (const image of body.images) $(".finals", el).appendChild(finalFigure(image, body.params.class_name));
  const grid = document.createElement("button");
  grid.type = "button";
  grid.textContent = "Download the grid";
  grid.addEventListener("click", () => downloadGrid(body, name));
  $(".downloads", el).appendChild(grid);
  if (!forwardImage && body.images.length) useForForward("data:image/png;base64," + body.images[0].png);
  checkAllDone();
}

function fileName(className) {
  return className.replace(/[^a-z0-9]+/g, "-");
}

function actionButton(text, label, title, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = text;
  button.setAttribute("aria-label", label);
  button.title = title;
  button.addEventListener("click", onClick);
  return button;
}

// A final image (GET /generate's {seed, png}) with its download link and what can be done with it: the
// forward process, the edit panel, the interpolation strip (the last two in edit.js).
function finalFigure(image, className) {
  const src = "data:image/png;base64," + image.png;
  const what = `${className}, seed ${image.seed}`;
  const figure = document.createElement("figure");
  const link = document.createElement("a");
  link.href = src;
  link.download = `${fileName(className)}_seed${image.seed}.png`;
  link.title = "download this PNG";
  const img = document.createElement("img");
  img.src = src;
  img.width = 84;
  img.height = 84;
  img.alt = what;
  img.className = "final";
  link.appendChild(img);
  const picture = { png: image.png, className, seed: image.seed };
  const caption = document.createElement("figcaption");
  caption.textContent = `seed ${image.seed} `;
  const actions = document.createElement("span");
  actions.className = "actions";
  actions.append(
    actionButton("diffuse", `diffuse ${what}`, "take this image through the forward process below", () => useForForward(src)),
    actionButton("edit", `edit ${what}`, "load this image into the edit panel", () => editPicture(picture)),
    actionButton("interpolate", `interpolate ${what}`, "pick this image as an end of the interpolation strip", () =>
      pickForInterpolation(picture),
    ),
  );
  for (const button of actions.children) button.classList.add(`${button.textContent}-action`);
  caption.appendChild(actions);
  figure.append(link, caption);
  return figure;
}

function checkAllDone() {
  if (runs.every((r) => r.finished)) {
    $("#cancel").disabled = true;
    setStatus("finished");
  }
}

async function downloadGrid(body, name) {
  const images = await Promise.all(body.images.map((im) => loadImage("data:image/png;base64," + im.png)));
  const cols = Math.ceil(Math.sqrt(images.length));
  const rows = Math.ceil(images.length / cols);
  const canvas = document.createElement("canvas");
  canvas.width = cols * 30 + 2;
  canvas.height = rows * 30 + 2;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  images.forEach((img, i) => ctx.drawImage(img, 2 + (i % cols) * 30, 2 + Math.floor(i / cols) * 30));
  const link = document.createElement("a");
  link.href = canvas.toDataURL("image/png");
  link.download = `${name}_seed${body.params.seed}_grid.png`;
  link.click();
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = reject;
    img.src = src;
  });
}

function curlCommand() {
  const base = common();
  const specs = runSpecs();
  const origin = location.origin;
  const key = apiKey() ? ` -H "X-API-Key: $FASHION_API_KEY"` : "";
  return specs.map((spec) => `curl -N${key} '${origin}/generate/stream?${streamQuery(base, spec).toString()}'`).join("\n");
}

// --- the forward process ------------------------------------------------------------------------

function mulberry32(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const NOISE = (() => { // one fixed eps ~ N(0, I), so the slider moves along one path
  const random = mulberry32(7);
  const eps = new Float32Array(784);
  for (let i = 0; i < 784; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - random()));
    const a = 2 * Math.PI * random();
    eps[i] = r * Math.cos(a);
    eps[i + 1] = r * Math.sin(a);
  }
  return eps;
})();

async function useForForward(src) {
  const img = await loadImage(src);
  if (img.width !== 28 || img.height !== 28) {
    setStatus(`the forward process takes 28x28 images; this one is ${img.width}x${img.height}`);
    return;
  }
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 28;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const pixels = ctx.getImageData(0, 0, 28, 28).data;
  forwardImage = new Float32Array(784);
  for (let i = 0; i < 784; i++) forwardImage[i] = pixels[4 * i] / 127.5 - 1; // the red channel of a grey PNG
  drawArray($("#fwd-x0"), forwardImage);
  updateForward();
}

function drawArray(canvas, values) {
  const small = document.createElement("canvas");
  small.width = small.height = 28;
  const sctx = small.getContext("2d");
  const image = sctx.createImageData(28, 28);
  for (let i = 0; i < 784; i++) {
    const v = Math.round((Math.max(-1, Math.min(1, values[i])) + 1) * 127.5);
    image.data.set([v, v, v, 255], 4 * i);
  }
  sctx.putImageData(image, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
}

function updateForward() {
  const t = Number($("#fwd-t").value);
  $("#fwd-t-out").textContent = String(t);
  drawSchedule();
  if (!schedule) return;
  const ab = schedule.alpha_bar[t];
  $("#fwd-caption").textContent = `x_t at t ${t}: alpha_bar ${ab.toFixed(4)}, SNR ${Math.exp(schedule.log_snr[t]).toPrecision(3)}`;
  if (!forwardImage) return;
  const a = Math.sqrt(ab);
  const s = Math.sqrt(1 - ab);
  const xt = forwardImage.map((x0, i) => a * x0 + s * NOISE[i]); // Ho et al. 2020, eq. 4
  drawArray($("#fwd-xt"), xt);
}

function drawSchedule() {
  const canvas = $("#schedule-chart");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!schedule) return;
  const { width, height } = canvas;
  const T = schedule.T;
  const lo = Math.min(...schedule.log_snr);
  const hi = Math.max(...schedule.log_snr);
  const plot = (values, min, max, dash) => {
    ctx.setLineDash(dash);
    ctx.beginPath();
    values.forEach((v, t) => {
      const x = (t / (T - 1)) * (width - 1);
      const y = height - 1 - ((v - min) / (max - min)) * (height - 2);
      if (t === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  };
  ctx.strokeStyle = "#1f6feb";
  plot(schedule.alpha_bar, 0, 1, []);
  ctx.strokeStyle = "#bf3989";
  plot(schedule.log_snr, lo, hi, [4, 3]);
  const t = Number($("#fwd-t").value);
  ctx.setLineDash([]);
  ctx.strokeStyle = "#888";
  ctx.beginPath();
  ctx.moveTo((t / (T - 1)) * (width - 1), 0);
  ctx.lineTo((t / (T - 1)) * (width - 1), height);
  ctx.stroke();
}

// --- wiring -------------------------------------------------------------------------------------

async function loadSchedule() {
  try {
    const response = await fetch("/schedule", { headers: authHeaders() });
    if (!response.ok) {
      setStatus(response.status === 401 ? "this server needs an API key (below)" : `schedule: HTTP ${response.status}`);
      return;
    }
    schedule = await response.json();
    $("#fwd-t").max = String(schedule.T - 1);
    updateForward();
  } catch (err) {
    setStatus("the server did not answer: " + err);
  }
}

function init() {
  for (const name of CLASSES) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("#class").appendChild(option);
  }
  $("#api-key").value = apiKey();
  $("#api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, $("#api-key").value.trim());
    loadSchedule();
    loadModels();
  });
  // Choosing a model shows its card's defaults; a value the user sets stays through the list's arrival.
  $("#runs-spec").addEventListener("change", (e) => {
    const row = e.target.closest(".run-spec");
    if (!row) return;
    if (e.target.name === "model") showModelDefaults(row);
    row.dataset.touched = "1";
  });
  $("#runs-spec").addEventListener("input", (e) => {
    const row = e.target.closest(".run-spec");
    if (row && e.target.name !== "model") row.dataset.touched = "1";
  });
  $("#controls").addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  $("#add-run").addEventListener("click", () => addRunSpec());
  $("#remove-run").addEventListener("click", () => {
    const rows = document.querySelectorAll(".run-spec");
    if (rows.length > 1) rows[rows.length - 1].remove();
    syncRunButtons();
  });
  $("#cancel").addEventListener("click", () => {
    const stopped = cancelAll();
    setStatus(stopped ? `cancelled ${stopped} run${stopped > 1 ? "s" : ""}` : "nothing to cancel");
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    for (const id of ["#cancel", "#edit-cancel", "#interp-cancel"]) if (!$(id).disabled) $(id).click();
  });
  $("#curl").addEventListener("click", async () => {
    const command = curlCommand();
    try {
      await navigator.clipboard.writeText(command);
      setStatus("copied: " + command);
    } catch {
      setStatus(command); // no clipboard (plain http): show it to copy by hand
    }
  });
  $("#fwd-t").addEventListener("input", updateForward);
  $("#fwd-upload").addEventListener("change", () => {
    const file = $("#fwd-upload").files[0];
    if (file) useForForward(URL.createObjectURL(file));
  });
  syncRunButtons();
  const fromLink = readUrl();
  Promise.all([loadSchedule(), loadModels()]).then(() => {
    if (fromLink) generate();
  });
}

init();
