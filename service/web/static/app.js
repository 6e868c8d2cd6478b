// The kvclip page: list caches, send images to POST /v1/classify, render the answer.
// Text from the server (labels, captions, names, messages) is only ever set through
// textContent and attributes, never parsed as HTML.
"use strict";

const KEY_STORAGE = "kvclip.apiKey";
const $ = (id) => document.getElementById(id);

let chosen = []; // the File objects to send, in request order
let thumbnails = []; // object URLs of shown thumbnails, revoked when results are cleared
let cachesByName = {}; // name -> the cache's summary from GET /v1/caches

// createElement with attributes and text/element children (strings become text nodes).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

class ApiFailure extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = Array.isArray(details) ? details : [];
  }
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// fetch + JSON; every failure (network, HTTP status, non-JSON body) becomes an ApiFailure.
async function api(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { Accept: "application/json", ...authHeaders() } });
  } catch (err) {
    throw new ApiFailure(0, "network_error", `the request could not be sent: ${err.message}`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's error page, say): reported below by status
  }
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiFailure(response.status, error.code || "http_error",
      error.message || `HTTP ${response.status} ${response.statusText}`, error.details);
  }
  if (body === null) throw new ApiFailure(response.status, "bad_response", "the server's answer is not JSON");
  return body;
}

function describeDetail(detail) {
  if (detail && detail.index !== undefined) {
    const name = detail.name ? ` (${detail.name})` : "";
    return `image ${detail.index + 1}${name}: ${detail.message || ""}`;
  }
  if (detail && detail.field) return `${detail.field}: ${detail.message || ""}`;
  return JSON.stringify(detail);
}

function showError(box, failure) {
  const title = failure.status ? `${failure.status} ${failure.code}` : failure.code;
  box.replaceChildren(
    el("strong", { "data-testid": "error-code" }, title), ": ",
    el("span", { "data-testid": "error-message" }, failure.message),
  );
  if (failure.status === 401) {
    box.append(el("p", {}, "This server needs an API key: enter a valid one under Settings."));
  } else if (failure.status === 403) {
    box.append(el("p", {}, "This API key is valid but lacks the scope needed here (read)."));
  }
  if (failure.details.length) {
    box.append(el("ul", {}, ...failure.details.map((d) => el("li", {}, describeDetail(d)))));
  }
  box.dataset.status = String(failure.status);
  box.hidden = false;
}

function hideError(box) {
  box.hidden = true;
  box.replaceChildren();
  delete box.dataset.status;
}

async function loadCaches() {
  const select = $("cache");
  const box = $("caches-error");
  const previous = select.value;
  hideError(box);
  select.replaceChildren(el("option", { value: "" }, "loading…"));
  try {
    const caches = await api("/v1/caches");
    if (!caches.length) {
      select.replaceChildren(el("option", { value: "" }, "no caches loaded"));
      return;
    }
    cachesByName = Object.fromEntries(caches.map((c) => [c.name, c]));
    select.replaceChildren(...caches.map((c) => el("option", {
      value: c.name, "data-labels": c.classes, "data-version": c.version,
    }, `${c.name} — ${c.classes} labels, ${c.version} (${c.best_method})`)));
    if (caches.some((c) => c.name === previous)) select.value = previous;
    showCache();
  } catch (failure) {
    select.replaceChildren(el("option", { value: "" }, "caches unavailable"));
    showError(box, failure);
  }
}

// The method selector and the model notice follow the chosen cache.
function showCache() {
  const cache = cachesByName[$("cache").value];
  const method = $("method");
  const previous = method.value;
  const methods = cache ? ["auto", ...cache.methods] : ["auto"];
  method.replaceChildren(...methods.map((m) => el("option", { value: m },
    m === "auto" && cache ? `auto (${cache.best_method})` : m)));
  if (methods.includes(previous)) method.value = previous;
  const notice = $("model-notice");
  if (!cache) {
    notice.hidden = true;
    return;
  }
  const random = cache.model.startsWith("tiny-") && cache.model.endsWith("-random");
  notice.textContent = random
    ? `Model ${cache.model}: random weights, for testing the plumbing only. Its answers are chance, not classifications.`
    : `Model ${cache.model}.`;
  notice.classList.toggle("warning", random);
  notice.dataset.random = String(random);
  notice.hidden = false;
}

