// The edit panel and the interpolation strip (POST /edits/stream, POST /interpolations/stream): a
// picture taken from the page or uploaded, a mask painted over it at the picture's own pixel size,
// the redraw streamed step by step in a run view; frames between two seeds or two pictures.
// Loaded after app.js, whose helpers ($, authHeaders, runView, onStep, finalFigure, ...) it uses.
"use strict";

const PREVIEW_SIZE = 280; // CSS pixels of the picture's longer side on the page
const OVERLAY = [255, 0, 170, 130]; // the painted region: magenta, translucent

const editor = {
  picture: null, // {data: base64 or data URL as sent, width, height, className, seed, name}
  mask: null, // Uint8Array(width * height): 1 where the model redraws
  overlay: null, // ImageData of #edit-mask
  stroke: null, // the pointer's drag: {tool, x, y} where it started or last was (picture pixels)
  controller: null, // AbortController of the edit in flight
  run: null, // its run view
};
const slots = { a: null, b: null }; // the interpolation's two pictures: {png, className, seed}
let interpController = null;

// --- server-sent events over a POST -------------------------------------------------------------

// EventSource only GETs, so the POST streams are read with fetch: blocks separated by a blank line,
// "event:" and "data:" lines (JSON here). A non-200 answer is the API's error shape.
async function postStream(path, body, handlers, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      message = (await response.json()).error.message;
    } catch {
      // not the API's error shape: the status says enough
    }
    throw new Error(message);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        if (colon === 0) continue; // a comment (keep-alive)
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length && handlers[event]) handlers[event](JSON.parse(data.join("\n")));
    }
  }
}

function streamHandlers(el, onDoneEvent) {
  const text = $(".step-text", el);
  return {
    start: (data) => (text.textContent = `accepted (job ${data.job})`),
    queued: (data) =>
      (text.textContent = `queued: position ${data.position}, starts in about ${data.estimated_start_s.toFixed(1)} s`),
    done: onDoneEvent,
    error: (data) => {
      throw new Error(data.error.message);
    },
  };
}

function fillSelect(select, values, labels = values) {
  select.replaceChildren(
    ...values.map((value, i) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = labels[i];
      return option;
    }),
  );
}

function randomSeed(input) {
  if (input.value === "") {
    const word = new Uint32Array(1);
    crypto.getRandomValues(word);
    input.value = String(word[0] % 2 ** 31);
  }
  return Number(input.value);
}

// --- the picture and its mask -------------------------------------------------------------------

// Loads a picture into the panel: the canvases take its own pixel size (the mask the server gets must
// have it), shown enlarged to PREVIEW_SIZE on its longer side.
async function setPicture(picture, src) {
  const img = await loadImage(src);
  const { width, height } = img;
  editor.picture = { ...picture, width, height };
  const scale = PREVIEW_SIZE / Math.max(width, height);
  for (const canvas of [$("#edit-picture"), $("#edit-mask")]) {
    canvas.width = width;
    canvas.height = height;
    canvas.style.width = `${Math.round(width * scale)}px`;
    canvas.style.height = `${Math.round(height * scale)}px`;
  }
  const ctx = $("#edit-picture").getContext("2d");
  ctx.drawImage(img, 0, 0);
  editor.mask = new Uint8Array(width * height);
  editor.overlay = new ImageData(width, height);
  $("#edit-source").textContent = picture.className
    ? `${picture.className}, seed ${picture.seed} (${width}x${height})`
    : `${picture.name} (${width}x${height})`;
  $("#edit-class").value = picture.className || "auto";
  $("#edit-invert").value = picture.className ? "no" : "auto"; // the page's images are the model's already
  $("#edit-go").disabled = false;
  maskChanged(0, 0, width, height);
}

// From the page: one click on a final image's "edit".
function editPicture(picture) {
  setPicture({ data: picture.png, className: picture.className, seed: picture.seed }, "data:image/png;base64," + picture.png);
  $("#edit").scrollIntoView({ block: "start" });
}

function uploadPicture(file) {
  const reader = new FileReader();
  reader.onload = () => setPicture({ data: reader.result, name: file.name }, reader.result).catch(() => {
    $("#edit-status").textContent = `${file.name}: not a picture this browser can read`;
  });
  reader.readAsDataURL(file);
}

