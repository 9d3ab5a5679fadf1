// The try-it page: sends each photo to the public API (POST api/v1/predict) and shows the answer.
// No framework, no build step, no network beyond this server.
"use strict";

const KEY_STORAGE = "cat-breeds-api-key"; // sessionStorage: this tab only
const TRANSIENT = new Set(["not_ready", "overloaded", "timeout", "network", "unauthorized"]);
const PLAIN_WORDS = {
  payload_too_large: "This file is too large for the server. Try a smaller photo.",
  image_too_large: "This picture has too many pixels for the server. Try a smaller photo.",
  unsupported_media_type: "This file is not an image the model can read. Try a JPEG or PNG photo.",
  invalid_image: "This image is damaged or incomplete, so it could not be read.",
  empty_file: "This file is empty.",
  not_ready: "The model is not ready yet (it may still be loading). Try again in a few seconds.",
  overloaded: "The server is busy right now. Try again in a moment.",
  timeout: "The server took too long to answer. Try again in a moment.",
  unauthorized: "This server needs an API key. Enter it above, then try again.",
  network: "Could not reach the server. Is it still running?",
};

const $ = (selector) => document.querySelector(selector);

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

function headers() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

function plainWords(code, message) {
  return PLAIN_WORDS[code] || `The server could not classify this file (${code}): ${message}`;
}

function showKeyPanel() {
  $("#key-panel").hidden = false;
  $("#api-key").focus();
}

async function loadModelInfo() {
  const info = $("#model-info");
  try {
    const response = await fetch("api/v1/model", { headers: headers() });
    if (response.status === 401) {
      info.textContent = "Enter the API key to use this model.";
      showKeyPanel();
      return;
    }
    if (response.status === 503) {
      info.textContent = "The model is loading…";
      setTimeout(loadModelInfo, 2000);
      return;
    }
    const model = await response.json();
    info.classList.remove("bad");
    const folds = model.fold_count > 1 ? ` · ${model.fold_count} folds as one model` : "";
    info.textContent = `Model ${model.architecture} · ${model.num_classes} classes${folds} · running on ${model.device}`;
    renderEvaluation(model);
    renderModelView(model);
  } catch (error) {
    info.classList.add("bad");
    info.textContent = PLAIN_WORDS.network;
  }
}

function renderEvaluation(model) {
  // the candidates measured at load (GET /api/v1/model's evaluation), the served one marked
  const evaluation = model.evaluation;
  const panel = $("#evaluation");
  if (!evaluation) {
    panel.hidden = true;
    return;
  }
  $("#evaluation-chosen").textContent = `${model.runtime} ${model.precision}`;
  $("#evaluation-reason").textContent = evaluation.reason;
  $("#evaluation-caption").textContent = evaluation.images
    ? `Measured at load on ${evaluation.held_out_images} held-out images of ${evaluation.folder}` +
      ` (${evaluation.calibration_images} more calibrate INT8); the gate: ` +
      `${formatPercent(evaluation.min_agreement)} the same answer as PyTorch fp32.`
    : "Speeds measured at load; no evaluation images (API_EVAL_DIR), so answers were not compared.";
  const body = $("#evaluation-table tbody");
  body.replaceChildren();
  const none = "–";
  for (const c of [...evaluation.candidates].sort((a, b) => b.img_s - a.img_s)) {
    const row = document.createElement("tr");
    const chosen = c.runtime === evaluation.chosen.runtime && c.precision === evaluation.chosen.precision;
    if (chosen) row.classList.add("chosen");
    const gate = c.passed === null ? none : c.passed ? "passed" : "refused";
    const cells = [
      c.runtime, c.precision, c.img_s.toFixed(0),
      c.top1_agreement === null ? none : formatPercent(c.top1_agreement),
      c.max_abs_dp === null ? none : c.max_abs_dp.toFixed(3),
      c.accuracy === null ? none : formatPercent(c.accuracy),
      chosen ? `${gate} · serving` : gate,
    ];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  }
  panel.hidden = false;
}