function choose(files) {
  chosen = Array.from(files);
  $("file-list").textContent = chosen.length
    ? `${chosen.length} image${chosen.length === 1 ? "" : "s"}: ${chosen.map((f) => f.name).join(", ")}`
    : "No images chosen.";
}

function clearResults() {
  thumbnails.forEach((url) => URL.revokeObjectURL(url));
  thumbnails = [];
  $("results").replaceChildren();
  hideError($("request-error"));
}

function labelRows(labels) {
  return el("ol", { class: "labels", "data-testid": "labels" }, ...labels.map((item, rank) => {
    const percent = Math.max(0, Math.min(100, item.score * 100));
    const bar = el("span", { class: "bar" });
    bar.style.width = `${percent}%`; // CSSOM, which the page's CSP allows (inline style="" it would not)
    return el("li", { "data-testid": "label-row", "data-label": item.label, "data-score": item.score },
      el("span", { class: "label", "data-testid": rank === 0 ? "top1-label" : "label" }, item.label),
      el("span", { class: "track", "aria-hidden": "true" }, bar),
      el("span", { class: "percent", "data-testid": rank === 0 ? "top1-percent" : "percent" },
        `${percent.toFixed(1)}%`));
  }));
}

// A support item's thumbnail, fetched with the API key (an <img src> could not send it).
// A missing image (an uploaded build's files are not kept) leaves the "no image" cell.
async function loadNeighborThumb(cache, item, cell) {
  try {
    const response = await fetch(`/v1/caches/${encodeURIComponent(cache)}/items/${item}/thumbnail?size=96`,
      { headers: authHeaders() });
    if (!response.ok) return;
    const url = URL.createObjectURL(await response.blob());
    thumbnails.push(url);
    cell.replaceChildren(el("img", { class: "neighbor-thumb", src: url, alt: `support item ${item}`,
      "data-testid": "neighbor-thumbnail" }));
  } catch {
    // no thumbnail: the cell keeps its text
  }
}

// Real, or rendered by the build: then which generator, and its prompt on hover (the caption
// column shows the prompt too: a rendered image's caption is its prompt).
function originCell(n) {
  const synthetic = n.origin === "synthetic";
  const title = synthetic && n.prompt ? `prompt: ${n.prompt}` : null;
  return el("td", { "data-testid": "neighbor-origin", "data-origin": n.origin ?? "real", title },
    synthetic ? "synthetic" : "real",
    synthetic && n.generator ? el("span", { class: "generator", "data-testid": "neighbor-generator" },
      n.generator) : null);
}

function neighborTable(neighbors, cache) {
  if (!neighbors.length) return el("p", { "data-testid": "neighbors" }, "No support examples.");
  // A cache without captions would fill a whole column with dashes: leave the column out.
  const captioned = neighbors.some((n) => n.caption);
  const headers = ["Image", "Label", "Origin", ...(captioned ? ["Caption"] : []), "Affinity"];
  return el("table", { class: "neighbors", "data-testid": "neighbors" },
    el("caption", {}, "Nearest support examples"),
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...neighbors.map((n) => {
      const thumb = el("td", { class: "neighbor-image" }, n.name ?? "no image");
      loadNeighborThumb(cache, n.item, thumb);
      return el("tr", { "data-testid": "neighbor", "data-item": n.item },
        thumb,
        el("td", { "data-testid": "neighbor-label" }, n.label),
        originCell(n),
        captioned ? el("td", { "data-testid": "neighbor-caption" }, n.caption ?? "") : null,
        el("td", {}, Number(n.affinity).toFixed(3)));
    })));
}

