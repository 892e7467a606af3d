// vaelab serve: the page. Everything it shows comes from the server's API (docs/serve.md).
"use strict";

const SHOWN_SLIDERS = 16; // the most active dimensions; "all dimensions" shows the rest
const SLIDER_LIMIT = 3; // sliders span -3..3 standard deviations of the prior

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

const postJson = (path, body) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
});

const query = (params) => new URLSearchParams(params).toString();

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 1e4 ? value.toFixed(1) : value.toPrecision(4);
}

// Shows a PNG response in an <img>, freeing the previous object URL; counts the images shown
// (data-serial), so a script can wait for the next one.
async function showPng(img, response) {
  const url = URL.createObjectURL(await response.blob());
  const old = img.dataset.url;
  await new Promise((resolve) => { img.onload = resolve; img.onerror = resolve; img.src = url; });
  if (old) URL.revokeObjectURL(old);
  img.dataset.url = url;
  img.dataset.serial = String(Number(img.dataset.serial || 0) + 1);
}

// Decodes the latest latent asked for: one request in flight at a time, and a slider that moved
// while it was out is decoded next (never a queue of stale positions). `extra()`: the request's
// other fields (a conditional run's condition).
class LiveDecoder {
  constructor(run, img, onDone, onError, extra = () => ({})) {
    Object.assign(this, { run, img, onDone, onError, extra, wanted: null, busy: false });
  }
  request(z) {
    this.wanted = z.slice();
    if (!this.busy) this.pump();
  }
  async pump() {
    this.busy = true;
    while (this.wanted) {
      const z = this.wanted;
      this.wanted = null;
      const start = performance.now();
      try {
        await showPng(this.img,
          await postJson("/api/decode", { run: this.run, z, ...this.extra() }));
        this.onDone(performance.now() - start);
      } catch (err) { this.onError(err); }
    }
    this.busy = false;
  }
}

class Panel {
  constructor(run, labels) {
    this.run = run;
    this.labels = labels;
    this.node = document.getElementById("panel").content.firstElementChild.cloneNode(true);
    this.node.dataset.run = run.name;
    this.r = (name) => this.node.querySelector(`[data-r="${name}"]`);
    this.z = new Array(run.latent_dim).fill(0);
    this.ends = { a: null, b: null }; // {val: i} or {z: [...]}, with .latent once known
    this.seed = 0;
    this.uploadZ = null;
    this.uploadFile = null;
    this.tickets = {};
    // a conditional run's condition, {variable: value}, sent with every request that decodes
    this.condition = Object.fromEntries(run.conditions.map((c) => [c.name, c.default]));
    this.decoder = new LiveDecoder(run.name, this.r("decoded"),
      (ms) => { this.r("decode-time").textContent = `decoded in ${ms.toFixed(0)} ms`; },
      (err) => this.fail(err), () => this.conditionBody());
    this.header();
    this.conditions();
    this.evaluation();
    this.sliders();
    this.samples();
    this.walk();
    this.uploads();
  }

  fail(err) {
    const box = this.r("error");
    box.textContent = err.message || String(err);
    box.hidden = false;
  }

  header() {
    const { run } = this;
    const { channels, height, width } = run.shape;
    this.r("name").textContent = run.name;
    this.r("what").textContent =
      `${run.model}, latent_dim ${run.latent_dim}, images ${channels}x${height}x${width}`;
  }

  conditionBody() {
    return this.run.conditions.length ? { condition: { ...this.condition } } : {};
  }

  // A query string of `params` and the run's condition (condition=NAME=VALUE, repeated).
  where(params) {
    const q = new URLSearchParams(params);
    for (const [name, value] of Object.entries(this.condition)) {
      q.append("condition", `${name}=${value}`);
    }
    return q.toString();
  }

  // One choice per variable of a conditional run (cvae); a change re-decodes everything shown.
  conditions() {
    const { run } = this;
    if (!run.conditions.length) return;
    this.r("condition-box").hidden = false;
    this.r("condition-note").textContent = "Every image below (sliders, samples, walk, your " +
      `image) is decoded given this condition (model.condition_on=${run.condition_on}); ` +
      "it starts at each variable's most common value in the data.";
    for (const { name, size } of run.conditions) {
      const select = document.createElement("select");
      select.dataset.variable = name;
      for (let v = 0; v < size; v += 1) {
        const text = run.condition_on === "attributes" ? (v ? "yes" : "no") : String(v);
        select.append(new Option(text, String(v)));
      }
      select.value = String(this.condition[name]);
      select.addEventListener("change", () => {
        this.condition[name] = Number(select.value);
        this.decoder.request(this.z);
        if (this.drawSamples) this.drawSamples();
        this.walkStrip();
        if (this.uploadFile) this.showUpload();
      });
      const label = document.createElement("label");
      label.append(`${name} `, select);
      this.r("condition").append(label);
    }
  }

