// conceptlens page: pick a model and an image, see its prediction explained in concepts.
// Talks to the HTTP/JSON API of the same server (answers in protobuf's JSON mapping).
"use strict";

const OPTIONS = {
  top_k: 3, heatmap_format: "HEATMAP_FORMAT_PNG_OVERLAY", prototype_format: "PROTOTYPE_FORMAT_JPEG",
  prototypes_per_concept: 3, num_predictions: 5,
};
const $ = (sel) => document.querySelector(sel);
let photoUrl = null; // object URL of the explained image, under the heatmaps

// el("tag.class", {attr: value}, child, ...): text children are escaped by construction
function el(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const node = document.createElement(tag);
  if (classes.length) node.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}
const num = (x, digits = 3) => Number(x ?? 0).toFixed(digits);
const pct = (p) => `${(100 * Number(p ?? 0)).toFixed(1)} %`;

function status(text, isError = false) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

async function api(path, init = {}) {
  const token = sessionStorage.getItem("conceptlens-token");
  init.headers = { ...(init.headers || {}), ...(token ? { Authorization: `Bearer ${token}` } : {}) };
  const resp = await fetch(path, init);
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    if (resp.status === 401) $("#auth").hidden = false;
    throw new Error(data?.error?.message || `${resp.status} ${resp.statusText}`);
  }
  return data;
}

async function loadModels() {
  const select = $("#model");
  const { models } = await api("v1/models");
  select.replaceChildren(...models.map((m) => {
    const v = m.versions[0];
    const label = v ? `${m.name} (version ${v.version}, ${v.state.toLowerCase()})` : `${m.name} (no version)`;
    const opt = el("option", { value: m.name }, label);
    opt.selected = m.is_default;
    return opt;
  }));
  if (!models.length) status("this server has no models", true);
}

