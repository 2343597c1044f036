// Shared by every page: the API key, JSON calls, the event-stream client, formatting and DOM
// helpers. No dependencies; every value from the API reaches the page through textContent or
// attributes, never as HTML.

const KEY_NAME = "flow-compress.api-key";

export function getKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { ...extra, "X-API-Key": key } : { ...extra };
}

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || "http_" + status;
    this.field = err.field || null;
    this.details = err.details || [];
  }
}

export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (response.status === 401) showAuth(body && body.error && getKey() ? "That key was refused." : "");
  return new ApiError(response.status, body);
}

/** fetch() a JSON API route with the key; throws ApiError on any non-2xx answer. */
export async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: authHeaders({ Accept: "application/json", ...(options.headers || {}) }),
  });
  if (!response.ok) throw await errorFrom(response);
  return response.status === 204 ? null : response.json();
}

/** fetch() a file with the key; returns the Response (the caller reads the body). */
export async function fetchFile(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/** POST multipart with upload progress (fetch has none). Resolves to the parsed body, or
 *  rejects with an ApiError carrying the API's error body. */
export function postForm(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders({ Accept: "application/json" }))) {
      xhr.setRequestHeader(name, value);
    }
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) return resolve(xhr.response);
      if (xhr.status === 401) showAuth(getKey() ? "That key was refused." : "");
      reject(new ApiError(xhr.status, xhr.response));
    };
    xhr.onerror = () => reject(new ApiError(0, { error: { message: "the server could not be reached" } }));
    xhr.send(form);
  });
}

// ------------------------------------------------------------------ the key
export function showAuth(message = "") {
  const box = document.getElementById("auth");
  box.hidden = false;
  const err = document.getElementById("auth-error");
  err.textContent = message;
  err.hidden = !message;
  document.getElementById("auth-key").focus();
}

function setupKeyUi() {
  document.getElementById("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = document.getElementById("auth-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_NAME, key);
    location.reload();
  });
  const status = document.getElementById("key-status");
  status.hidden = !getKey();
  document.getElementById("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_NAME);
    location.reload();
  });
}

// ------------------------------------------------------------------ Server-Sent Events
// EventSource cannot send the key header, so the stream is read with fetch(). The protocol
// parts that matter are kept: event ids, resuming with Last-Event-ID after a dropped
// connection (with back-off), 204 meaning "over, do not reconnect", comment lines as
// heartbeats.
export function followEvents(path, { onEvent, onEnd, onError, onHeartbeat }) {
  const control = new AbortController();
  let lastId = null;
  let stopped = false;

  function dispatch(block) {
    let id = null;
    let type = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) {
        onHeartbeat && onHeartbeat();
        continue;
      }
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "id") id = value;
      else if (field === "event") type = value;
      else if (field === "data") data.push(value);
    }
    if (id !== null) lastId = id;
    if (!data.length) return false;
    return onEvent({ id, type, data: JSON.parse(data.join("\n")) }) === true;
  }

  async function run() {
    let delay = 1000;
    while (!stopped) {
      try {
        const headers = authHeaders({ Accept: "text/event-stream" });
        if (lastId) headers["Last-Event-ID"] = lastId;
        const response = await fetch(path, { headers, cache: "no-store", signal: control.signal });
        if (response.status === 204) {
          stopped = true;
          onEnd && onEnd();
          return;
        }
        if (!response.ok) {
          const err = await errorFrom(response);
          if (response.status < 500) {
            stopped = true;
            onError && onError(err);
            return;
          }
          throw err;
        }
        delay = 1000;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          // A chunk may end between the \r and \n of one line ending: wait for the rest.
          const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
          let text = buffer.slice(0, cut).replace(/\r\n?/g, "\n");
          buffer = buffer.slice(cut);
          let end;
          while ((end = text.indexOf("\n\n")) >= 0) {
            const block = text.slice(0, end);
            text = text.slice(end + 2);
            if (dispatch(block)) {
              stopped = true;
              control.abort();
              onEnd && onEnd();
              return;
            }
          }
          buffer = text + buffer;
        }
      } catch (err) {
        if (stopped) return;
        onError && onError(err, true);
      }
      if (stopped) return;
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 15000);
    }
  }
  run();
  return {
    close() {
      stopped = true;
      control.abort();
    },
  };
}

// ------------------------------------------------------------------ DOM and formatting
/** el("td", {class: "x", title: "y"}, child, "text", ...) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function setText(id, text) {
  document.getElementById(id).textContent = text;
}

export function badge(node, state) {
  node.textContent = state;
  node.className = `badge state-${state}`;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function fmtPercent(x, digits = 1) {
  return x === null || x === undefined ? "–" : `${Number(x).toFixed(digits)} %`;
}

export function fmtCount(n) {
  if (n === null || n === undefined) return "–";
  const abs = Math.abs(n);
  if (abs >= 1e9) return `${(n / 1e9).toFixed(2)} G`;
  if (abs >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (abs >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
  return String(n);
}

export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

export function fmtAge(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60);
  return `${m} min ${Math.round(seconds - 60 * m)} s`;
}

export function targetText(config) {
  return `≤ ${(config.target_macs * 100).toFixed(0)} % MACs, drop ≤ ${config.max_drop} pt`;
}

setupKeyUi();