  evaluation() {
    const box = this.r("eval");
    const files = Object.keys(this.run.evaluation);
    if (!files.length) {
      box.innerHTML = '<p class="note">Not evaluated yet (vaelab evaluate RUN).</p>';
      return;
    }
    for (const file of files) {
      const table = document.createElement("table");
      const numbers = Object.entries(this.run.evaluation[file])
        .filter(([, v]) => typeof v === "number");
      const known = Object.keys(this.labels).filter((k) => k in this.run.evaluation[file]);
      const order = [...known, ...numbers.map(([k]) => k).filter((k) => !known.includes(k))];
      table.innerHTML = `<tr><th>eval/${file}.json</th><th></th></tr>`;
      for (const key of order) {
        const value = this.run.evaluation[file][key];
        if (typeof value !== "number") continue;
        const row = table.insertRow();
        row.insertCell().textContent = this.labels[key] || key;
        row.insertCell().textContent = fmt(value);
      }
      box.append(table);
    }
    this.r("eval-box").open = true;
  }

  sliders() {
    const { run } = this;
    this.r("order").textContent = `Most active first: ${run.dims_order}.`;
    const holder = this.r("sliders");
    this.inputs = new Array(run.latent_dim);
    run.dims.forEach(({ index, kl }, rank) => {
      const row = document.createElement("label");
      row.className = rank < SHOWN_SLIDERS ? "slider" : "slider hidden";
      const name = document.createElement("span");
      name.innerHTML = `z<sub>${index}</sub> ` +
        (kl === null ? "" : `<span class="kl">KL ${fmt(kl)}</span>`);
      const input = Object.assign(document.createElement("input"), {
        type: "range", min: -SLIDER_LIMIT, max: SLIDER_LIMIT, step: 0.01, value: 0,
      });
      input.dataset.dim = String(index);
      const out = document.createElement("output");
      out.textContent = "0.00";
      input.addEventListener("input", () => {
        this.z[index] = Number(input.value);
        out.textContent = Number(input.value).toFixed(2);
        this.decoder.request(this.z);
      });
      row.append(name, input, out);
      holder.append(row);
      this.inputs[index] = { input, out };
    });
    this.r("all").addEventListener("change", (e) => {
      holder.querySelectorAll(".slider").forEach((row, rank) => {
        row.classList.toggle("hidden", !e.target.checked && rank >= SHOWN_SLIDERS);
      });
    });
    this.r("zero").addEventListener("click", () => this.setZ(this.z.map(() => 0)));
    this.r("random").addEventListener("click", () => this.setZ(this.z.map(gaussian)));
    this.decoder.request(this.z);
  }

  setZ(z) {
    this.z = z.slice();
    z.forEach((value, j) => {
      // a slider shows -3..3; the latent keeps its value beyond that
      this.inputs[j].input.value = String(value);
      this.inputs[j].out.textContent = value.toFixed(2);
    });
    this.decoder.request(this.z);
  }

  samples() {
    const select = this.r("sampler");
    for (const name of this.run.samplers) {
      const what = name === "gmm"
        ? `gmm (post-hoc, ${this.run.gmm.components} Gaussians)` : "prior N(0, I)";
      select.append(new Option(what, name));
    }
    const temperature = this.r("temperature");
    const draw = async () => {
      this.r("temperature-value").textContent = Number(temperature.value).toFixed(2);
      const params = { run: this.run.name, n: this.r("n").value, temperature: temperature.value,
        seed: this.seed, sampler: select.value };
      const ticket = this.latest("samples");
      try {
        const response = await api(`/api/sample?${this.where(params)}`);
        if (this.isLatest("samples", ticket)) await showPng(this.r("samples"), response);
      } catch (err) { this.fail(err); }
    };
    this.drawSamples = draw;
    temperature.addEventListener("change", draw);
    temperature.addEventListener("input", () => {
      this.r("temperature-value").textContent = Number(temperature.value).toFixed(2);
    });
    select.addEventListener("change", draw);
    this.r("n").addEventListener("change", draw);
    this.r("reseed").addEventListener("click", () => { this.seed += 1; draw(); });
    draw();
  }

