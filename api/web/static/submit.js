// The submit form: builds a JobSpec from the inputs (advanced JSON first, the fields over it),
// posts it as multipart (spec first, then the files) and shows the API's validation errors
// next to the input its dotted `field` path names.
import { ApiError, postForm } from "./app.js";

const form = document.getElementById("submit-form");
const byId = (id) => document.getElementById(id);
const SIMPLE = ["model", "target_macs", "max_drop", "input_size", "in_chans", "device"];
const NUMBERS = new Set(["target_macs", "max_drop", "input_size", "in_chans"]);
const INTEGERS = new Set(["input_size", "in_chans"]);

function uploading() {
  return byId("dataset-kind-upload").checked;
}

for (const radio of document.querySelectorAll("input[name=dataset-kind]")) {
  radio.addEventListener("change", () => {
    byId("dataset").disabled = uploading();
    byId("dataset-file").disabled = !uploading();
  });
}

function clearErrors() {
  for (const node of form.querySelectorAll(".field-error")) {
    node.hidden = true;
    node.textContent = "";
  }
  for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  for (const node of form.querySelectorAll(".field.invalid")) node.classList.remove("invalid");
  byId("form-error").hidden = true;
}

/** Show `message` next to the input called `name` (or at the top of the form). */
function fieldError(name, message) {
  const box = name ? byId(`${name}-error`) : null;
  if (!box) {
    const top = byId("form-error");
    top.textContent = top.hidden ? message : `${top.textContent} ${message}`;
    top.hidden = false;
    return;
  }
  box.textContent = box.hidden ? message : `${box.textContent}; ${message}`;
  box.hidden = false;
  box.closest(".field").classList.add("invalid");
  const input = name === "dataset" && uploading() ? byId("dataset-file") : byId(name);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", box.id);
  }
}

/** The form input that an API error's dotted field path (spec.config.target_macs) names. */
function inputFor(path) {
  if (!path) return { name: null, label: "" };
  const parts = path.split(".");
  if (parts[0] === "weights" || path === "spec.weights_uri") return { name: "weights", label: "" };
  if (parts[0] === "dataset") return { name: "dataset", label: "" };
  if (parts[0] === "spec" && parts[1] === "config" && parts.length >= 3) {
    const key = parts[2];
    if (SIMPLE.includes(key) && parts.length === 3) return { name: key, label: "" };
    if (key === "dataset") return { name: "dataset", label: "" };
    return { name: "advanced", label: `${parts.slice(2).join(".")}: ` };
  }
  return { name: null, label: path === "spec" ? "" : `${path}: ` };
}

function showApiError(err) {
  const items = err.details && err.details.length ? err.details : [{ field: err.field, message: err.message }];
  for (const item of items) {
    const { name, label } = inputFor(item.field);
    fieldError(name, `${label}${item.message}${err.code !== "validation_error" ? ` (${err.code})` : ""}`);
  }
  const first = form.querySelector("[aria-invalid]");
  if (first) first.focus();
}

function buildConfig() {
  let config = {};
  const raw = byId("advanced").value.trim();
  if (raw) {
    try {
      config = JSON.parse(raw);
    } catch (e) {
      fieldError("advanced", `not valid JSON: ${e.message}`);
      return null;
    }
    if (config === null || typeof config !== "object" || Array.isArray(config)) {
      fieldError("advanced", "must be a JSON object, e.g. {\"prune\": {\"steps\": 4}}");
      return null;
    }
  }
  let ok = true;
  for (const name of SIMPLE) {
    const input = byId(name);
    const text = input.value.trim();
    if (text === "") {
      // A number input holding something that is not a number reads as "": say so here
      // rather than send a spec without the field.
      if (input.validity && input.validity.badInput) {
        fieldError(name, "not a number");
        ok = false;
      }
      continue;
    }
    config[name] = NUMBERS.has(name) ? Number(text) : text;
    if (INTEGERS.has(name) && !Number.isInteger(config[name])) {
      fieldError(name, "must be a whole number");
      ok = false;
    }
  }
  config.dataset = uploading() ? "upload" : byId("dataset").value.trim();
  return ok ? config : null;
}

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  clearErrors();
  const config = buildConfig();
  const weights = byId("weights").files[0];
  if (!weights) fieldError("weights", "choose the weights file of the model to compress");
  const archive = byId("dataset-file").files[0];
  if (uploading() && !archive) fieldError("dataset", "choose an archive, or name a dataset reference");
  if (!uploading() && config && !config.dataset) fieldError("dataset", "name a dataset, e.g. digits");
  if (!config || form.querySelector("[aria-invalid]")) return;

  const body = new FormData();
  body.append("spec", JSON.stringify({ config })); // first: the API validates it before the uploads
  body.append("weights", weights, weights.name);
  if (uploading()) body.append("dataset", archive, archive.name);

  const button = byId("submit");
  const status = byId("upload-status");
  button.disabled = true;
  status.textContent = "Uploading…";
  try {
    const job = await postForm("/v1/jobs", body, (f) => (status.textContent = `Uploading… ${Math.round(100 * f)} %`));
    status.textContent = "Submitted.";
    location.assign(`/jobs/${job.id}`);
  } catch (err) {
    status.textContent = "";
    if (err instanceof ApiError) showApiError(err);
    else fieldError(null, String(err));
  } finally {
    button.disabled = false;
  }
});
