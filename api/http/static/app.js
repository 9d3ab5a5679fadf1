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
    info.textContent = `Model ${model.architecture} · ${model.num_classes} classes · running on ${model.device}`;
    renderEvaluation(model);
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
    row.append(head, bar);
    list.append(row);
  }
  const kind = body.model.multi_label ? "labels above the threshold" : "most likely first";
  card.querySelector(".status").textContent = body.predictions.length
    ? `Result (${kind}):`
    : "No label scored above the threshold.";
  card.querySelector(".meta").textContent =
    `${body.model.architecture} · ${Math.round(body.timing.total_ms)} ms on the server`;
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