  walk() {
    const { run } = this;
    const note = this.r("walk-note");
    if (!run.has_encoder) {
      note.textContent = `${run.model} has no encoder: there is no image to start a walk from.`;
      this.node.querySelectorAll('[data-r="file-a"], [data-r="file-b"], [data-r="t"]')
        .forEach((el) => { el.disabled = true; });
      return;
    }
    note.textContent = run.val.shown.length
      ? "Click a validation image for A, then one for B (or upload either)."
      : `No validation images here (${run.val.note}); upload A and B.`;
    let next = "a";
    for (const index of run.val.shown) {
      const img = new Image();
      img.alt = `validation image ${index}`;
      img.dataset.val = String(index);
      img.src = `/api/val?${query({ run: run.name, index })}`;
      img.addEventListener("click", () => { this.setEnd(next, { val: index }, img.src, img); next = next === "a" ? "b" : "a"; });
      this.r("thumbs").append(img);
    }
    for (const end of ["a", "b"]) {
      this.r(`file-${end}`).addEventListener("change", async (e) => {
        const file = e.target.files[0];
        if (!file) return;
        try {
          const code = await (await api(`/api/encode?${this.where({ run: run.name })}`,
            { method: "POST", body: file })).json();
          this.setEnd(end, { z: code.z }, code.input_png, null);
        } catch (err) { this.fail(err); }
      });
    }
    this.r("t").addEventListener("input", () => this.walkPoint());
    if (run.val.shown.length >= 2) {
      const thumbs = this.r("thumbs").children;
      this.setEnd("a", { val: run.val.shown[0] }, thumbs[0].src, thumbs[0]);
      this.setEnd("b", { val: run.val.shown[run.val.shown.length - 1] },
        thumbs[thumbs.length - 1].src, thumbs[thumbs.length - 1]);
    }
    this.walker = new LiveDecoder(run.name, this.r("walk"), () => {}, (err) => this.fail(err),
      () => this.conditionBody());
  }

  async setEnd(end, spec, src, thumb) {
    this.node.querySelectorAll(`.thumbs img.${end}`).forEach((el) => el.classList.remove(end));
    if (thumb) thumb.classList.add(end);
    this.r(`end-${end}`).src = src;
    const latent = spec.z || (await (await api(
      `/api/val/latent?${query({ run: this.run.name, index: spec.val })}`)).json()).z;
    this.ends[end] = { spec, latent };
    await this.walkStrip();
  }

  async walkStrip() {
    if (!(this.ends.a && this.ends.b)) return;
    const ticket = this.latest("strip");
    try {
      const response = await postJson("/api/interpolate", { run: this.run.name,
        from: this.ends.a.spec, to: this.ends.b.spec, steps: 10, ...this.conditionBody() });
      if (!this.isLatest("strip", ticket)) return;
      await showPng(this.r("strip"), response);
      this.walkPoint();
    } catch (err) { this.fail(err); }
  }

  walkPoint() {
    if (!(this.ends.a && this.ends.b && this.walker)) return;
    const t = Number(this.r("t").value);
    const a = this.ends.a.latent;
    const b = this.ends.b.latent;
    this.walker.request(a.map((v, j) => v * (1 - t) + b[j] * t));
  }

  uploads() {
    const { run } = this;
    const note = this.r("upload-note");
    const { crop, size, channels } = run.upload;
    if (!run.has_encoder) {
      note.textContent = `${run.model} has no encoder: it cannot reconstruct an image.`;
      this.r("file").disabled = true;
      return;
    }
    note.textContent = `Centre-cropped (${crop ? `${crop}x${crop}` : "the short side's square"}), ` +
      `resized to ${size}x${size}, ${channels === 1 ? "grey" : "RGB"}, as the run's data was.`;
    this.r("file").addEventListener("change", (e) => {
      const file = e.target.files[0];
      if (!file) return;
      this.uploadFile = file;
      this.showUpload();
    });
    this.r("use").addEventListener("click", () => { if (this.uploadZ) this.setZ(this.uploadZ); });
  }