// Redraws the overlay where the mask changed (a dirty rectangle: pictures can be large), and says what
// the run will be.
function maskChanged(x0, y0, x1, y1) {
  const { width, height } = editor.picture;
  const [r, g, b, a] = OVERLAY;
  const data = editor.overlay.data;
  for (let y = Math.max(0, y0); y < Math.min(height, y1); y++) {
    for (let x = Math.max(0, x0); x < Math.min(width, x1); x++) {
      const i = y * width + x;
      data.set(editor.mask[i] ? [r, g, b, a] : [0, 0, 0, 0], 4 * i);
    }
  }
  const ctx = $("#edit-mask").getContext("2d");
  ctx.putImageData(editor.overlay, 0, 0, x0, y0, x1 - x0, y1 - y0);
  const marked = editor.mask.reduce((sum, m) => sum + m, 0);
  const strength = $("#edit-strength");
  if (!strength.dataset.touched) {
    strength.value = marked ? "1" : "0.6"; // the server's defaults: 1 with a mask, 0.6 for a variation
    showStrength();
  }
  const share = ((100 * marked) / editor.mask.length).toFixed(0);
  $("#edit-mode").textContent = marked
    ? `Inpainting: ${share}% of the picture is redrawn, the rest kept.`
    : "Variation: nothing painted, the whole picture is redrawn.";
}

function redrawAll() {
  maskChanged(0, 0, editor.picture.width, editor.picture.height);
}

function setRect(x0, y0, x1, y1, value) {
  const { width } = editor.picture;
  for (let y = y0; y < y1; y++) editor.mask.fill(value, y * width + x0, y * width + x1);
}

function tool() {
  return $("input[name=mask-tool]:checked").value;
}

// Pointer position -> picture pixels (continuous).
function pictureXY(event) {
  const canvas = $("#edit-mask");
  const rect = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) / rect.width) * canvas.width,
    y: ((event.clientY - rect.top) / rect.height) * canvas.height,
  };
}

// A round stamp of the brush's diameter (in model pixels: a 28th of the longer side), along the segment
// from the last point, so a fast stroke leaves no gaps.
function brushTo(from, to, value) {
  const { width, height } = editor.picture;
  const d = Number($("#brush-size").value) * (Math.max(width, height) / 28);
  const r = d / 2;
  const steps = Math.max(1, Math.ceil(Math.hypot(to.x - from.x, to.y - from.y) / Math.max(0.5, r / 2)));
  let box = [width, height, 0, 0];
  for (let s = 0; s <= steps; s++) {
    const cx = from.x + ((to.x - from.x) * s) / steps;
    const cy = from.y + ((to.y - from.y) * s) / steps;
    const x0 = Math.max(0, Math.floor(cx - r));
    const y0 = Math.max(0, Math.floor(cy - r));
    const x1 = Math.min(width, Math.ceil(cx + r));
    const y1 = Math.min(height, Math.ceil(cy + r));
    for (let y = y0; y < y1; y++) {
      for (let x = x0; x < x1; x++) {
        const inside = Math.hypot(x + 0.5 - cx, y + 0.5 - cy) <= r;
        const under = x === Math.floor(cx) && y === Math.floor(cy); // a 1-pixel brush still paints
        if (inside || under) editor.mask[y * width + x] = value;
      }
    }
    box = [Math.min(box[0], x0), Math.min(box[1], y0), Math.max(box[2], x1), Math.max(box[3], y1)];
  }
  if (box[2] > box[0] && box[3] > box[1]) maskChanged(...box);
}

// A box covers every pixel the drag touched, both corners included.
function boxPixels(a, b) {
  const { width, height } = editor.picture;
  const clamp = (v, hi) => Math.max(0, Math.min(hi - 1, Math.floor(v)));
  return [
    clamp(Math.min(a.x, b.x), width),
    clamp(Math.min(a.y, b.y), height),
    clamp(Math.max(a.x, b.x), width) + 1,
    clamp(Math.max(a.y, b.y), height) + 1,
  ];
}

// The box being dragged, drawn over the overlay; the last one's area is restored from the overlay first
// (the mask itself changes only when the drag ends).
function showBox(stroke, at) {
  const ctx = $("#edit-mask").getContext("2d");
  if (stroke.shown) {
    const [x0, y0, x1, y1] = stroke.shown;
    ctx.clearRect(x0, y0, x1 - x0, y1 - y0);
    ctx.putImageData(editor.overlay, 0, 0, x0, y0, x1 - x0, y1 - y0);
  }
  const [x0, y0, x1, y1] = (stroke.shown = boxPixels(stroke.start, at));
  ctx.fillStyle = "rgba(255, 0, 170, 0.35)";
  ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
}