function resultCard(result, file, cache) {
  const ok = !result.error;
  const card = el("article", {
    class: ok ? "result" : "result failed", "data-testid": "result",
    "data-index": result.index, "data-status": ok ? "ok" : "error",
  });
  if (ok && file) {
    const url = URL.createObjectURL(file);
    thumbnails.push(url);
    card.append(el("img", { class: "thumb", src: url, alt: `image ${result.index + 1}`, "data-testid": "thumbnail" }));
  } else {
    card.append(el("div", { class: "thumb none", "aria-hidden": "true" }, "no preview"));
  }
  const body = el("div", { class: "result-body" },
    el("h3", { "data-testid": "result-name" }, `${result.index + 1}. ${result.name}`));
  if (ok) {
    if (result.abstained) {
      body.append(el("p", { class: "abstained", "data-testid": "abstained" },
        "None of these: the top score is below the cache's threshold."));
    }
    body.append(labelRows(result.labels));
    if (Array.isArray(result.neighbors)) body.append(neighborTable(result.neighbors, cache));
  } else {
    body.append(el("p", { class: "error", "data-testid": "image-error" },
      el("strong", {}, result.error.code), `: ${result.error.message}`));
  }
  card.append(body);
  return card;
}

function setBusy(busy, message) {
  $("submit").disabled = busy;
  $("results").setAttribute("aria-busy", String(busy));
  $("status").textContent = message;
}

async function classify(event) {
  event.preventDefault();
  const cache = $("cache").value;
  const topK = Number($("top-k").value);
  const problem = !cache ? "Choose a cache first."
    : !chosen.length ? "Choose at least one image."
    : !Number.isInteger(topK) || topK < 1 || topK > 1000 ? "Top k must be a whole number from 1 to 1000."
    : null;
  if (problem) {
    $("status").textContent = problem;
    return;
  }
  const files = chosen.slice();
  const form = new FormData();
  for (const file of files) {
    // The server answers 415 for the whole request when a part's type is not image/*;
    // unknown types go as octet-stream so it decodes the bytes and, with partial=true,
    // reports just that image.
    const part = file.type.startsWith("image/") ? file : new Blob([file], { type: "application/octet-stream" });
    form.append("file", part, file.name);
  }
  const params = new URLSearchParams({
    cache, top_k: String(topK), explain: String($("explain").checked), partial: "true",
    method: $("method").value || "auto",
  });
  clearResults();
  const results = $("results");
  results.dataset.state = "busy";
  setBusy(true, `Classifying ${files.length} image${files.length === 1 ? "" : "s"}…`);
  try {
    const answer = await api(`/v1/classify?${params}`, { method: "POST", body: form });
    const ordered = [...answer.results].sort((a, b) => a.index - b.index);
    results.replaceChildren(...ordered.map((r) => resultCard(r, files[r.index], answer.cache)));
    const failed = ordered.filter((r) => r.error).length;
    results.dataset.state = "done";
    setBusy(false, `${ordered.length - failed} of ${ordered.length} classified with ${answer.cache} `
      + `${answer.version} (${answer.method}).`);
  } catch (failure) {
    showError($("request-error"), failure);
    results.dataset.state = "failed";
    setBusy(false, "The request failed.");
  }
}

function setUpDropZone() {
  const zone = $("drop-zone");
  // A file dropped outside the zone would make the browser navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    $("files").value = ""; // the drop replaces whatever the input had chosen
    choose(e.dataTransfer.files);
  });
}

function init() {
  const keyInput = $("api-key");
  keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
  keyInput.addEventListener("input", () => {
    const key = keyInput.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  });
  keyInput.addEventListener("change", loadCaches);
  $("reload-caches").addEventListener("click", loadCaches);
  $("cache").addEventListener("change", showCache);
  $("files").addEventListener("change", (e) => choose(e.target.files));
  $("classify-form").addEventListener("submit", classify);
  setUpDropZone();
  $("results").dataset.state = "idle";
  loadCaches();
}

init();
