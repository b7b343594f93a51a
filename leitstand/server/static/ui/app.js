// The control room: the domains a token may read, and the live tail of one.
//
// The token lives in sessionStorage (this tab only) and goes out in the Authorization header,
// never in a URL. EventSource cannot send that header, so the live tail reads the SSE stream
// with fetch() and a stream reader, and resumes from its last cursor (Last-Event-ID) itself.
"use strict";

const KEY = "leitstand.token";
const SVG = "http://www.w3.org/2000/svg";
const MAX_ROWS = 500;
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(KEY);
let refresh = null;
let tail = null;

class Refused extends Error {}

function headers(extra = {}) {
  return { Authorization: "Bearer " + token, ...extra };
}

async function api(path) {
  const response = await fetch(path, { headers: headers(), cache: "no-store" });
  if (response.status === 401) {
    logout("The token was refused.");
    throw new Refused("unauthorized");
  }
  if (!response.ok) throw new Error(`${response.status} ${(await response.text()).trim()}`);
  return response.json();
}

function show(section) {
  for (const id of ["login", "domains", "tail"]) $(id).hidden = id !== section;
  $("logout").hidden = section === "login";
}

function logout(message = "") {
  sessionStorage.removeItem(KEY);
  token = null;
  $("login-error").textContent = message;
  route();
}

function route() {
  stopTail();
  clearInterval(refresh);
  if (!token) {
    show("login");
    $("token").focus();
    return;
  }
  const match = location.hash.match(/^#\/d\/([a-z0-9.-]+)$/);
  if (match) openTail(match[1]);
  else openDomains();
}

// -- the domains --------------------------------------------------------------------------

async function openDomains() {
  show("domains");
  await refreshDomains();
  refresh = setInterval(refreshDomains, 5000);
}

async function refreshDomains() {
  let data;
  try {
    data = await api("/domains");
  } catch (error) {
    if (!(error instanceof Refused)) $("domains-note").textContent = `Could not load the domains: ${error.message}`;
    return;
  }
  const rows = data.domains.map((d) => {
    const link = element("a", d.domain, { href: `#/d/${d.domain}`, class: "domain" });
    const last = element("time", ago(d.modified), { datetime: d.modified, title: d.modified });
    return element("tr", [
      element("td", [link]),
      element("td", bytes(d.bytes), { class: "num" }),
      element("td", String(d.events_per_minute), { class: "num" }),
      element("td", [last]),
      element("td", [spark(d.per_minute)]),
    ]);
  });
  $("domain-rows").replaceChildren(...rows);
  $("domains-note").textContent = rows.length ? "" : "No domain that this token may read has events yet.";
}

function spark(values) {
  const svg = document.createElementNS(SVG, "svg");
  const width = values.length * 3;
  for (const [name, value] of Object.entries({ class: "spark", width, height: 24, viewBox: `0 0 ${width} 24` })) {
    svg.setAttribute(name, value);
  }
  const top = Math.max(1, ...values);
  const title = document.createElementNS(SVG, "title");
  title.textContent = `events per minute over the last hour (highest ${top})`;
  svg.append(title, svgElement("line", { x1: 0, y1: 23.5, x2: width, y2: 23.5 }));
  values.forEach((value, n) => {
    if (!value) return;
    const height = Math.max(1, Math.round((value / top) * 22));
    svg.append(svgElement("rect", { x: n * 3, y: 24 - height, width: 2, height }));
  });
  return svg;
}

// -- the live tail ------------------------------------------------------------------------

async function openTail(domain) {
  stopTail();
  show("tail");
  $("tail-domain").textContent = domain;
  $("event-rows").replaceChildren();
  $("detail").hidden = true;
  $("pause").textContent = "Pause";
  const current = (tail = { domain, q: $("q").value.trim(), cursor: null, controller: null, paused: false, tries: 0 });
  status("loading", "loading");
  const query = new URLSearchParams({ tail: "100" });
  if (current.q) query.set("q", current.q);
  try {
    const page = await api(`/events/${domain}?${query}`);
    if (current !== tail) return;
    for (const event of page.events) addRow(JSON.stringify(event), false);
    current.cursor = page.next;
  } catch (error) {
    if (!(error instanceof Refused)) status("error", error.message);
    return;
  }
  connect(current);
}

function stopTail() {
  if (tail && tail.controller) tail.controller.abort();
  tail = null;
}

async function connect(current) {
  if (current !== tail || current.paused) return;
  const controller = (current.controller = new AbortController());
  const query = current.q ? `?${new URLSearchParams({ q: current.q })}` : "";
  const extra = current.cursor ? { "Last-Event-ID": current.cursor } : {};
  status(current.tries ? "reconnecting" : "connecting", current.tries ? "reconnecting" : "connecting");
  try {
    const response = await fetch(`/events/${current.domain}/stream${query}`, {
      headers: headers(extra),
      signal: controller.signal,
      cache: "no-store",
    });
    if (response.status === 401) return logout("The token was refused.");
    if (response.status === 400) return openTail(current.domain); // the file was replaced: start afresh
    if (!response.ok) throw new Error(`${response.status}`);
    status("live", "live");
    current.tries = 0;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        received(current, buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
  }
  if (current === tail && !current.paused) {
    status("reconnecting", "reconnecting");
    setTimeout(() => connect(current), Math.min(10000, 500 * 2 ** current.tries++));
  }
}

function received(current, block) {
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("id: ")) id = line.slice(4);
    else if (line.startsWith("data: ")) data.push(line.slice(6));
  }
  if (data.length) addRow(data.join("\n"), true);
  if (id) current.cursor = id;
}

function addRow(line, fresh) {
  const row = element("tr", [element("td", line, { title: "show the whole event" })]);
  if (fresh) {
    row.className = "new";
    setTimeout(() => row.classList.remove("new"), 1500);
  }
  row.addEventListener("click", () => {
    const detail = $("detail");
    try {
      detail.textContent = JSON.stringify(JSON.parse(line), null, 2);
    } catch {
      detail.textContent = line;
    }
    detail.hidden = false;
  });
  const rows = $("event-rows");
  rows.prepend(row);
  while (rows.children.length > MAX_ROWS) rows.lastElementChild.remove();
}

function status(kind, text) {
  const badge = $("status");
  badge.className = `status ${kind}`;
  badge.textContent = text;
}

// -- small helpers ------------------------------------------------------------------------

function element(name, content, attributes = {}) {
  const node = document.createElement(name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (Array.isArray(content)) node.append(...content);
  else node.textContent = content;
  return node;
}

function svgElement(name, attributes) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) {
    n /= 1024;
    unit++;
  }
  return `${unit ? n.toFixed(1) : n} ${units[unit]}`;
}

function ago(when) {
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(when)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return when.slice(0, 19).replace("T", " ") + " UTC";
}

// -- wiring -------------------------------------------------------------------------------

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  $("token").value = "";
  $("login-error").textContent = "";
  sessionStorage.setItem(KEY, token);
  route();
});
$("logout").addEventListener("click", () => logout());
$("pause").addEventListener("click", () => {
  if (!tail) return;
  tail.paused = !tail.paused;
  $("pause").textContent = tail.paused ? "Resume" : "Pause";
  if (tail.paused) {
    if (tail.controller) tail.controller.abort();
    status("paused", "paused");
  } else {
    connect(tail);
  }
});
$("filter").addEventListener("submit", (event) => {
  event.preventDefault();
  if (tail) openTail(tail.domain);
});
window.addEventListener("hashchange", route);
route();