  // The upload encoded and reconstructed (under the condition, for a cvae), and where it sits.
  async showUpload() {
    const ticket = this.latest("upload");
    const where = `?${this.where({ run: this.run.name })}`;
    const file = this.uploadFile;
    try {
      const [code, recon] = await Promise.all([
        api(`/api/encode${where}`, { method: "POST", body: file }).then((r) => r.json()),
        api(`/api/reconstruct${where}`, { method: "POST", body: file }),
      ]);
      if (!this.isLatest("upload", ticket)) return; // a newer upload or condition is on its way
      this.r("seen").src = code.input_png;
      await showPng(this.r("recon"), recon);
      this.uploadZ = code.z;
      this.r("use").disabled = false;
      await this.scatter(code.z);
    } catch (err) { this.fail(err); }
  }

  // Tickets: of two overlapping requests for one image, only the later one's answer is shown.
  latest(what) {
    this.tickets[what] = (this.tickets[what] || 0) + 1;
    return this.tickets[what];
  }

  isLatest(what, ticket) { return this.tickets[what] === ticket; }

  // The validation codes on the two most active dimensions (grey), and the upload's (red).
  async scatter(z) {
    const canvas = this.r("scatter");
    const ctx = canvas.getContext("2d");
    if (!this.codes) {
      try {
        this.codes = await (await api(`/api/codes?${query({ run: this.run.name })}`)).json();
      } catch (err) { this.codes = { dims: this.run.dims.slice(0, 2).map((d) => d.index), points: [] }; }
    }
    const [i, j] = this.codes.dims;
    const xs = [...this.codes.points.map((p) => p[0]), z[i], -3, 3];
    const ys = [...this.codes.points.map((p) => p[1]), z[j], -3, 3];
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const sx = (v) => 10 + ((v - x0) / (x1 - x0)) * (canvas.width - 20);
    const sy = (v) => canvas.height - 10 - ((v - y0) / (y1 - y0)) * (canvas.height - 20);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = "#d9dde3";
    ctx.beginPath();
    ctx.moveTo(sx(0), 0); ctx.lineTo(sx(0), canvas.height);
    ctx.moveTo(0, sy(0)); ctx.lineTo(canvas.width, sy(0));
    ctx.stroke();
    ctx.fillStyle = "rgba(60, 70, 90, 0.35)";
    for (const [x, y] of this.codes.points) ctx.fillRect(sx(x) - 1.5, sy(y) - 1.5, 3, 3);
    ctx.fillStyle = "#d92d20";
    ctx.beginPath();
    ctx.arc(sx(z[i]), sy(z[j]), 5, 0, 2 * Math.PI);
    ctx.fill();
    this.r("scatter-caption").textContent =
      `z${i} vs z${j}: ${this.codes.points.length} validation codes (grey), yours (red)`;
  }
}

function gaussian() { // Box-Muller
  const u = 1 - Math.random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * Math.random());
}

async function main() {
  const status = document.getElementById("status");
  let listing;
  try { listing = await (await api("/api/runs")).json(); } catch (err) {
    status.textContent = `cannot list the runs: ${err.message}`;
    return;
  }
  const main = document.getElementById("panels");
  const picker = document.getElementById("picker");
  const panels = new Map();
  const layout = () => {
    const shown = [...panels.values()].filter((p) => !p.node.hidden).length;
    main.style.setProperty("--n", String(Math.max(shown, 1)));
  };
  listing.runs.forEach((run, k) => {
    const box = Object.assign(document.createElement("input"), { type: "checkbox", checked: k < 3 });
    box.dataset.run = run.name;
    const label = document.createElement("label");
    label.append(box, ` ${run.name}`);
    picker.append(label);
    box.addEventListener("change", () => {
      if (box.checked && !panels.has(run.name)) {
        panels.set(run.name, new Panel(run, listing.labels));
        main.append(panels.get(run.name).node);
      }
      if (panels.has(run.name)) panels.get(run.name).node.hidden = !box.checked;
      layout();
    });
    if (box.checked) box.dispatchEvent(new Event("change"));
  });
  status.textContent = `${listing.runs.length} run${listing.runs.length === 1 ? "" : "s"}; ` +
    "the API behind this page: docs/serve.md";
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", main);
