// The page at `/`: sends one image to /v1/detect and /v1/classify, draws the boxes over the image and lists the
// top-5 classes. Plain browser JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("upload-form"),
    file: $("file-input"),
    dropZone: $("drop-zone"),
    token: $("token-input"),
    spinner: $("spinner"),
    statusText: $("status-text"),
    error: $("error"),
    threshold: $("threshold"),
    thresholdValue: $("threshold-value"),
    wrap: $("canvas-wrap"),
    canvas: $("canvas"),
    detectSummary: $("detect-summary"),
    detections: $("detections"),
    topK: $("top-k"),
    classifySummary: $("classify-summary"),
  };

  // What is on screen: the picture as the browser decoded it (null when it cannot show the format), the size
  // the server measured (boxes are in its pixels), and every detection the server returned; the slider filters
  // them here, without asking the server again. noDetector: the model cannot detect (not an error).
  const state = { picture: null, width: 0, height: 0, detections: [], noDetector: false, request: 0,
                  controller: null };

  // The server's 404 codes for a task that the loaded model bundle does not do: "not available", not "refused".
  const UNAVAILABLE = { detect: "no_detector", classify: "no_classifier" };

  // ---- colours: one per DET class, as "#rrggbb" so that the list swatch and the box are the same colour.
  function hslToHex(h, s, l) {
    const a = s * Math.min(l, 1 - l);
    const f = (n) => {
      const k = (n + h / 30) % 12;
      const c = l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1));
      return Math.round(255 * c).toString(16).padStart(2, "0");
    };
    return `#${f(0)}${f(8)}${f(4)}`;
  }
  const classColour = (detId) => hslToHex((Number(detId) * 137.508) % 360, 0.9, 0.45);

  // ---- status, spinner, errors
  function setBusy(busy, text) {
    els.spinner.hidden = !busy;
    document.body.setAttribute("aria-busy", busy ? "true" : "false");
    els.statusText.textContent = text;
  }

  function showErrors(lines) {
    els.error.replaceChildren();
    els.error.hidden = lines.length === 0;
    for (const line of lines) {
      const p = document.createElement("p");
      p.textContent = line;
      els.error.append(p);
    }
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} bytes`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  // ---- talking to the server
  // Resolves to {ok: true, body} or {ok: false, message, code}; the message and code are the server's own
  // {"error": {"code", "message"}} when it sent one.
  async function post(path, file, signal) {
    const form = new FormData();
    form.append("image", file, file.name || "image");
    const headers = {};
    const token = els.token.value.trim();
    if (token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(path, { method: "POST", body: form, headers, signal });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      return { ok: false, message: `Could not reach the server (${err.message}).` };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (response.ok && body) return { ok: true, body };
    if (body && body.error && body.error.message) {
      const code = body.error.code ? `${body.error.code}, ` : "";
      return { ok: false, code: body.error.code, message: `${body.error.message} (${code}HTTP ${response.status})` };
    }
    const reason = response.ok ? "the answer was not JSON" : response.statusText || "no details";
    return { ok: false, code: null, message: `The server answered HTTP ${response.status}: ${reason}.` };
  }

  // The browser's own decoding, for display only; EXIF orientation applied as the server applies it.
  async function decodeForDisplay(file) {
    try {
      return await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch (err) {
      return null;
    }
  }

  function clearResults() {
    state.picture = null;
    state.width = 0;
    state.height = 0;
    state.detections = [];
    state.noDetector = false;
    els.topK.replaceChildren();
    els.classifySummary.textContent = "";
    render();
  }

  async function handleFile(file) {
    if (!file) return;
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    const request = ++state.request;
    clearResults();
    showErrors([]);
    setBusy(true, `Sending ${file.name || "the image"} (${formatBytes(file.size)})…`);
    const started = performance.now();
    let picture, detect, classify;
    try {
      // score_threshold=0: every detection comes back once and the slider filters them here.
      [picture, detect, classify] = await Promise.all([
        decodeForDisplay(file),
        post("v1/detect?score_threshold=0", file, controller.signal),
        post("v1/classify?top_k=5", file, controller.signal),
      ]);
    } catch (err) {
      if (err.name === "AbortError") return; // a newer image replaced this one
      throw err;
    }
    if (request !== state.request) return;
    state.controller = null;

    // A task the model does not do is said where its results would be, in plain text; only real refusals
    // are errors.
    state.noDetector = !detect.ok && detect.code === UNAVAILABLE.detect;
    const noClassifier = !classify.ok && classify.code === UNAVAILABLE.classify;
    const detectRefused = !detect.ok && !state.noDetector;
    const classifyRefused = !classify.ok && !noClassifier;
    const errors = [];
    if (detectRefused && classifyRefused && detect.message === classify.message) {
      errors.push(detect.message);
    } else {
      if (detectRefused) errors.push(`Detection: ${detect.message}`);
      if (classifyRefused) errors.push(`Classification: ${classify.message}`);
    }
    showErrors(errors);

    state.picture = detect.ok || classify.ok ? picture : null;
    const sized = detect.ok ? detect.body : classify.ok ? classify.body : null;
    if (sized && sized.width && sized.height) {
      state.width = sized.width;
      state.height = sized.height;
    } else if (state.picture) {
      state.width = state.picture.width;
      state.height = state.picture.height;
    }
    state.detections = detect.ok ? detect.body.detections : [];
    if (classify.ok) showTopK(classify.body);
    if (noClassifier) els.classifySummary.textContent = "Classification is not available for this model.";
    render();

    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    if (errors.length === 0) {
      setBusy(false, `${file.name || "Image"}: done in ${seconds} s.`);
    } else {
      setBusy(false, `${file.name || "Image"}: the server refused it (${seconds} s), see the message below.`);
    }
  }

  // ---- top-5
  function showTopK(body) {
    els.topK.replaceChildren();
    for (const row of body.top_k) {
      const li = document.createElement("li");
      li.dataset.index = row.index;
      li.dataset.prob = row.prob;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = row.name;
      const wnid = document.createElement("span");
      wnid.className = "wnid";
      wnid.textContent = row.wnid;
      const meter = document.createElement("meter");
      meter.min = 0;
      meter.max = 1;
      meter.value = row.prob;
      meter.setAttribute("aria-label", `probability of ${row.name}`);
      const prob = document.createElement("span");
      prob.className = "prob";
      prob.textContent = row.prob.toFixed(4);
      li.append(name, " ", wnid, " ", meter, " ", prob);
      els.topK.append(li);
    }
    const parts = [];
    if (body.crops) parts.push(`${body.crops} crop${body.crops === 1 ? "" : "s"}`);
    if (body.members) parts.push(`${body.members} member${body.members === 1 ? "" : "s"}`);
    els.classifySummary.textContent = parts.length ? `Averaged over ${parts.join(" x ")}.` : "";
  }

  // ---- detections: canvas and list
  function visibleDetections() {
    const t = Number(els.threshold.value);
    return state.detections.filter((d) => d.score >= t);
  }

  function render() {
    els.thresholdValue.textContent = Number(els.threshold.value).toFixed(2);
    const canvas = els.canvas;
    if (!state.width || !state.height) {
      canvas.hidden = true;
      els.detections.replaceChildren();
      els.detectSummary.textContent = "";
      return;
    }
    canvas.hidden = false;

    // Displayed size: the panel's width (not more than the image's own), at most 70% of the window's height.
    const maxWidth = Math.max(1, els.wrap.clientWidth);
    const maxHeight = Math.max(100, window.innerHeight * 0.7);
    const cssWidth = Math.min(maxWidth, state.width, (maxHeight * state.width) / state.height);
    const cssHeight = (cssWidth * state.height) / state.width;
    const dpr = window.devicePixelRatio || 1;
    canvas.style.width = `${cssWidth}px`;
    canvas.style.height = `${cssHeight}px`;
    canvas.width = Math.max(1, Math.round(cssWidth * dpr));
    canvas.height = Math.max(1, Math.round(cssHeight * dpr));
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    if (state.picture) {
      ctx.drawImage(state.picture, 0, 0, canvas.width, canvas.height);
    } else {
      ctx.fillStyle = "#d0d0d0";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
    }

    // Box coordinates are in the server's pixels; scale them to the canvas's pixels.
    const sx = canvas.width / state.width;
    const sy = canvas.height / state.height;
    const shown = visibleDetections();
    const lineWidth = 2 * Math.max(1, Math.round(dpr)) + 1; // odd, so a line centred on x + 0.5 covers whole pixels
    const fontSize = Math.round(12 * dpr);
    const drawn = shown
      .slice()
      .sort((a, b) => a.score - b.score) // the best on top
      .map((d) => {
        const x1 = Math.round(d.box[0] * sx);
        const y1 = Math.round(d.box[1] * sy);
        const x2 = Math.round(d.box[2] * sx);
        const y2 = Math.round(d.box[3] * sy);
        const colour = classColour(d.det_id);
        ctx.strokeStyle = colour;
        ctx.lineWidth = lineWidth;
        ctx.strokeRect(x1 + 0.5, y1 + 0.5, Math.max(0, x2 - x1), Math.max(0, y2 - y1));
        return { d, x1, y1, colour };
      });
    // Labels after all boxes, so that no box is drawn over a label.
    ctx.font = `${fontSize}px sans-serif`;
    ctx.textBaseline = "top";
    for (const { d, x1, y1, colour } of drawn) {
      const text = `${d.name} ${d.score.toFixed(2)}`;
      const w = Math.ceil(ctx.measureText(text).width) + 6;
      const h = fontSize + 4;
      const ty = y1 - h >= 0 ? y1 - h : y1 + lineWidth;
      const tx = Math.min(Math.max(0, x1), Math.max(0, canvas.width - w));
      ctx.fillStyle = colour;
      ctx.fillRect(tx, ty, w, h);
      ctx.fillStyle = "#ffffff";
      ctx.fillText(text, tx + 3, ty + 2);
    }

    // The same detections as text, for screen readers and for reading exact values.
    els.detections.replaceChildren();
    for (const d of shown.slice().sort((a, b) => b.score - a.score)) {
      const li = document.createElement("li");
      li.className = "detection";
      li.dataset.detId = d.det_id;
      li.dataset.score = d.score;
      li.dataset.colour = classColour(d.det_id);
      li.dataset.box = d.box.join(",");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.backgroundColor = li.dataset.colour;
      swatch.setAttribute("aria-hidden", "true");
      const [x1, y1, x2, y2] = d.box.map((v) => Math.round(v));
      li.append(swatch, `${d.name} ${d.score.toFixed(3)}, box (${x1}, ${y1}) to (${x2}, ${y2})`);
      els.detections.append(li);
    }
    const total = state.detections.length;
    const t = Number(els.threshold.value).toFixed(2);
    if (state.noDetector) {
      els.detectSummary.textContent = "Detection is not available for this model.";
      return;
    }
    els.detectSummary.textContent = state.picture
      ? `Showing ${shown.length} of ${total} detections with score at least ${t}.`
      : `Showing ${shown.length} of ${total} detections with score at least ${t}` +
        " (this browser cannot display the image's format, so the boxes are drawn on a grey area of its size).";
  }

  // ---- input: file chooser, drag and drop anywhere on the page, slider, resizing
  els.form.addEventListener("submit", (e) => e.preventDefault());
  els.file.addEventListener("change", () => {
    const file = els.file.files[0];
    handleFile(file);
  });

  let dragDepth = 0;
  document.addEventListener("dragenter", (e) => {
    e.preventDefault();
    dragDepth += 1;
    els.dropZone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) els.dropZone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (e) => e.preventDefault()); // otherwise the browser opens the file
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    els.dropZone.classList.remove("dragging");
    const files = e.dataTransfer ? e.dataTransfer.files : null;
    if (!files || files.length === 0) {
      showErrors(["Nothing to use in what was dropped: drop an image file."]);
      return;
    }
    handleFile(files[0]);
  });

  els.threshold.addEventListener("input", render);
  if (typeof ResizeObserver === "function") {
    let lastWidth = -1;
    new ResizeObserver(() => {
      // Only a change of width changes the drawing (the canvas's own height changes the panel's height).
      if (els.wrap.clientWidth !== lastWidth) {
        lastWidth = els.wrap.clientWidth;
        render();
      }
    }).observe(els.wrap);
  } else {
    window.addEventListener("resize", render);
  }
  render();
})();
