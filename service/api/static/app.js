// The merc page: upload media + transcript or type turns, then show emotions along the conversation.
// Plain browser JavaScript, no dependencies. All user text goes into the DOM as textContent.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const KEY_STORE = "merc-api-key";
  const COLOURS = {
    neutral: "#9aa0a6", joy: "#f6c026", happy: "#f6c026", excited: "#f06292", surprise: "#26c6da",
    fear: "#8e5bd0", sadness: "#3f74d6", sad: "#3f74d6", anger: "#d93025", angry: "#d93025",
    frustrated: "#e8710a", disgust: "#2e8b57", positive: "#34a853", negative: "#d93025",
    happiness: "#f6c026", boredom: "#8d6e63", calm: "#80cbc4", contempt: "#6d4c41", // face / voice readings
  };
  const SPARE = ["#795548", "#607d8b", "#c0ca33", "#00897b", "#5c6bc0", "#ad1457"];
  const state = {
    key: sessionStorage.getItem(KEY_STORE) || "",
    models: [],
    job: null, // the JobOut document of the conversation on screen
    media: null, // {url, kind} of the local file shown in the player
    run: 0, // bumps on every new conversation, so stale polls stop
    selected: null,
    tip: null, // {anchor, u}: the segment whose tooltip is shown
  };

  // ---------- small DOM helpers ----------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  const pct = (p) => `${Math.round(p * 100)}%`;
  const colour = (label, labels) => COLOURS[label] || SPARE[Math.max(0, (labels || []).indexOf(label)) % SPARE.length];
  function ink(hex) { // black or white text on a background colour
    const n = parseInt(hex.slice(1), 16);
    const [r, g, b] = [(n >> 16) & 255, (n >> 8) & 255, n & 255];
    return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#111" : "#fff";
  }
  function clock(s) {
    if (!Number.isFinite(s)) return "";
    const m = Math.floor(s / 60);
    return `${m}:${(s - m * 60).toFixed(1).padStart(4, "0")}`;
  }
  const span = (u) => (Number.isFinite(u.start) && Number.isFinite(u.end) ? `${clock(u.start)}–${clock(u.end)}` : "");
  const sorted = (dist) => Object.entries(dist || {}).sort((a, b) => b[1] - a[1]);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // ---------- talking to the API ----------
  class ApiError extends Error {
    constructor(problem) {
      super(problem.detail || problem.title || "request failed");
      this.problem = problem;
    }
  }

  function headers(extra = {}) {
    const h = { Accept: "application/json", ...extra };
    if (state.key) h["X-API-Key"] = state.key;
    return h;
  }

  function problemOf(status, statusText, body) {
    if (body && typeof body === "object" && (body.title || body.detail)) return { status, ...body };
    const text = typeof body === "string" ? body.slice(0, 300) : "";
    return { status, title: statusText || `HTTP ${status}`, detail: text || "the server gave no details" };
  }

  async function api(path, { method = "GET", json } = {}) {
    let response;
    try {
      const init = { method, headers: headers(json ? { "Content-Type": "application/json" } : {}) };
      if (json) init.body = JSON.stringify(json);
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError({ title: "Cannot reach the server", detail: String(e.message || e) });
    }
    const type = response.headers.get("content-type") || "";
    const body = type.includes("json") ? await response.json().catch(() => null) : await response.text();
    if (!response.ok) throw failure(problemOf(response.status, response.statusText, body));
    return { status: response.status, body };
  }

  function upload(path, form, onProgress) { // XHR: fetch cannot report upload progress
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
      xhr.upload.addEventListener("progress", (e) => e.lengthComputable && onProgress(e.loaded / e.total));
      xhr.addEventListener("error", () => reject(new ApiError({ title: "Upload failed", detail: "the connection broke" })));
      xhr.addEventListener("load", () => {
        let body = xhr.responseText;
        try { body = JSON.parse(body); } catch { /* not JSON: keep the text */ }
        if (xhr.status >= 200 && xhr.status < 300) resolve({ status: xhr.status, body });
        else reject(failure(problemOf(xhr.status, xhr.statusText, body)));
      });
      xhr.send(form);
    });
  }

  function failure(problem) {
    if (problem.status === 401) showKeyForm();
    return new ApiError(problem);
  }

  async function waitFor(job, run) { // poll GET /v1/conversations/{id} while queued or running
    const t0 = performance.now();
    let delay = 400;
    while (job.status === "queued" || job.status === "running") {
      progress(job, (performance.now() - t0) / 1000);
      await sleep(delay);
      if (run !== state.run) return null;
      delay = Math.min(delay * 1.5, 2000);
      job = (await api(`v1/conversations/${encodeURIComponent(job.id)}`)).body;
    }
    if (job.status === "failed") throw new ApiError(job.error || { title: "The job failed", detail: "no details" });
    return job;
  }

  // ---------- status, errors, API key ----------
  function say(text, busy = false, fraction = null) {
    $("#status-text").textContent = text;
    const bar = $("#status-progress");
    bar.hidden = !busy;
    if (fraction === null) bar.removeAttribute("value");
    else bar.value = fraction;
    $("#status").setAttribute("aria-busy", busy ? "true" : "false");
  }

  function progress(job, seconds) {
    const what = job.status === "queued" ? "Queued, waiting for a worker" : "Running";
    const stage = job.stage ? `: ${job.stage}` : "";
    const frac = Number.isFinite(job.progress) ? job.progress : null;
    say(`${what}${stage}… ${Math.round(seconds)} s`, true, frac);
  }

  const FIELD_INPUTS = [
    [/^transcript/, "#transcript"], [/^video/, "#video"], [/^audio/, "#audio"], [/^model/, "#model"],
    [/^X-API-Key/i, "#api-key"], [/\.speaker$/, "#chat-speaker"], [/\.text$|^utterances$/, "#chat-text"],
  ];

  function clearError() {
    const box = $("#error");
    box.hidden = true;
    box.replaceChildren();
    for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  }

  function showError(err) {
    const p = err instanceof ApiError ? err.problem : { title: "Something went wrong", detail: String(err) };
    const box = $("#error");
    const head = `${p.title || "Error"}${p.status ? ` (${p.status})` : ""}`;
    const parts = [el("strong", { text: head }), el("p", { text: p.detail || "" })];
    if (p.field) parts.push(el("p", {}, "field: ", el("code", { text: p.field })));
    if (Array.isArray(p.errors) && p.errors.length > 1) {
      parts.push(el("ul", {}, p.errors.map((e) => el("li", {}, el("code", { text: e.field }), ` ${e.detail}`))));
    }
    if (p.status === 401) parts.push(el("p", { text: "Enter the server's API key above, then try again." }));
    box.replaceChildren(...parts);
    box.hidden = false;
    const match = p.field && FIELD_INPUTS.find(([re]) => re.test(p.field));
    if (match) $(match[1]).setAttribute("aria-invalid", "true");
    say("Stopped: see the error below.");
  }

  function showKeyForm() {
    const form = $("#key-form");
    if (form.hidden) {
      form.hidden = false;
      $("#api-key").focus();
    }
  }

  // ---------- models ----------
  async function loadModels() {
    const { body } = await api("v1/models");
    state.models = body.models || [];
    const select = $("#model");
    select.replaceChildren(...state.models.map((m) => {
      const w = m.dev_metrics ? m.dev_metrics.weighted_f1 : null; // a percentage (or a fraction)
      const f1 = Number.isFinite(w) ? ` (dev weighted F1 ${(w <= 1 ? w * 100 : w).toFixed(1)})` : "";
      const specs = Object.values(m.feature_spec || {});
      const inline = specs.length && specs.every((s) => s.version === "inline") ? " (precomputed features only)" : "";
      return el("option", { value: m.name, selected: m.name === body.default, text: `${m.name}${f1}${inline}` });
    }));
    describeModel();
  }

  function describeModel() {
    const m = state.models.find((x) => x.name === $("#model").value);
    $("#model-info").textContent = m
      ? `${m.architecture || "?"} trained on ${m.dataset || "?"}; uses ${(m.modalities || []).join(", ") || "?"}; labels: ${(m.labels || []).join(", ")}.`
      : "";
  }

  // ---------- the two ways in ----------
  async function onUpload(event) {
    event.preventDefault();
    clearError();
    const form = event.currentTarget;
    const files = ["video", "audio", "transcript"].map((n) => [n, form.elements[n].files[0]]).filter(([, f]) => f);
    if (!files.length) {
      showError(new ApiError({ title: "Nothing to upload", detail: "choose a video or audio file and its transcript", field: "video" }));
      return;
    }
    const data = new FormData();
    for (const [name, file] of files) data.append(name, file, file.name);
    if ($("#model").value) data.append("model", $("#model").value);
    const run = newConversation();
    const media = files.find(([n]) => n !== "transcript");
    if (media) state.media = { url: URL.createObjectURL(media[1]), kind: media[0] };
    busy(true);
    try {
      say("Uploading…", true, 0);
      const { body } = await upload("v1/conversations", data, (f) => say(f < 1 ? `Uploading… ${pct(f)}` : "Uploaded; checking the media…", true, f < 1 ? f : null));
      const job = await waitFor(body, run);
      if (job) show(job, "Done");
    } catch (e) {
      if (run === state.run) showError(e);
    } finally {
      busy(false);
    }
  }

  async function onChat(event) {
    event.preventDefault();
    clearError();
    const speaker = $("#chat-speaker").value.trim() || "user";
    const text = $("#chat-text").value.trim();
    if (!text) {
      showError(new ApiError({ title: "Empty turn", detail: "type what the speaker says", field: "utterances[0].text" }));
      return;
    }
    const turn = { utterances: [{ speaker, text }] };
    busy(true);
    try {
      const job = state.job;
      if (job && job.status === "succeeded") {
        const run = state.run;
        say("Scoring the new turn…", true);
        const { body } = await api(`v1/conversations/${encodeURIComponent(job.id)}/utterances`, { method: "POST", json: turn });
        if (run !== state.run) return; // "New conversation" was pressed meanwhile
        job.result.utterances.push(...body.utterances);
        job.n_utterances = job.result.utterances.length;
        show(job, `Turn ${body.utterances[0].index + 1} scored in context`);
      } else {
        const run = newConversation();
        say("Scoring…", true);
        const model = $("#model").value || undefined;
        const { body } = await api("v1/conversations", { method: "POST", json: { model, ...turn } });
        const done = await waitFor(body, run);
        if (done) show(done, "Turn 1 scored");
      }
      $("#chat-text").value = "";
      rememberSpeaker(speaker);
    } catch (e) {
      showError(e);
    } finally {
      busy(false);
      $("#chat-text").focus();
    }
  }

  function newConversation() {
    state.run += 1;
    state.job = null;
    state.selected = null;
    if (state.media) URL.revokeObjectURL(state.media.url);
    state.media = null;
    $("#result").hidden = true;
    $("#player-box").replaceChildren();
    return state.run;
  }

  function busy(on) {
    for (const id of ["#upload-submit", "#chat-submit"]) $(id).disabled = on;
  }

  function rememberSpeaker(name) {
    const list = $("#speakers");
    if (![...list.options].some((o) => o.value === name)) list.append(el("option", { value: name }));
  }

  // ---------- the result ----------
  function show(job, message) {
    state.job = job;
    const result = $("#result");
    result.hidden = false;
    result.dataset.conversationId = job.id;
    renderPlayer();
    renderTimeline();
    renderLegend();
    renderSummary();
    renderTable();
    const n = job.result.utterances.length;
    say(`${message}: ${n} utterance${n === 1 ? "" : "s"}, model ${job.result.model}.`);
  }

  function player() { return $("#player-box video, #player-box audio"); }

  function renderPlayer() {
    if (!state.media || player()) return;
    const media = el(state.media.kind === "video" ? "video" : "audio", {
      src: state.media.url, controls: true, preload: "metadata", "aria-label": "the uploaded conversation",
    });
    media.addEventListener("timeupdate", followPlayback);
    media.addEventListener("loadedmetadata", renderTimeline);
    $("#player-box").append(media);
  }

  function timed(utts) { return utts.length > 0 && utts.every((u) => Number.isFinite(u.start) && Number.isFinite(u.end)); }

  function extent(utts) { // the length of the time axis: media duration, or the last utterance end
    const media = Object.values(state.job.media || {}).map((m) => m.duration || 0);
    const p = player();
    const local = p && Number.isFinite(p.duration) ? p.duration : 0;
    return Math.max(local, ...media, ...utts.map((u) => u.end)) || 1;
  }

  function describe(u) {
    const rest = sorted(u.distribution).map(([k, v]) => `${k} ${pct(v)}`).join(", ");
    const when = span(u) ? `, ${span(u)}` : "";
    return `Utterance ${u.index + 1}, ${u.speaker}${when}: ${u.emotion}. Distribution: ${rest}.`;
  }

  function renderTimeline() {
    const { utterances: utts, labels } = state.job.result;
    const byTime = timed(utts);
    const total = byTime ? extent(utts) : utts.length;
    const speakers = [...new Set(utts.map((u) => u.speaker))];
    const box = $("#timeline");
    box.dataset.mode = byTime ? "time" : "turns";
    const bands = speakers.map((who) => {
      const track = el("div", { class: "track" });
      for (const u of utts.filter((x) => x.speaker === who)) {
        const from = byTime ? u.start : u.index;
        const len = byTime ? u.end - u.start : 1;
        const c = colour(u.emotion, labels);
        const seg = el("button", {
          type: "button", class: "segment", "aria-label": describe(u), // the tooltip's content, as text
          dataset: { segment: u.index, emotion: u.emotion },
          onclick: () => select(u.index, true), onmouseenter: (e) => tip(e.currentTarget, u),
          onmouseleave: untip, onfocus: (e) => tip(e.currentTarget, u), onblur: untip, onkeydown: segmentKeys,
        }, el("span", { text: u.emotion }));
        Object.assign(seg.style, { left: `${(100 * from) / total}%`, width: `${(100 * len) / total}%`, background: c, color: ink(c) });
        track.append(seg);
      }
      if (byTime) track.append(el("div", { class: "playhead", "aria-hidden": "true" }));
      return el("div", { class: "band", role: "group", "aria-label": `speaker ${who}` },
        el("div", { class: "band-label", text: who, title: who }), track);
    });
    box.replaceChildren(...bands, axis(byTime, total));
    markSelected();
    followPlayback();
  }

  function axis(byTime, total) {
    const ticks = el("div", { class: "ticks" });
    const steps = [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800];
    const step = byTime ? steps.find((s) => total / s <= 8) || 3600 : Math.max(1, Math.ceil(total / 10));
    for (let t = 0; t <= total + 1e-9; t += step) {
      const tick = el("span", { text: byTime ? clock(t) : `turn ${t + 1}` });
      tick.style.left = `${(100 * (byTime ? t : t + 0.5)) / total}%`; // turns: the middle of the slot
      if (byTime || t < total) ticks.append(tick);
    }
    return el("div", { class: "axis", "aria-hidden": "true" }, el("div", { class: "band-label" }), ticks);
  }

  function segmentKeys(event) {
    const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
    if (event.key === "Escape") untip();
    if (!step) return;
    event.preventDefault();
    const segs = [...document.querySelectorAll("#timeline .segment")].sort((a, b) => a.dataset.segment - b.dataset.segment);
    const at = segs.indexOf(event.currentTarget);
    const next = segs[Math.min(segs.length - 1, Math.max(0, at + step))];
    if (next) next.focus();
  }

  function tip(anchor, u) {
    state.tip = { anchor, u };
    const labels = state.job.result.labels;
    const box = $("#tooltip");
    const rows = sorted(u.distribution).map(([k, v]) => {
      const bar = el("span", { class: "tip-bar" });
      Object.assign(bar.style, { width: `${Math.max(1, v * 100)}%`, background: colour(k, labels) });
      return el("li", {}, el("span", { class: "tip-name", text: k }), el("span", { class: "tip-track" }, bar),
        el("span", { class: "tip-pct", text: pct(v) }));
    });
    const text = (u.text || "").length > 140 ? `${u.text.slice(0, 140)}…` : u.text || "(no text)";
    box.replaceChildren(
      el("strong", { text: `#${u.index + 1} · ${u.speaker}${span(u) ? ` · ${span(u)}` : ""}` }),
      el("p", { text }), el("ul", {}, rows));
    box.hidden = false;
    const r = anchor.getBoundingClientRect();
    const w = box.offsetWidth, h = box.offsetHeight;
    const left = Math.min(window.innerWidth - w - 8, Math.max(8, r.left + r.width / 2 - w / 2));
    const top = r.top - h - 8 > 0 ? r.top - h - 8 : r.bottom + 8;
    Object.assign(box.style, { left: `${left}px`, top: `${top}px` });
  }

  function untip() {
    state.tip = null;
    $("#tooltip").hidden = true;
  }

  function retip() { // keep the tooltip next to its segment when the page scrolls
    if (state.tip && state.tip.anchor.isConnected) tip(state.tip.anchor, state.tip.u);
    else untip();
  }

  function renderLegend() {
    const labels = state.job.result.labels;
    $("#legend").replaceChildren(...labels.map((k) => {
      const sw = el("span", { class: "swatch", "aria-hidden": "true" });
      sw.style.background = colour(k, labels);
      return el("li", {}, sw, k);
    }));
  }

  function renderSummary() {
    const { result } = state.job;
    const items = [el("li", { text: `model ${result.model} · labels: ${result.labels.join(", ")}` })];
    for (const [m, r] of Object.entries(result.modalities || {})) {
      if (!r.supplied && !r.used) continue;
      const what = r.used ? "used" : `not used${r.reason ? `: ${r.reason}` : ""}`;
      items.push(el("li", { text: `${m}: ${what}` }));
    }
    const tr = result.transcript;
    if (tr && tr.source === "asr") {
      const conf = Number.isFinite(tr.confidence) ? `, confidence ${pct(tr.confidence)}` : "";
      items.push(el("li", { text: `transcript: speech recognition (${tr.model || "?"}, ${tr.language || "?"}${conf}, speakers ${tr.speakers || "unknown"})` }));
    } else if (tr && tr.source) {
      items.push(el("li", { text: `transcript: ${tr.source}` }));
    }
    const readers = Object.entries(result.readings || {});
    if (readers.length) { // what made the face / voice readings: collapsed, it is long
      const about = readers.map(([kind, info]) => {
        const bits = [info.training_data && `trained on ${info.training_data}`, info.licence && `licence: ${info.licence}`,
          info.pooling && `pooling: ${info.pooling}`, info.accuracy && `accuracy: ${flat(info.accuracy)}`].filter(Boolean);
        return el("li", {}, el("b", { text: `${kind}: ${info.model || "?"}` }), bits.length ? ` — ${bits.join("; ")}` : "");
      });
      const names = readers.map(([kind, info]) => `${kind} ${info.model || "?"}`).join(", ");
      items.push(el("li", {}, el("details", {}, el("summary", { text: `readings beside the model: ${names}` }), el("ul", {}, about))));
    }
    $("#summary").replaceChildren(...items);
  }

  function flat(value) {
    if (value === null || typeof value !== "object") return String(value);
    return Object.entries(value).map(([k, v]) => `${k} ${typeof v === "number" ? +v.toFixed(3) : flat(v)}`).join(", ");
  }

  function distBar(dist, labels) {
    const bar = el("div", { class: "dist", role: "img", "aria-label": sorted(dist).map(([k, v]) => `${k} ${pct(v)}`).join(", ") });
    for (const k of labels) {
      const part = el("span", { title: `${k} ${pct(dist[k] || 0)}` });
      Object.assign(part.style, { width: `${100 * (dist[k] || 0)}%`, background: colour(k, labels) });
      bar.append(part);
    }
    return bar;
  }

  function readings(u) {
    const r = u.readings || {};
    const lines = [];
    if (r.face) {
      const frames = Number.isFinite(r.face.frames) ? `${r.face.frames}/${r.face.frames_sampled ?? "?"} frames with a face` : "";
      lines.push(reading("face", r.face, frames));
    }
    if (r.voice) {
      const secs = Number.isFinite(r.voice.speech_seconds) ? `${r.voice.speech_seconds.toFixed(1)} s of speech` : "";
      lines.push(reading("voice", r.voice, secs));
    }
    return lines.length ? lines : [el("span", { class: "hint", text: "—" })];
  }

  function reading(kind, r, extra) {
    const top = r.distribution && Number.isFinite(r.distribution[r.emotion]) ? ` ${pct(r.distribution[r.emotion])}` : "";
    const all = sorted(r.distribution).map(([k, v]) => `${k} ${pct(v)}`).join(", ");
    return el("div", { class: "reading", title: `${r.model || kind}: ${all}` }, el("b", { text: `${kind}: ` }),
      `${r.emotion}${top}`, extra ? el("span", { class: "hint", text: extra }) : null);
  }

  function renderTable() {
    const { utterances: utts, labels } = state.job.result;
    const rows = utts.map((u) => {
      const c = colour(u.emotion, labels);
      const sw = el("span", { class: "swatch", "aria-hidden": "true" });
      sw.style.background = c;
      const when = span(u)
        ? el("button", { type: "button", class: "link", "aria-label": `jump to ${clock(u.start)}`, onclick: () => select(u.index, true), text: span(u) })
        : el("span", { class: "hint", text: "—" });
      return el("tr", { dataset: { utteranceIndex: u.index, emotion: u.emotion } },
        el("td", { text: String(u.index + 1) }), el("td", { text: u.speaker }), el("td", {}, when),
        el("td", { class: "text", text: u.text || "" }),
        el("td", { class: "emotion" }, sw, el("span", { text: `${u.emotion} ${pct(u.distribution[u.emotion] || 0)}` }),
          distBar(u.distribution, labels)),
        el("td", { text: (u.modalities || []).join(", ") || "none" }),
        el("td", {}, readings(u)));
    });
    $("#utterances tbody").replaceChildren(...rows);
    markSelected();
  }

  function select(index, seek) {
    state.selected = index;
    const u = state.job.result.utterances.find((x) => x.index === index);
    const p = player();
    if (seek && p && u && Number.isFinite(u.start)) p.currentTime = u.start;
    markSelected();
    const row = document.querySelector(`#utterances tr[data-utterance-index="${index}"]`);
    if (row) row.scrollIntoView({ block: "nearest" });
  }

  function markSelected() {
    for (const node of document.querySelectorAll("#result .selected")) node.classList.remove("selected");
    if (state.selected === null) return;
    const sel = `[data-utterance-index="${state.selected}"], .segment[data-segment="${state.selected}"]`;
    for (const node of document.querySelectorAll(sel)) node.classList.add("selected");
  }

  function followPlayback() { // playhead and the utterance being spoken
    const p = player();
    if (!p || !state.job) return;
    const t = p.currentTime;
    const total = extent(state.job.result.utterances);
    for (const head of document.querySelectorAll("#timeline .playhead")) head.style.left = `${(100 * t) / total}%`;
    const now = state.job.result.utterances.find((u) => t >= u.start && t < u.end);
    for (const node of document.querySelectorAll("#result [aria-current]")) node.removeAttribute("aria-current");
    if (!now) return;
    const sel = `#utterances tr[data-utterance-index="${now.index}"], .segment[data-segment="${now.index}"]`;
    for (const node of document.querySelectorAll(sel)) node.setAttribute("aria-current", "true");
  }

  // ---------- start ----------
  function start() {
    $("#upload-form").addEventListener("submit", onUpload);
    $("#chat-form").addEventListener("submit", onChat);
    $("#chat-text").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("#chat-form").requestSubmit();
      }
    });
    $("#chat-new").addEventListener("click", () => {
      newConversation();
      clearError();
      say("New conversation: type its first turn.");
      $("#chat-text").focus();
    });
    $("#model").addEventListener("change", describeModel);
    $("#key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      state.key = $("#api-key").value.trim();
      sessionStorage.setItem(KEY_STORE, state.key);
      clearError();
      loadModels().then(() => say("Key accepted.")).catch(showError);
    });
    $("#api-key").value = state.key;
    if (state.key) $("#key-form").hidden = false;
    document.addEventListener("keydown", (e) => e.key === "Escape" && untip());
    window.addEventListener("scroll", retip, { passive: true });
    loadModels().catch(showError);
  }

  start();
})();