function svgNode(name, attributes) {
  // SVG's namespace, read off the page's own <svg> (the page names no outside address)
  const node = document.createElementNS($("#reliability").namespaceURI, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  return node;
}

function renderModelView(model) {
  // folds, temperature, reliability diagram and confusion matrix (GET /api/v1/model)
  const calibration = model.calibration;
  const labeled = calibration && calibration.ece_before !== null;
  $("#model-view").hidden = model.fold_count <= 1 && !calibration;
  $("#model-summary").textContent =
    `${model.fold_count > 1 ? `${model.fold_count} folds, ` : ""}version ${model.version}` +
    (calibration ? `, temperature ${calibration.temperature}` : "");
  const body = $("#folds-table tbody");
  body.replaceChildren();
  model.folds.forEach((fold, k) => {
    const row = document.createElement("tr");
    const score = fold.recorded_score ? `${fold.recorded_score.key} ${fold.recorded_score.value}` : "–";
    const alone = labeled && calibration.fold_accuracy.length ? formatPercent(calibration.fold_accuracy[k]) : "–";
    for (const text of [fold.name, fold.path, fold.sha256.slice(0, 12), score, alone]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  });
  $("#folds").hidden = model.fold_count <= 1;
  $("#calibration").hidden = !calibration;
  if (!calibration) return;
  $("#calibration-text").textContent = labeled
    ? `Scores are tempered by T = ${calibration.temperature} (${calibration.source}: ${calibration.reason}). ` +
      `On ${calibration.held_out_images} held-out images: accuracy ${formatPercent(calibration.accuracy)}, ` +
      `expected calibration error ${formatPercent(calibration.ece_before)} before, ` +
      `${formatPercent(calibration.ece_after)} after; negative log-likelihood ` +
      `${calibration.nll_before} before, ${calibration.nll_after} after.`
    : `Scores are tempered by T = ${calibration.temperature} (${calibration.source}: ${calibration.reason}).`;
  drawReliability(labeled ? calibration : null);
  drawConfusion(labeled ? calibration.confusion : [], model.class_names);
}

function drawReliability(calibration) {
  const svg = $("#reliability");
  svg.replaceChildren();
  svg.closest("figure").hidden = !calibration;
  if (!calibration) return;
  const size = 200, left = 15, top = 5;
  svg.append(svgNode("rect", { x: left, y: top, width: size, height: size, fill: "none", stroke: "#888" }));
  svg.append(svgNode("line", { x1: left, y1: top + size, x2: left + size, y2: top, stroke: "#888", "stroke-dasharray": 4 }));
  const draw = (bins, style) => {
    for (const bin of bins) {
      if (!bin.count) continue;
      const height = bin.accuracy * size;
      svg.append(svgNode("rect", {
        x: left + bin.lower * size, y: top + size - height, width: (bin.upper - bin.lower) * size, height,
        ...style, "data-count": bin.count,
      }));
    }
  };
  draw(calibration.reliability_after, { class: "after", fill: "#1a5fb4", "fill-opacity": 0.75 });
  draw(calibration.reliability_before, { class: "before", fill: "none", stroke: "#a51d2d", "stroke-width": 1.5 });
  svg.setAttribute("aria-label",
    `Reliability diagram: expected calibration error ${formatPercent(calibration.ece_before)} before, ` +
    `${formatPercent(calibration.ece_after)} after the temperature`);
}

function drawConfusion(matrix, names) {
  const svg = $("#confusion");
  svg.replaceChildren();
  svg.closest("figure").hidden = !matrix.length;
  if (!matrix.length) return;
  const size = 200, left = 15, top = 5, cell = size / matrix.length;
  const most = Math.max(1, ...matrix.flat());
  matrix.forEach((row, truth) => row.forEach((count, answer) => {
    const shade = svgNode("rect", {
      x: left + answer * cell, y: top + truth * cell, width: cell, height: cell,
      fill: count ? "#1a5fb4" : "#f4f4f4", "fill-opacity": count ? 0.15 + 0.85 * count / most : 1,
    });
    const title = svgNode("title", {});
    title.textContent = `true ${names[truth]}, answered ${names[answer]}: ${count}`;
    shade.append(title);
    svg.append(shade);
  }));
  const right = matrix.reduce((sum, row, i) => sum + row[i], 0);
  const total = matrix.flat().reduce((a, b) => a + b, 0);
  svg.setAttribute("aria-label", `Confusion matrix: ${right} of ${total} held-out images answered right`);
}

function formatPercent(score) {
  // one decimal, the same rounding everywhere; the exact score is in the title and data-score
  return `${(score * 100).toFixed(1)}%`;
}

function renderLabels(card, body) {
  const list = card.querySelector(".labels");
  list.replaceChildren();
  for (const item of body.predictions) {
    const row = document.createElement("li");
    row.dataset.score = String(item.score);
    row.dataset.index = String(item.index);
    const head = document.createElement("div");
    head.className = "label-row";
    const name = document.createElement("span");
    name.className = "label-name";
    name.textContent = item.label.replaceAll("_", " ");
    const value = document.createElement("span");
    value.className = "label-score";
    value.textContent = formatPercent(item.score);
    value.title = String(item.score);
    head.append(name, value);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "presentation");
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, item.score)) * 100}%`;
    bar.append(fill);
    if (item.spread !== null && item.spread !== undefined) {
      // the folds' disagreement: score ± one standard deviation across them
      const low = Math.max(0, item.score - item.spread), high = Math.min(1, item.score + item.spread);
      const whisker = document.createElement("span");
      whisker.className = "spread";
      whisker.style.left = `${low * 100}%`;
      whisker.style.width = `${(high - low) * 100}%`;
      whisker.title = `± ${formatPercent(item.spread)} across ${body.model.folds} folds`;
      value.textContent += ` ± ${(item.spread * 100).toFixed(1)}`;
      row.dataset.spread = String(item.spread);
      bar.append(whisker);
    }
    row.append(head, bar);
    list.append(row);
  }
  const unsure = card.querySelector(".uncertain");
  unsure.hidden = !body.uncertain;
  unsure.textContent = body.uncertain && body.predictions.length
    ? `Not sure: the best guess, ${body.predictions[0].label.replaceAll("_", " ")}, scores only ` +
      `${formatPercent(body.predictions[0].score)}. Treat it as a guess.`
    : "Not sure: no label scored high enough.";
  card.querySelector(".why").hidden = !body.predictions.length;
  const kind = body.model.multi_label ? "labels above the threshold" : "most likely first";
  card.querySelector(".status").textContent = body.predictions.length
    ? `Result (${kind}):`
    : "No label scored above the threshold.";
  card.querySelector(".meta").textContent =
    `${body.model.architecture} · ${Math.round(body.timing.total_ms)} ms on the server`;
}

async function toggleWhy(card, file) {
  const on = card.querySelector(".why-toggle").checked;
  const canvas = card.querySelector(".overlay");
  const preview = card.querySelector(".preview");
  if (!on) {
    canvas.hidden = true;
    preview.hidden = false;
    return;
  }
  if (!canvas.dataset.box) {
    const form = new FormData();
    form.append("file", file, file.name);
    const status = card.querySelector(".status");
    status.textContent = "Working out why…";
    let body = null, response = null;
    try {
      response = await fetch("api/v1/predict?explain=true", { method: "POST", body: form, headers: headers() });
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (!response || !response.ok || !body || !body.explanation) {
      const problem = (body && body.error) || { code: "network", message: "" };
      status.textContent = problem.code === "explain_busy"
        ? "Explanations are busy right now. Try the toggle again in a moment."
        : plainWords(problem.code, problem.message);
      card.querySelector(".why-toggle").checked = false;
      return;
    }
    status.textContent = `Why ${body.explanation.label.replaceAll("_", " ")}: the warm regions spoke most for it.`;
    await drawOverlay(canvas, preview, body.explanation);
  }
  preview.hidden = true;
  canvas.hidden = false;
}

function loaded(image) {
  return image.complete && image.naturalWidth
    ? Promise.resolve(image)
    : new Promise((resolve, reject) => { image.onload = () => resolve(image); image.onerror = reject; });
}

async function drawOverlay(canvas, preview, explanation) {
  // the photo, and over the part the model saw (the crop box) the heatmap, warm where it counted
  const photo = await loaded(preview);
  const scale = Math.min(1, 640 / Math.max(photo.naturalWidth, photo.naturalHeight));
  canvas.width = Math.round(photo.naturalWidth * scale);
  canvas.height = Math.round(photo.naturalHeight * scale);
  const context = canvas.getContext("2d");
  context.drawImage(photo, 0, 0, canvas.width, canvas.height);
  // a blob: URL, which the page's content security policy allows (data: URLs it does not)
  const bytes = Uint8Array.from(atob(explanation.heatmap_png), (c) => c.charCodeAt(0));
  const source = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  const heat = await loaded(Object.assign(new Image(), { src: source }));
  URL.revokeObjectURL(source);
  const layer = document.createElement("canvas");
  layer.width = explanation.width;
  layer.height = explanation.height;
  const ink = layer.getContext("2d");
  ink.drawImage(heat, 0, 0);
  const pixels = ink.getImageData(0, 0, layer.width, layer.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    const v = pixels.data[i] / 255;
    pixels.data[i] = 255;
    pixels.data[i + 1] = Math.round(220 * v);
    pixels.data[i + 2] = 0;
    pixels.data[i + 3] = Math.round(200 * v);
  }
  ink.putImageData(pixels, 0, 0);
  const [x0, y0, x1, y1] = explanation.box.map((v) => v * scale);
  context.drawImage(layer, x0, y0, x1 - x0, y1 - y0);
  canvas.dataset.box = explanation.box.join(",");
  canvas.dataset.layer = explanation.layer;
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `Heatmap of why the model answered ${explanation.label}`);
}

function renderError(card, code, message, file) {
  card.classList.add("failed");
  const status = card.querySelector(".status");
  status.textContent = plainWords(code, message);
  status.setAttribute("role", "alert");
  card.querySelector(".labels").replaceChildren();
  if (code === "unauthorized") showKeyPanel();
  if (TRANSIENT.has(code)) {
    const retry = document.createElement("button");
    retry.type = "button";
    retry.className = "pick retry";
    retry.textContent = "Try again";
    retry.addEventListener("click", () => classify(file, card));
    card.querySelector(".meta").replaceChildren(retry);
  }
}

async function classify(file, card) {
  card.classList.remove("failed");
  card.querySelector(".status").textContent = "Classifying…";
  card.querySelector(".status").removeAttribute("role");
  card.querySelector(".meta").replaceChildren();
  const form = new FormData();
  form.append("file", file, file.name);
  let response;
  try {
    response = await fetch("api/v1/predict", { method: "POST", body: form, headers: headers() });
  } catch (error) {
    renderError(card, "network", String(error), file);
    return;
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (response.ok && body) {
    renderLabels(card, body);
  } else {
    const problem = (body && body.error) || { code: `http_${response.status}`, message: response.statusText };
    renderError(card, problem.code, problem.message, file);
  }
}

function addCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  card.querySelector(".filename").textContent = file.name || "pasted image";
  card.setAttribute("aria-label", `Result for ${file.name || "pasted image"}`);
  const preview = card.querySelector(".preview");
  if (file.type.startsWith("image/")) {
    preview.src = URL.createObjectURL(file);
    preview.alt = `Preview of ${file.name || "the pasted image"}`;
  } else {
    preview.remove();
  }
  card.querySelector(".why-toggle").addEventListener("change", () =>
    toggleWhy(card, file).catch(() => {
      card.querySelector(".status").textContent = "The heatmap could not be drawn.";
    }));
  $("#results").prepend(card);
  return card;
}

function handleFiles(files) {
  for (const file of files) classify(file, addCard(file));
}

function setUp() {
  const input = $("#file-input");
  const zone = $("#drop-zone");
  $("#pick").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    handleFiles([...input.files]);
    input.value = ""; // the same file can be chosen again
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    handleFiles([...event.dataTransfer.files]);
  });
  // a photo dropped beside the zone must not replace the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (files.length) handleFiles(files);
  });
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("#api-key").value.trim());
    $("#key-panel").hidden = true;
    loadModelInfo();
  });
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