function onPointerDown(event) {
  if (!editor.picture || event.button !== 0) return;
  event.preventDefault();
  $("#edit-mask").setPointerCapture(event.pointerId);
  const at = pictureXY(event);
  editor.stroke = { tool: tool(), start: at, last: at };
  if (editor.stroke.tool === "box") showBox(editor.stroke, at);
  else brushTo(at, at, editor.stroke.tool === "brush" ? 1 : 0);
}

function onPointerMove(event) {
  const stroke = editor.stroke;
  if (!stroke) return;
  const at = pictureXY(event);
  if (stroke.tool === "box") showBox(stroke, at);
  else brushTo(stroke.last, at, stroke.tool === "brush" ? 1 : 0);
  stroke.last = at;
}

function onPointerUp(event) {
  const stroke = editor.stroke;
  if (!stroke) return;
  editor.stroke = null;
  if (stroke.tool !== "box") return;
  const [x0, y0, x1, y1] = boxPixels(stroke.start, pictureXY(event));
  setRect(x0, y0, x1, y1, 1);
  redrawAll();
}

// For keyboards, and a quick start: halves and the centre.
function presetMask(which) {
  const { width: w, height: h } = editor.picture;
  const rects = {
    top: [0, 0, w, Math.round(h / 2)],
    bottom: [0, Math.round(h / 2), w, h],
    left: [0, 0, Math.round(w / 2), h],
    right: [Math.round(w / 2), 0, w, h],
    centre: [Math.round(w / 4), Math.round(h / 4), Math.round((3 * w) / 4), Math.round((3 * h) / 4)],
  };
  editor.mask.fill(0);
  setRect(...rects[which], 1);
  redrawAll();
}

// The mask as the server takes it: a PNG of the picture's size, white where the model redraws.
function maskPng() {
  const { width, height } = editor.picture;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  for (let i = 0; i < editor.mask.length; i++) {
    const v = editor.mask[i] ? 255 : 0;
    image.data.set([v, v, v, 255], 4 * i);
  }
  ctx.putImageData(image, 0, 0);
  return canvas.toDataURL("image/png").split(",", 2)[1];
}

function showStrength() {
  $("#edit-strength-out").textContent = Number($("#edit-strength").value).toFixed(2);
}

// --- running an edit ----------------------------------------------------------------------------

function editBody() {
  const body = {
    image: editor.picture.data,
    n: Number($("#edit-n").value),
    seed: randomSeed($("#edit-seed")),
    strength: Number($("#edit-strength").value),
    invert: $("#edit-invert").value,
    preview_every: 1,
  };
  if (editor.mask.some((m) => m)) body.mask = maskPng();
  if ($("#edit-class").value !== "auto") body.class = $("#edit-class").value; // auto: the classifier reads it
  if ($("#edit-model").value) body.model = $("#edit-model").value;
  const sampler = $("#edit-sampler").value;
  body.sampler = sampler;
  if (sampler !== "ddpm") body.steps = Number($("#edit-steps").value);
  return body;
}

async function runEdit() {
  cancelEdit("replaced");
  const body = editBody();
  const what = body.mask ? "Inpainting" : "Variation";
  const cls = body.class || "class read from the picture";
  const run = runView(`${what}: ${cls}, ${body.sampler}, strength ${body.strength.toFixed(2)}, seed ${body.seed}`);
  const applied = document.createElement("div");
  applied.className = "applied";
  run.el.insertBefore(applied, $(".finals", run.el));
  $("#edit-result").replaceChildren(run.el);
  editor.run = run;
  editor.controller = new AbortController();
  $("#edit-cancel").disabled = false;
  $("#edit-status").textContent = `running: ${what.toLowerCase()} of ${editor.picture.width}x${editor.picture.height}`;
  const handlers = streamHandlers(run.el, (done) => onEditDone(run, done));
  handlers.step = (step) => onStep(run, step);
  try {
    await postStream("/edits/stream", body, handlers, editor.controller.signal);
    if (!run.finished) throw new Error("the stream ended before its answer");
  } catch (err) {
    if (!run.finished) {
      $(".step-text", run.el).textContent = "error: " + err.message;
      $("#edit-status").textContent = "error: " + err.message;
    }
    run.finished = true;
  } finally {
    if (editor.run === run) $("#edit-cancel").disabled = true;
  }
}

