// captioner's page: caption chosen or dropped photos through POST /api/caption, search the library
// through GET /api/search (by words) and /api/search/like (by an example photo). Every control works from the keyboard.
"use strict";

const $ = (id) => document.getElementById(id);
const IMAGE_NAME = /\.(jpe?g|jfif|png|gif|bmp|webp|tiff?|avif|heic|heif)$/i;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

async function health() {
  try {
    const info = await (await fetch("/health")).json();
    $("status").textContent = `model: ${info.model} (${info.decoder})` + (info.library ? ` · library: ${info.library}` : "");
    $("search-section").hidden = !info.library;
  } catch (err) {
    $("status").textContent = "the server is not answering";
  }
}

function isImage(file) {
  return file.type.startsWith("image/") || IMAGE_NAME.test(file.name);
}

// One card per file, in the order chosen; the newest selection goes on top.
function card(file) {
  const caption = el("p", { className: "caption pending", textContent: "waiting…" });
  const meta = el("p", { className: "meta", textContent: file.name });
  const body = el("div", { className: "body" }, caption, meta);
  const picture = isImage(file) ? el("img", { src: URL.createObjectURL(file), alt: file.name }) : el("div", { className: "no-image" });
  return { node: el("article", { className: "card" }, picture, body), caption, meta, body };
}

function fail(c, message) {
  c.caption.className = "caption error";
  c.caption.textContent = message;
}

async function captionFile(file, c) {
  c.caption.textContent = "captioning…";
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch("/api/caption", { method: "POST", body: form });
    const data = await response.json();
    if (!response.ok) throw new Error(data.detail || response.statusText);
    const result = data.results[0];
    if (result.error) throw new Error(result.error);
    c.caption.className = "caption";
    c.caption.textContent = result.caption;
    c.meta.textContent = `${file.name} · ${data.seconds.toFixed(2)} s`;
    if (result.tags && result.tags.length) {  // what the encoder's ImageNet classifier recognises
      const tags = el("p", { className: "tags", ariaLabel: "what the encoder recognises" });
      for (const t of result.tags) tags.append(el("span", { className: "tag", textContent: `${t.word} ${t.score.toFixed(2)}` }));
      c.body.append(tags);
    }
    if (result.disagrees) {
      const d = result.disagrees;
      c.body.append(el("p", { className: "disagrees",
        textContent: `The caption says “${d.caption_says}”, but the encoder sees ${d.encoder_sees} (${d.score.toFixed(2)}): this photo may be outside what the model learned.` }));
    }
    if (result.alternatives && result.alternatives.length > 1) {
      const list = el("ol", { ariaLabel: "other captions the model considered" });
      for (const alt of result.alternatives.slice(1)) list.append(el("li", { textContent: alt.caption }));
      c.body.append(list);
    }
  } catch (err) {
    fail(c, String(err.message || err));
  }
}

async function captionFiles(fileList) {
  const files = [...fileList];
  const batch = el("div", { className: "batch" });
  $("results").prepend(batch);
  const cards = files.map((file) => {
    const c = card(file);
    batch.append(c.node);
    return c;
  });
  for (let i = 0; i < files.length; i++) {  // one at a time: the model captions one request at a time anyway
    if (!isImage(files[i])) fail(cards[i], `${files[i].name}: not an image; not uploaded`);
    else await captionFile(files[i], cards[i]);
  }
}

function showHits(data) {
  const shown = data.results.length;
  const what = data.mode === "keyword" ? "match" : data.mode === "like" ? "compared"
    : data.mode === "embedding" ? "ranked by the search space" : "ranked by the model";
  let info = !data.total ? "no photo matches"
    : shown < data.total ? `${data.total} photos ${what}; the best ${shown} are shown`
    : `${data.total} photo${data.total === 1 ? "" : "s"} ${what}`;
  if (data.note) info += ` (${data.note})`;
  $("search-info").textContent = info;
  for (const hit of data.results) {
    const open = el("a", { href: `${hit.thumb}?size=2048`, target: "_blank", rel: "noopener",
      title: `open ${hit.path}` }, el("img", { src: hit.thumb, alt: hit.caption, loading: "lazy" }));
    const like = el("button", { type: "button", className: "more", textContent: "more like this",
      title: `photos that look like ${hit.path}` });
    like.addEventListener("click", () => search(`/api/search/like/${hit.id}?limit=40`));
    $("hits").append(el("figure", { className: "hit" }, open,
      el("figcaption", {}, hit.caption, el("span", { className: "path", textContent: hit.path }), like)));
  }
}

async function search(url, options) {
  $("search-info").textContent = "searching…";
  $("hits").replaceChildren();
  try {
    const response = await fetch(url, options);
    const data = await response.json();
    if (!response.ok) throw new Error(data.detail || response.statusText);
    showHits(data);
  } catch (err) {
    $("search-info").textContent = String(err.message || err);
  }
}

function runSearch(event) {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) return;
  search(`/api/search?q=${encodeURIComponent(q)}&mode=${$("mode").value}&limit=40`);
}

function searchLike(file) {
  if (!isImage(file)) { $("search-info").textContent = `${file.name}: not an image`; return; }
  const form = new FormData();
  form.append("file", file);
  search("/api/search/like?limit=40", { method: "POST", body: form });
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  captionFiles(e.dataTransfer.files);
});
$("file-input").addEventListener("change", (e) => { captionFiles(e.target.files); e.target.value = ""; });
$("search-form").addEventListener("submit", runSearch);
$("like-input").addEventListener("change", (e) => { if (e.target.files[0]) searchLike(e.target.files[0]); e.target.value = ""; });
health();