// --- one image's explanation ---
async function explain(event) {
  event.preventDefault();
  const file = $("#file").files[0];
  const model = $("#model").value;
  if (!file || !model) return status("pick a model and an image", true);
  const button = $("#explain");
  button.disabled = true;
  status(`explaining ${file.name} with ${model} …`);
  const t0 = performance.now();
  try {
    const url = `v1/models/${encodeURIComponent(model)}:explain?options=${encodeURIComponent(JSON.stringify(OPTIONS))}`;
    const answer = await api(url, {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    if (photoUrl) URL.revokeObjectURL(photoUrl);
    photoUrl = URL.createObjectURL(file);
    renderExplanation(answer, model);
    const server = answer.timings ? `, ${num(1000 * answer.timings.total_seconds, 1)} ms on the server` : "";
    status(`${file.name}: ${answer.model} version ${answer.version}, bundle ${answer.bundle_id.slice(0, 12)}` +
           ` — ${Math.round(performance.now() - t0)} ms${server}${answer.cache_hit ? " (cached)" : ""}`);
    if (location.hash.startsWith("#class/")) location.hash = "";
  } catch (e) {
    status(e.message, true);
  } finally {
    button.disabled = false;
  }
}

function renderExplanation(answer, model) {
  const preds = el("table.predictions", {},
    el("caption", {}, "Predictions"),
    el("tr", {}, el("th", {}, "class"), el("th", {}, "probability"), el("th", {}, "logit")),
    answer.predictions.map((p) => el("tr.prediction", {},
      el("td.class-name", {}, `${p.class_name} (${p.class_id})`),
      el("td", {}, el("span.bar", { style: `width:${(100 * p.probability).toFixed(1)}%` }), " ", pct(p.probability)),
      el("td.num", {}, num(p.logit)))));
  $("#explain-view").replaceChildren(preds, ...answer.explanations.map((x) => renderClass(x, model)));
}

function renderClass(x, model) {
  const sum = x.concepts.reduce((s, c) => s + c.contribution, 0);
  const biggest = Math.max(1e-12, ...x.concepts.map((c) => Math.abs(c.contribution)));
  const what = x.contrast_class_id !== undefined ? `${x.class_name} rather than ${x.contrast_class_name}` : x.class_name;
  return el("article.class-explanation", { "data-class-id": x.class_id },
    el("h2", {}, `${what} (${x.class_id})`, " ", x.num_concepts > 0
      ? el("a.class-link", { href: `#class/${encodeURIComponent(model)}/${x.class_id}` }, "its concepts →") : null),
    el("p.identity", {},
      `logit ${num(x.logit)} = Σ contributions ${num(sum)} + omitted ${num(x.omitted_contribution)}` +
      ` + residual ${num(x.residual)} + bias ${num(x.bias)}`,
      el("span.muted", {}, `  relative residual ${pct(x.relative_residual)}, method ${x.method || "–"}`)),
    flagList(x.flags),
    x.concepts.length ? el("table.concepts", {},
      el("tr", {}, ["concept", "presence", "weight", "contribution", "where", "prototypes"].map((h) => el("th", {}, h))),
      x.concepts.map((c) => el("tr.concept-row", { "data-concept-id": c.concept_id },
        el("td.num", {}, `#${c.concept_id}`),
        el("td.num", {}, num(c.presence)),
        el("td.num", {}, num(c.weight)),
        el("td.num", {}, num(c.contribution), el("span.bar" + (c.contribution < 0 ? ".neg" : ""),
          { style: `width:${(100 * Math.abs(c.contribution) / biggest).toFixed(0)}%` })),
        el("td", {}, heatmap(c)),
        el("td.prototypes", {}, prototypes(c.prototypes)))))
      : el("p.muted", {}, "This class has no concepts: all of its logit is residual."));
}

function heatmap(c) {
  const h = c.heatmap;
  if (!h || !h.data) return null;
  return el("figure.overlay", {},
    el("img.photo", { src: photoUrl, alt: "" }),
    el("img.heatmap", { src: `data:image/png;base64,${h.data}`, alt: `where concept ${c.concept_id} is` }));
}

const prototypes = (list) => (list || []).filter((p) => p.jpeg).map((p) =>
  el("img.prototype", { src: `data:image/jpeg;base64,${p.jpeg}`, alt: p.source, title: `${p.source} (score ${num(p.score, 2)})` }));

function flagList(flags) {
  if (!flags || !flags.length) return null;
  return el("p.flags", {}, "flags: ", flags.map((f) => el("span.flag", {}, f)),
    " — not to be trusted");
}

// --- a class's global concepts: #class/<model>/<id> ---
async function showClass(model, id) {
  const view = $("#class-view");
  view.replaceChildren(el("p.muted", {}, "loading …"));
  try {
    const q = `v1/models/${encodeURIComponent(model)}/classes/${encodeURIComponent(id)}?prototypes=3&format=jpeg`;
    const cc = await api(q);
    const metrics = Object.entries(cc.metrics || {}).sort();
    view.replaceChildren(el("article.class-concepts", { "data-class-id": cc.class_id },
      el("p", {}, el("a", { href: "#" }, "← back to the explanation")),
      el("h2", {}, `${cc.class_name} (${cc.class_id}): ${cc.concepts.length} concepts, ${cc.method}`),
      flagList(cc.flags),
      el("table.concepts", {},
        el("tr", {}, ["concept", "weight", "direction norm", "prototypes"].map((h) => el("th", {}, h))),
        cc.concepts.map((c) => el("tr.global-concept", {},
          el("td.num", {}, `#${c.concept_id}`), el("td.num", {}, num(c.weight)),
          el("td.num", {}, num(c.direction_norm)), el("td.prototypes", {}, prototypes(c.prototypes))))),
      metrics.length ? el("table.metrics", {}, el("caption", {}, "Evaluation"),
        metrics.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td.num", {}, num(v, 4))))) : null));
  } catch (e) {
    view.replaceChildren();
    status(e.message, true);
  }
}

function route() {
  const m = location.hash.match(/^#class\/([^/]+)\/(.+)$/);
  $("#class-view").hidden = !m;
  $("#explain-view").hidden = !!m;
  if (m) showClass(decodeURIComponent(m[1]), decodeURIComponent(m[2]));
}

$("#explain-form").addEventListener("submit", explain);
$("#token").addEventListener("change", (e) => {
  sessionStorage.setItem("conceptlens-token", e.target.value.trim());
  loadModels().then(() => status("")).catch((err) => status(err.message, true));
});
window.addEventListener("hashchange", route);
loadModels().catch((e) => status(e.message, true));
route();