function onEditDone(run, body) {
  run.finished = true;
  const el = run.el;
  $("progress", el).value = 1;
  const inverted = body.inverted ? ", inverted" : "";
  $(".run-title", el).textContent =
    `${body.kind === "inpaint" ? "Inpainting" : "Variation"}: ${body.params.class_name}, ${body.params.sampler}, ` +
    `strength ${body.strength.toFixed(2)}, seed ${body.params.seed}`;
  $(".step-text", el).textContent =
    `done in ${(body.timings.total_ms / 1000).toFixed(2)} s · ${body.evaluations} network evaluations per image`;
  const applied = $(".applied", el);
  applied.append(appliedFigure(body.input_png, "input-png", `the input as mapped (28x28${inverted})`));
  if (body.mask_png) applied.append(appliedFigure(body.mask_png, "mask-png", "the mask as applied (white: redrawn)"));
  for (const image of body.images) $(".finals", el).appendChild(finalFigure(image, body.params.class_name));
  $("#edit-status").textContent = "finished";
}

function appliedFigure(png, className, caption) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + png;
  img.className = className;
  img.width = img.height = 84;
  img.alt = caption;
  const text = document.createElement("figcaption");
  text.textContent = caption;
  figure.append(img, text);
  return figure;
}

function cancelEdit(reason) {
  if (!editor.controller || !editor.run || editor.run.finished) return false;
  editor.run.finished = true;
  editor.controller.abort(); // the server sees the disconnect and cancels the job within one tick
  $(".step-text", editor.run.el).textContent = reason || "cancelled";
  $("#edit-cancel").disabled = true;
  return true;
}

// --- the interpolation strip ----------------------------------------------------------------------

function pickForInterpolation(picture) {
  const slot = !slots.a ? "a" : !slots.b ? "b" : null;
  if (slot) slots[slot] = picture;
  else [slots.a, slots.b] = [slots.b, picture]; // both taken: the newest pair
  for (const name of ["a", "b"]) {
    const img = $(`#interp-image-${name}`);
    const chosen = slots[name];
    if (chosen) img.src = "data:image/png;base64," + chosen.png;
    else img.removeAttribute("src");
    img.alt = chosen ? `image ${name.toUpperCase()}: ${chosen.className}, seed ${chosen.seed}` : `image ${name.toUpperCase()}: none picked yet`;
  }
  $("#interp-class").value = picture.className;
  $("input[name=interp-kind][value=images]").checked = true;
  syncInterpKind();
  $("#interp-status").textContent = slots.b ? "two images picked" : "one image picked: pick another";
}

function interpKind() {
  return $("input[name=interp-kind]:checked").value;
}

function syncInterpKind() {
  const seeds = interpKind() === "seeds";
  $("#interp-seed-a").disabled = $("#interp-seed-b").disabled = !seeds;
  $("#interp-strength").disabled = seeds;
  $("#interp-sampler").disabled = !seeds; // between images: DDIM, for its inversion
}

function interpBody() {
  const body = {
    class: $("#interp-class").value,
    frames: Number($("#interp-frames").value),
    steps: Number($("#interp-steps").value),
    preview_every: 1,
  };
  if ($("#interp-model").value) body.model = $("#interp-model").value;
  if (interpKind() === "seeds") {
    body.seeds = [Number($("#interp-seed-a").value), Number($("#interp-seed-b").value)];
    body.sampler = $("#interp-sampler").value;
  } else {
    body.images = [slots.a.png, slots.b.png];
    body.strength = Number($("#interp-strength").value);
    body.invert = "no"; // the page's images are the model's already
  }
  return body;
}

async function runInterpolation() {
  if (interpKind() === "images" && !(slots.a && slots.b)) {
    $("#interp-status").textContent = "pick two images first (their interpolate button)";
    return;
  }
  if (interpController) interpController.abort();
  const controller = (interpController = new AbortController());
  const body = interpBody();
  const el = $("#interp-result");
  el.hidden = false;
  $("progress", el).value = 0;
  $(".step-text", el).textContent = body.seeds ? "waiting" : "inverting the two images";
  $(".interp-frames", el).replaceChildren();
  $(".interp-gif", el).hidden = true;
  $(".interp-preview", el).hidden = true;
  const between = body.seeds ? `seeds ${body.seeds[0]} and ${body.seeds[1]}` : "the two images";
  $("#interp-status").textContent = `running: ${body.frames} frames of ${body.class} between ${between}`;
  $("#interp-cancel").disabled = false;
  let finished = false;
  const handlers = streamHandlers(el, (done) => {
    finished = true;
    showInterpolation(done, body, between);
  });
  handlers.step = (step) => {
    $("progress", el).value = (step.index + 1) / step.total;
    $(".step-text", el).textContent = `step ${step.index + 1}/${step.total} · t ${step.t}`;
    if (step.x0_png) {
      const preview = $(".interp-preview", el);
      preview.src = "data:image/png;base64," + step.x0_png;
      preview.hidden = false;
    }
  };
  try {
    await postStream("/interpolations/stream", body, handlers, controller.signal);
    if (!finished) throw new Error("the stream ended before its answer");
  } catch (err) {
    const message = controller.signal.aborted ? "cancelled" : "error: " + err.message;
    if (!finished) $(".step-text", el).textContent = message;
    $("#interp-status").textContent = message;
  } finally {
    if (interpController === controller) {
      interpController = null;
      $("#interp-cancel").disabled = true;
    }
  }
}

