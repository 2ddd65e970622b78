/* opendino demo page: plain JavaScript, no build step, no request to any other host.
   Each upload is kept in the page (never on the server) and sent again with every request that needs it:
   /api/analyze per image, /api/match when there are two, /api/similarity on a click. */
"use strict";

const SLOTS = ["a", "b"];
const LABEL = { a: "image A", b: "image B" };
const state = {
  info: null,
  files: { a: null, b: null },       // File (or Blob with a name) chosen for each slot
  analyses: { a: null, b: null },    // the last /api/analyze answer of each slot
  tokens: { a: 0, b: 0, match: 0, similarity: 0 },  // a newer request makes older answers stale
  pending: 0,
};

const $ = (id) => document.getElementById(id);

function setPending(delta) {
  state.pending += delta;
  document.body.dataset.pending = String(state.pending);
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

/* POST a form; resolves to the JSON answer, rejects with the server's error message. */
async function post(path, form) {
  setPending(+1);
  try {
    let response;
    try {
      response = await fetch(path, { method: "POST", body: form });
    } catch (err) {
      throw new Error(`could not reach the demo server (${err.message}); is it still running?`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      throw new Error((body && body.error) || `the server answered ${response.status} ${response.statusText}`);
    }
    return body;
  } finally {
    setPending(-1);
  }
}

function fmt(x, digits = 2) {
  return Number(x).toFixed(digits);
}

function gradient(stops) {
  return `linear-gradient(to right, ${stops.join(", ")})`;
}

/* ------------------------------------------------------------------------------------------- start */
async function start() {
  try {
    const response = await fetch("/api/info");
    state.info = await response.json();
  } catch (err) {
    $("backbone").textContent = `the demo server does not answer (${err.message})`;
    return;
  }
  const info = state.info;
  const heads = [];
  if (info.heads.depth) heads.push(`depth head ${info.heads.depth.head}`);
  if (info.heads.seg) heads.push(`segmentation head ${info.heads.seg.head} (${info.heads.seg.classes.length} classes)`);
  $("backbone").textContent =
    `backbone ${info.backbone}: ${info.n_blocks} blocks, width ${info.embed_dim}, ${info.num_heads} heads, ` +
    `patch ${info.patch_size} px, images resized to ${info.image_size} px (shorter side), ${info.device}` +
    (heads.length ? `; ${heads.join(", ")}` : "; no depth or segmentation head loaded");
  $("threshold").value = info.defaults.threshold;
  $("matches").value = info.defaults.matches;
  $("sim-bar").style.background = gradient(info.colormaps.inferno);
  $("credits").textContent = info.examples.map((e) => `${e.title}: ${e.licence}`).join("; ");
  for (const slot of SLOTS) {
    const select = $(`example-${slot}`);
    for (const example of info.examples) {
      const option = document.createElement("option");
      option.value = example.file;
      option.textContent = example.title;
      select.append(option);
    }
    select.addEventListener("change", () => pickExample(slot, select.value));
    $(`file-${slot}`).addEventListener("change", (event) => {
      const file = event.target.files[0];
      if (file) {
        $(`example-${slot}`).value = "";
        choose(slot, file, file.name);
      }
      event.target.value = "";  // choosing the same file again still triggers a change
    });
    $(`sim-${slot}`).addEventListener("click", (event) => clickPatch(slot, event));
  }
  $("clear-b").addEventListener("click", () => clearSlot("b"));
  $("threshold").addEventListener("change", () => SLOTS.forEach((slot) => analyze(slot)));  // then the matches
  $("matches").addEventListener("change", updateMatches);
  $("all-patches").addEventListener("change", updateMatches);
}

async function pickExample(slot, file) {
  if (!file) return;
  try {
    const response = await fetch(`/examples/${encodeURIComponent(file)}`);
    if (!response.ok) throw new Error(`example ${file}: the server answered ${response.status}`);
    const blob = await response.blob();
    choose(slot, new File([blob], file, { type: blob.type }), file);
  } catch (err) {
    showError(err.message);
  }
}

function choose(slot, file, name) {
  showError("");
  const limit = state.info.limits.max_upload_bytes;
  if (file.size > limit) {
    showError(`${LABEL[slot]} (${name}): ${fmt(file.size / 2 ** 20, 1)} MB is larger than the limit of ` +
      `${fmt(limit / 2 ** 20, 1)} MB`);
    return;
  }
  state.files[slot] = file;
  state.analyses[slot] = null;
  $(`chosen-${slot}`).textContent = `${name} (${fmt(file.size / 1024, 0)} kB)`;
  if (slot === "b") $("clear-b").hidden = false;
  const section = $(`results-${slot}`);
  if (section) section.remove();
  hideMatches();
  resetSimilarity();
  analyze(slot);
}

function clearSlot(slot) {
  state.files[slot] = null;
  state.analyses[slot] = null;
  state.tokens[slot] += 1;
  $(`chosen-${slot}`).textContent = "no image yet";
  $(`example-${slot}`).value = "";
  if (slot === "b") $("clear-b").hidden = true;
  const section = $(`results-${slot}`);
  if (section) section.remove();
  updateMatches();
  resetSimilarity();
}

function hideMatches() {
  $("match-section").hidden = true;
}

/* ------------------------------------------------------------------------------------------- analysis */
async function analyze(slot) {
  const file = state.files[slot];
  if (!file) return;
  const token = ++state.tokens[slot];
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("threshold", $("threshold").value);
  setStatus(`analysing ${LABEL[slot]}…`);
  try {
    const result = await post("/api/analyze", form);
    if (token !== state.tokens[slot]) return;
    state.analyses[slot] = result;
    renderAnalysis(slot, result);
    resetSimilarity();
    setStatus(`${LABEL[slot]} analysed in ${fmt(result.seconds)} s`);
    updateMatches();
  } catch (err) {
    if (token !== state.tokens[slot]) return;
    clearSlot(slot);  // a file the server refused is not kept for matches or similarity
    showError(`${LABEL[slot]}: ${err.message}`);
    setStatus("");
  }
}

function renderAnalysis(slot, r) {
  let section = $(`results-${slot}`);
  if (!section) {
    section = $("results-template").content.firstElementChild.cloneNode(true);
    section.id = `results-${slot}`;
    const holder = $("results");
    if (slot === "a") holder.prepend(section); else holder.append(section);
  }
  section.querySelector("h2").textContent = `${slot === "a" ? "Image A" : "Image B"}: ${r.name}`;
  section.querySelector(".facts").textContent =
    `${r.original_size[1]}×${r.original_size[0]} px → ${r.input_size[1]}×${r.input_size[0]} px, ` +
    `${r.grid[1]}×${r.grid[0]} patches of ${r.patch_size} px; first PCA components explain ` +
    `${r.explained_variance_ratio.map((v) => fmt(100 * v, 1) + "%").join(", ")} of the foreground variance; ` +
    `computed in ${fmt(r.seconds)} s`;
  for (const img of section.querySelectorAll("img[data-view]")) {
    const picture = r.pictures[img.dataset.view];
    img.closest("figure").hidden = !picture;
    if (picture) {
      img.src = picture;
      img.width = r.input_size[1];
      img.height = r.input_size[0];
    }
  }
  const caption = (name) => section.querySelector(`[data-caption="${name}"]`);
  caption("foreground").textContent =
    `foreground: ${fmt(100 * r.foreground_fraction, 0)}% of patches (first component > ${r.threshold} std. dev.; ` +
    "background dimmed)";
  caption("attention").textContent =
    `class-token attention of block ${r.attention_block}, mean of ${r.attention_heads.length} heads ` +
    "(each map from 0 to its maximum)";
  if (r.depth) {
    caption("depth").textContent = `predicted depth, ${fmt(r.depth.min)}–${fmt(r.depth.max)} m (near bright, far dark)`;
  }
  const legend = section.querySelector(".legend");
  legend.replaceChildren();
  if (r.seg) {
    caption("seg").textContent = `predicted classes (${r.seg.classes.length} present)`;
    for (const c of r.seg.classes) {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = c.colour;
      item.append(swatch, `${c.name} ${fmt(100 * c.share, 0)}%`);
      legend.append(item);
    }
  }
  const heads = section.querySelector(".heads");
  heads.replaceChildren();
  r.attention_heads.forEach((picture, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = picture;
    img.alt = `attention of head ${i}`;
    const text = document.createElement("figcaption");
    text.textContent = `head ${i} (max ${fmt(r.attention_max[i], 3)})`;
    figure.append(img, text);
    heads.append(figure);
  });
}

/* ------------------------------------------------------------------------------------------- matches */
async function updateMatches() {
  const token = ++state.tokens.match;
  if (!state.analyses.a || !state.analyses.b) {
    hideMatches();
    return;
  }
  const form = new FormData();
  form.append("image_a", state.files.a, state.files.a.name);
  form.append("image_b", state.files.b, state.files.b.name);
  form.append("threshold", $("threshold").value);
  form.append("matches", $("matches").value);
  if ($("all-patches").checked) form.append("all_patches", "1");
  try {
    const r = await post("/api/match", form);
    if (token !== state.tokens.match) return;
    const where = r.all_patches ? "all patches" : `foreground patches (threshold ${r.threshold})`;
    const range = r.count ? `, cosine ${fmt(r.similarity[0], 3)}–${fmt(r.similarity[1], 3)}` : "";
    $("match-facts").textContent =
      `${r.count} strongest mutual nearest neighbours among ${where}${range}; ` +
      "each line joins two patches that are each other's most similar, coloured by the PCA of image A";
    const img = $("match-img");
    img.src = r.pictures.matches;
    img.width = r.size[1];
    img.height = r.size[0];
    $("match-section").hidden = false;
  } catch (err) {
    if (token !== state.tokens.match) return;
    showError(`matches: ${err.message}`);
  }
}

/* ------------------------------------------------------------------------------------------- similarity */
function resetSimilarity() {
  state.tokens.similarity += 1;
  const section = $("similarity");
  section.hidden = !state.analyses.a && !state.analyses.b;
  for (const slot of SLOTS) {
    const img = $(`sim-${slot}`);
    const analysis = state.analyses[slot];
    const figure = img.closest("figure");
    figure.hidden = !analysis;
    if (!analysis) continue;
    img.src = analysis.pictures.input;
    img.width = analysis.input_size[1];
    img.height = analysis.input_size[0];
    $(`sim-${slot}-caption`).textContent = `${LABEL[slot]}: click a patch`;
  }
  $("sim-colorbar").hidden = true;
}

async function clickPatch(slot, event) {
  const img = event.currentTarget;
  const other = slot === "a" ? "b" : "a";
  if (!state.files[slot] || !state.analyses[slot]) return;
  const box = img.getBoundingClientRect();
  const x = ((event.clientX - box.left) * img.naturalWidth) / box.width;
  const y = ((event.clientY - box.top) * img.naturalHeight) / box.height;
  const token = ++state.tokens.similarity;
  const form = new FormData();
  form.append("image", state.files[slot], state.files[slot].name);
  if (state.files[other] && state.analyses[other]) form.append("other", state.files[other], state.files[other].name);
  form.append("x", String(Math.min(Math.max(x, 0), img.naturalWidth - 1)));
  form.append("y", String(Math.min(Math.max(y, 0), img.naturalHeight - 1)));
  try {
    const r = await post("/api/similarity", form);
    if (token !== state.tokens.similarity) return;
    img.src = r.query.picture;
    const near = r.query.best.map((b) => `(${b[0]}, ${b[1]}) ${fmt(b[2], 3)}`).join(", ");
    $(`sim-${slot}-caption`).textContent =
      `${LABEL[slot]}: patch (row ${r.patch[0]}, column ${r.patch[1]}); most similar: ${near}`;
    if (r.other) {
      const target = $(`sim-${other}`);
      target.src = r.other.picture;
      const best = r.other.best[0];
      $(`sim-${other}-caption`).textContent =
        `${LABEL[other]}: most similar patch (row ${best[0]}, column ${best[1]}), cosine ${fmt(best[2], 3)}`;
      target.dataset.version = String(Number(target.dataset.version) + 1);
    }
    $("sim-low").textContent = `${fmt(r.range[0], 3)} (least similar shown)`;
    $("sim-colorbar").hidden = false;
    img.dataset.version = String(Number(img.dataset.version) + 1);
    setStatus(`similarity computed in ${fmt(r.seconds)} s`);
  } catch (err) {
    if (token !== state.tokens.similarity) return;
    showError(`similarity: ${err.message}`);
  }
}

document.addEventListener("DOMContentLoaded", start);
