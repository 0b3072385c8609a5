// captioner's page: caption dropped photos through POST /api/caption, search through GET /api/search.
"use strict";

const $ = (id) => document.getElementById(id);

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

async function captionFile(file) {
  const caption = el("p", { className: "caption pending", textContent: "captioning…" });
  const meta = el("p", { className: "meta", textContent: file.name });
  const card = el("article", { className: "card" },
    el("img", { src: URL.createObjectURL(file), alt: file.name }), el("div", { className: "body" }, caption, meta));
  $("results").prepend(card);

  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch("/api/caption", { method: "POST", body: form });
    const data = await response.json();
    if (!response.ok) throw new Error(data.detail || response.statusText);
    const result = data.results[0];
    if (result.error) throw new Error(result.error);
    caption.className = "caption";
    caption.textContent = result.caption;
    meta.textContent = `${file.name} · ${data.seconds.toFixed(2)} s`;
    if (result.alternatives && result.alternatives.length > 1) {
      const list = el("ol");
      for (const alt of result.alternatives.slice(1)) list.append(el("li", { textContent: alt.caption }));
      card.querySelector(".body").append(list);
    }
  } catch (err) {
    caption.className = "caption error";
    caption.textContent = String(err.message || err);
  }
}

function captionFiles(files) {
  for (const file of files) captionFile(file);
}

async function runSearch(event) {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) return;
  $("search-info").textContent = "searching…";
  $("hits").replaceChildren();
  try {
    const response = await fetch(`/api/search?q=${encodeURIComponent(q)}&limit=40`);
    const data = await response.json();
    if (!response.ok) throw new Error(data.detail || response.statusText);
    $("search-info").textContent = data.results.length ? `${data.results.length} photos` : "no photo matches";
    for (const hit of data.results) {
      $("hits").append(el("figure", { className: "hit" },
        el("img", { src: hit.thumb, alt: hit.caption, loading: "lazy" }),
        el("figcaption", {}, hit.caption, el("span", { className: "path", textContent: hit.path }))));
    }
  } catch (err) {
    $("search-info").textContent = String(err.message || err);
  }
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
health();