function showInterpolation(done, body, between) {
  const el = $("#interp-result");
  $("progress", el).value = 1;
  $(".step-text", el).textContent = `done · ${done.evaluations} network evaluations per frame`;
  $(".interp-preview", el).hidden = true;
  const strip = $(".interp-frames", el);
  done.frames.forEach((frame, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + frame.png;
    img.width = img.height = 56;
    img.className = "frame";
    img.alt = `frame ${i + 1} of ${done.frames.length}`;
    const caption = document.createElement("figcaption");
    caption.textContent = String(i + 1);
    figure.append(img, caption);
    strip.appendChild(figure);
  });
  const gif = $(".interp-gif", el);
  $("img", gif).src = "data:image/gif;base64," + done.animation_gif;
  $("figcaption", gif).textContent = `${body.class}, between ${between}: there and back`;
  gif.hidden = false;
  $("#interp-status").textContent = "finished";
}

// --- wiring -------------------------------------------------------------------------------------

function fillEditModels() {
  const ids = models.map((m) => m.id);
  for (const select of [$("#edit-model"), $("#interp-model")]) {
    const wanted = select.value;
    fillSelect(select, ids);
    if (ids.includes(wanted)) select.value = wanted;
  }
  showEditDefaults();
}

// The chosen model's card fills what the user has not set.
function showEditDefaults() {
  const model = modelById($("#edit-model").value);
  if (!model) return;
  if (!$("#edit-sampler").dataset.touched) $("#edit-sampler").value = model.sampler;
  for (const id of ["#edit-steps", "#interp-steps"]) if (!$(id).dataset.touched) $(id).value = String(model.steps);
}

function initEdit() {
  fillSelect($("#edit-class"), ["auto", ...CLASSES], ["auto (read from the picture)", ...CLASSES]);
  fillSelect($("#interp-class"), CLASSES);
  document.addEventListener("models-loaded", fillEditModels);
  for (const id of ["#edit-sampler", "#edit-steps", "#interp-steps", "#edit-strength"]) {
    $(id).addEventListener("input", () => ($(id).dataset.touched = "1"));
  }
  $("#edit-model").addEventListener("change", showEditDefaults);
  $("#edit-strength").addEventListener("input", showStrength);
  $("#brush-size").addEventListener("input", () => ($("#brush-size-out").textContent = $("#brush-size").value));
  $("#edit-upload").addEventListener("change", () => {
    const file = $("#edit-upload").files[0];
    if (file) uploadPicture(file);
  });
  const canvas = $("#edit-mask");
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", onPointerUp);
  $("#mask-clear").addEventListener("click", () => {
    if (!editor.picture) return;
    editor.mask.fill(0);
    redrawAll();
  });
  $("#mask-invert").addEventListener("click", () => {
    if (!editor.picture) return;
    editor.mask.forEach((m, i) => (editor.mask[i] = 1 - m));
    redrawAll();
  });
  $("#mask-preset").addEventListener("change", () => {
    if (editor.picture && $("#mask-preset").value) presetMask($("#mask-preset").value);
    $("#mask-preset").value = "";
  });
  $("#edit-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (editor.picture) runEdit();
  });
  $("#edit-cancel").addEventListener("click", () => {
    $("#edit-status").textContent = cancelEdit() ? "cancelled" : "nothing to cancel";
  });
  document.querySelectorAll("input[name=interp-kind]").forEach((r) => r.addEventListener("change", syncInterpKind));
  syncInterpKind();
  $("#interp-form").addEventListener("submit", (e) => {
    e.preventDefault();
    runInterpolation();
  });
  $("#interp-cancel").addEventListener("click", () => interpController && interpController.abort());
  if (models.length) fillEditModels();
}

initEdit();
