// The API's own schema (/openapi.json) as a page: every endpoint, its parameters, its answers and
// errors with their fields. Written here so that the docs need no CDN (Swagger UI and ReDoc do).
"use strict";

const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
};

// Text with `code` in backticks (how the app's docstrings write it) -> text and <code> nodes (never HTML).
const prose = (text) => (text || "").split("`").map((part, i) => (i % 2 ? el("code", { textContent: part }) : part));

function resolve(schema, spec) {
  while (schema && schema.$ref) schema = spec.components.schemas[schema.$ref.split("/").pop()];
  return schema || {};
}

function typeOf(schema, spec) {
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.anyOf) return schema.anyOf.map((s) => typeOf(s, spec)).join(" | ");
  if (schema.type === "array") return `list of ${typeOf(schema.items || {}, spec)}`;
  // an upload: OpenAPI 3.0 says format binary, 3.1 (FastAPI now) a contentMediaType
  return schema.format === "binary" || schema.contentMediaType ? "file" : schema.type || "any";
}

function fieldTable(schema, spec, seen = new Set()) {
  schema = resolve(schema, spec);
  const rows = Object.entries(schema.properties || {}).map(([name, prop]) => {
    const row = el("tr", {}, el("td", {}, el("code", { textContent: name })),
      el("td", { textContent: typeOf(prop, spec) }), el("td", {}, ...prose(prop.description)));
    return row;
  });
  const table = el("table", {}, el("tr", {}, el("th", { textContent: "field" }), el("th", { textContent: "type" }),
    el("th", { textContent: "meaning" })), ...rows);
  const nested = [];
  for (const prop of Object.values(schema.properties || {})) {
    const inner = prop.items || (prop.anyOf || []).find((s) => s.items)?.items || prop;
    const ref = inner.$ref || (prop.anyOf || []).find((s) => s.$ref)?.$ref;
    const name = ref && ref.split("/").pop();
    if (name && !seen.has(name)) {
      seen.add(name);
      nested.push(el("p", { className: "info", textContent: `${name}:` }), fieldTable({ $ref: ref }, spec, seen));
    }
  }
  return el("div", {}, table, ...nested);
}

function endpoint(path, method, op, spec) {
  const section = el("section", { className: "endpoint" },
    el("h2", {}, el("code", { textContent: `${method.toUpperCase()} ${path}` })),
    el("p", {}, ...prose(op.description || op.summary)));
  const params = op.parameters || [];
  if (params.length) {
    section.append(el("h3", { textContent: "parameters" }), el("table", {},
      el("tr", {}, el("th", { textContent: "name" }), el("th", { textContent: "in" }), el("th", { textContent: "type" }),
        el("th", { textContent: "limits" })),
      ...params.map((p) => el("tr", {}, el("td", {}, el("code", { textContent: p.name + (p.required ? "" : "?") })),
        el("td", { textContent: p.in }), el("td", { textContent: typeOf(p.schema || {}, spec) }),
        el("td", { textContent: ["minimum", "maximum", "minLength", "maxLength", "default"]
          .filter((k) => p.schema && k in p.schema).map((k) => `${k} ${p.schema[k]}`).join(", ") })))));
  }
  const body = op.requestBody && Object.entries(op.requestBody.content)[0];
  if (body) section.append(el("h3", { textContent: `request body (${body[0]})` }), fieldTable(body[1].schema, spec));
  section.append(el("h3", { textContent: "answers" }));
  for (const [status, answer] of Object.entries(op.responses || {})) {
    const [type, content] = Object.entries(answer.content || {})[0] || [];
    section.append(el("p", {}, el("strong", { textContent: status }), " ", ...prose(answer.description),
      type ? el("span", { className: "path", textContent: ` (${type})` }) : ""));
    if (content && content.schema && resolve(content.schema, spec).properties) section.append(fieldTable(content.schema, spec));
  }
  return section;
}

async function main() {
  const spec = await (await fetch("/openapi.json")).json();
  document.getElementById("about").replaceChildren(`${spec.info.title} ${spec.info.version}: `,
    ...prose(spec.info.description));
  const main = document.getElementById("endpoints");
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) main.append(endpoint(path, method, op, spec));
  }
}

main().catch((err) => { document.getElementById("about").textContent = `could not read /openapi.json: ${err}`; });
