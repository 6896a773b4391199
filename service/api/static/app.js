// The keyboard page: the text before the cursor lives in a server-side session fed over the
// session WebSocket (/v1/sessions/stream, docs/service.md "Sessions"), one message per keystroke.
//
// `sent` is the text the session has read. On every change of the text before the cursor:
//   * it extends `sent`               -> {text: the new characters}
//   * it only changes the last chunk  -> {replace_pending: the new chunk} (backspace, edits in the word)
//   * anything else (an edit further back, a paste over committed words, the cursor moved back)
//                                      -> a new session from the whole text (committed words are final)
// Replies come back in order; only the reply to the latest message is shown.
"use strict";

(() => {
  const MAX_URL_TEXT = 2000; // characters of text sent in the URL that opens a session (the tail)
  const MAX_URL_BYTES = 6000; // ... and at most this long once percent-encoded
  const MAX_DELTA = 4000; // a bigger change restarts the session (the server caps one delta)
  const MAX_BACKOFF_MS = 5000;
  const FRIENDLY = {
    no_model_loaded: "no model is loaded yet",
    queue_full: "the service is overloaded",
    session_store_unavailable: "the session store is unreachable",
    deadline_exceeded: "the service is too slow right now",
    session_busy: "the session is busy",
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    text: $("text"),
    model: $("model"),
    k: $("k"),
    chipBar: $("chips"),
    chips: Array.from($("chips").querySelectorAll(".chip")),
    more: $("more"),
    cont: $("continue"),
    status: $("status"),
    generation: $("generation"),
    message: $("message"),
  };

  const state = {
    socket: null, // the current WebSocket (null when closed)
    ready: false, // its session message arrived
    sessionId: null,
    sent: "", // the text the session has read (see the top of the file)
    seq: 0,
    inflight: new Map(), // seq -> performance.now() when sent
    opening: null, // {t0, note} of the session being opened
    last: null, // the predictions shown
    slots: [null, null, null], // suggestion objects in the chips (left, middle, right)
    dismissed: false, // Esc hid the suggestions until the next edit
    reconnectTimer: null,
    failures: 0, // consecutive failures, for the reconnect backoff
    idle: false, // the server closed an idle socket: reopen on the next edit only
    lastError: null, // the last error message of the current socket
    messageKind: null, // "connection" or "generate": which messages a success clears
    generating: null, // AbortController of a running "continue"
    models: [], // [{model, version}] per option of the picker
  };
  // A hook for tests and the curious: window.__nextword.socket.close() drops the connection.
  window.__nextword = { get socket() { return state.socket; }, state };

  // ------------------------------------------------------------------ helpers

  const beforeCaret = () => ui.text.value.slice(0, ui.text.selectionStart);
  const pendingOf = (text) => { const m = /\S+$/.exec(text); return m ? m[0] : ""; };
  const label = (s) => (typeof s.display === "string" && s.display ? s.display : String(s.word));
  const percent = (p) => (typeof p === "number" && isFinite(p) ? (p >= 0.995 ? "99%" : p >= 0.01 ? `${Math.round(p * 100)}%` : "<1%") : "");

  function kValue() {
    const k = Math.round(Number(ui.k.value));
    return Number.isFinite(k) ? Math.min(10, Math.max(1, k)) : 3;
  }

  function selectedModel() {
    return state.models[ui.model.selectedIndex] || {};
  }

  let noticeTimer = null;
  function showMessage(text, kind) {
    // kind: "connection" (trouble: cleared by the next success), "generate" (cleared by the next
    // continue), "notice" (something that happened and is over: cleared after a few seconds).
    clearTimeout(noticeTimer);
    ui.message.textContent = text;
    state.messageKind = kind;
    if (kind === "notice") noticeTimer = setTimeout(() => clearMessage("notice"), 6000);
  }

  function clearMessage(kind) {
    if (state.messageKind === kind) showMessage("", null);
  }

  function describe(error) {
    // error: {status, error: {type, message}} from the socket, or the body of an HTTP error.
    const type = error && error.error && error.error.type;
    if (type && FRIENDLY[type]) return FRIENDLY[type];
    const message = error && error.error && error.error.message;
    return typeof message === "string" && message ? message.slice(0, 200) : "unexpected error";
  }

  // ------------------------------------------------------------------ the session socket

  function streamURL(text) {
    const params = new URLSearchParams({ k: String(kValue()), text });
    const { model, version } = selectedModel();
    if (model) params.set("model", model);
    if (version) params.set("version", String(version));
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/v1/sessions/stream?${params}`;
  }

  function dropSocket() {
    const socket = state.socket;
    state.socket = null;
    state.ready = false;
    state.inflight.clear();
    if (!socket) return;
    socket.onclose = null;
    const forget = (id) => {
      if (id) fetch(`/v1/sessions/${encodeURIComponent(id)}`, { method: "DELETE", keepalive: true }).catch(() => {});
    };
    if (socket.readyState === WebSocket.CONNECTING) {
      // Closing before the handshake leaves a session nobody knows: close it once it says its id.
      socket.onmessage = (event) => {
        try { forget(JSON.parse(event.data).session_id); } catch (_) { /* not JSON: nothing to forget */ }
        socket.close(1000, "replaced");
      };
    } else {
      socket.onmessage = null;
      if (socket.readyState === WebSocket.OPEN) socket.close(1000, "replaced");
      forget(state.sessionId);
    }
    state.sessionId = null;
  }

  // Where the text that opens a session starts: all of it when it fits in the URL, else a tail cut
  // at a word boundary (plenty of context for the next word; servers cap a request line near 8 KB).
  function tailStart(full) {
    // Never start between the two halves of a surrogate pair (encodeURIComponent throws on it).
    const whole = (i) => (i > 0 && i < full.length && /[\uDC00-\uDFFF]/.test(full[i]) ? i + 1 : i);
    let start = whole(Math.max(0, full.length - MAX_URL_TEXT));
    while (start < full.length && encodeURIComponent(full.slice(start)).length > MAX_URL_BYTES) {
      start = whole(start + Math.ceil((full.length - start) / 2));
    }
    if (start > 0) {
      const space = full.slice(start).search(/\s/);
      start = space < 0 ? start : start + space + 1;
    }
    return start;
  }

  function openSession(note) {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    dropSocket();
    state.idle = false;
    const full = beforeCaret();
    const socket = new WebSocket(streamURL(full.slice(tailStart(full))));
    state.socket = socket;
    state.sent = full;
    state.seq = 0;
    state.lastError = null;
    state.opening = { t0: performance.now(), note };
    socket.onmessage = (event) => onMessage(socket, event);
    socket.onclose = (event) => onClose(socket, event);
  }

  function reconnect(delayMs) {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(() => {
      state.reconnectTimer = null;
      openSession("new session (reconnected)");
    }, delayMs);
  }

  function backoff(minimumMs = 0) {
    const delay = state.failures === 0 ? 0 : Math.min(MAX_BACKOFF_MS, 250 * 2 ** (state.failures - 1));
    state.failures += 1;
    return Math.max(minimumMs, delay);
  }

  function onMessage(socket, event) {
    if (socket !== state.socket) return;
    let msg;
    try { msg = JSON.parse(event.data); } catch (_) { return; }
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "session") {
      state.ready = true;
      state.sessionId = msg.session_id;
      clearMessage("connection");
      const opening = state.opening || { t0: performance.now(), note: "new session" };
      // Text typed while the socket opened is sent now, and its reply shown instead.
      if (msg.predictions && beforeCaret() === state.sent) show(msg.predictions, performance.now() - opening.t0, opening.note);
      sync();
    } else if (msg.type === "predictions") {
      const t0 = state.inflight.get(msg.seq);
      state.inflight.delete(msg.seq);
      if (msg.seq !== state.seq) return; // superseded by a later keystroke
      state.failures = 0; // only an answered update proves the session works (not its opening)
      clearMessage("connection");
      const note = msg.rebuilt ? `session rebuilt on version ${msg.version}` : "session kept";
      show(msg, t0 === undefined ? NaN : performance.now() - t0, note);
      if (msg.rebuilt) {
        showMessage(`The session's model version was unloaded; it goes on with version ${msg.version},`
          + " rebuilt from its recent words.", "notice");
      }
    } else if (msg.type === "error") {
      state.inflight.delete(msg.seq);
      state.lastError = msg;
      const type = msg.error && msg.error.type;
      if (!state.ready || type === "session_expired" || type === "session_not_found") return; // a close follows
      // The update was not applied, so the session no longer holds `sent`: start again from the text.
      const retryLater = msg.status >= 500 || msg.status === 409;
      if (retryLater) showMessage(`Suggestions paused: ${describe(msg)}. Retrying…`, "connection");
      dropSocket();
      reconnect(backoff(retryLater ? 1000 : 0));
    }
  }

  function onClose(socket, event) {
    if (socket !== state.socket) return;
    const error = state.lastError;
    state.socket = null;
    state.ready = false;
    state.sessionId = null;
    state.inflight.clear();
    const type = error && error.error && error.error.type;
    if (event.code === 1000 && /^idle/.test(event.reason)) {
      state.idle = true;
      showMessage("The session closed after being idle; it reopens as you type.", "connection");
    } else if (type === "session_expired" || type === "session_not_found") {
      const why = type === "session_expired" ? "expired" : "ended on the server";
      showMessage(`The session ${why}; a new one was started from your text.`, "notice");
      reconnect(backoff());
    } else if (error && (event.code === 1013 || error.status >= 500)) {
      const delay = backoff(1000);
      showMessage(`Suggestions paused: ${describe(error)}. Retrying in ${Math.ceil(delay / 1000)} s…`, "connection");
      reconnect(delay);
    } else if (error) {
      const delay = backoff(1000);
      showMessage(`The service refused the session: ${describe(error)}.`, "connection");
      reconnect(delay);
    } else if (event.code === 1012) {
      showMessage("The service is restarting; reconnecting…", "connection");
      reconnect(backoff(500));
    } else {
      const delay = backoff();
      showMessage("Connection lost; reconnecting…", "connection");
      reconnect(delay);
    }
  }

  function send(body, target) {
    state.seq += 1;
    state.inflight.set(state.seq, performance.now());
    state.socket.send(JSON.stringify({ seq: state.seq, ...body, k: kValue() }));
    state.sent = target;
  }

  // Bring the session up to the text before the cursor (cheap when nothing changed).
  function sync() {
    if (state.reconnectTimer) return; // a reconnect is scheduled; it reads the text then
    if (!state.socket) {
      if (state.models.length) openSession(state.idle ? "new session (was idle)" : "new session");
      return;
    }
    if (!state.ready) return; // the session message triggers a sync
    const target = beforeCaret();
    const sent = state.sent;
    if (target === sent) return;
    const committed = sent.slice(0, sent.length - pendingOf(sent).length);
    if (target.startsWith(sent) && target.length - sent.length <= MAX_DELTA) {
      send({ text: target.slice(sent.length) }, target);
    } else if (target.startsWith(committed) && target.length - committed.length <= MAX_DELTA) {
      send({ replace_pending: target.slice(committed.length) }, target);
    } else {
      openSession("new session (edit before the current word)");
    }
  }

  // ------------------------------------------------------------------ suggestions

  function show(p, rttMs, note) {
    state.last = p;
    const predictions = Array.isArray(p.predictions) ? p.predictions.filter((s) => s && s.word != null) : [];
    // Gboard's strip: the best in the middle, the second on the left, the third on the right.
    state.slots = [predictions[1] || null, predictions[0] || null, predictions[2] || null];
    ui.chips.forEach((chip, i) => {
      const s = state.slots[i];
      chip.disabled = !s;
      chip.classList.toggle("correction", Boolean(s && s.correction));
      chip.querySelector(".word").textContent = s ? label(s) : "";
      chip.querySelector(".p").textContent = s ? percent(s.probability) : "";
      chip.setAttribute("aria-label", s ? `${label(s)}, ${percent(s.probability)}${i === 1 ? ", best" : ""}` : "no suggestion");
    });
    ui.more.replaceChildren(...predictions.slice(3).map((s) => {
      const button = document.createElement("button");
      button.type = "button";
      const word = document.createElement("span");
      word.textContent = label(s);
      const prob = document.createElement("span");
      prob.className = "p";
      prob.textContent = percent(s.probability);
      button.append(word, prob);
      button.addEventListener("mousedown", (e) => e.preventDefault());
      button.addEventListener("click", () => accept(s));
      return button;
    }));
    ui.more.hidden = predictions.length <= 3;
    ui.chipBar.classList.toggle("dismissed", state.dismissed);
    const rtt = Number.isFinite(rttMs) ? `${Math.round(rttMs)} ms` : "–";
    const where = p.model ? ` · ${p.model} v${p.version}` : "";
    ui.status.textContent = `last keystroke: ${rtt} round trip · ${note}${where}`;
  }

  // Insert a suggestion: it replaces the word being typed (the part of it the suggestion starts
  // with), or follows the text; then a space.
  function accept(s) {
    if (state.generating) return; // Continue is writing at the cursor
    const ta = ui.text;
    const caret = ta.selectionStart;
    const before = ta.value.slice(0, caret);
    let word = label(s);
    let from = caret;
    const prefix = (state.last && state.last.prefix) || "";
    if (prefix) {
      const chunk = pendingOf(before);
      const lower = word.toLowerCase();
      for (let n = chunk.length; n > 0; n -= 1) {
        const typed = chunk.slice(chunk.length - n);
        if (lower.startsWith(typed.toLowerCase())) {
          from = caret - n;
          // Keep a capital the user typed ("Sta" + states -> "States").
          if (typed[0] !== typed[0].toLowerCase() && word === lower) word = word[0].toUpperCase() + word.slice(1);
          break;
        }
      }
    }
    if (from === caret && before && !/\s$/.test(before)) word = ` ${word}`;
    ta.setRangeText(`${word} `, from, ta.selectionEnd, "end");
    ta.focus();
    state.dismissed = false;
    sync();
  }

  ui.chips.forEach((chip, i) => {
    chip.addEventListener("mousedown", (e) => e.preventDefault()); // keep the cursor in the text box
    chip.addEventListener("click", () => { if (state.slots[i]) accept(state.slots[i]); });
  });

  // ------------------------------------------------------------------ continue (/v1/generate, SSE)

  async function errorText(response) {
    try { return describe(await response.json()); } catch (_) { return `HTTP ${response.status}`; }
  }

  function* events(buffer) {
    // Complete server-sent events in `buffer.text` ("event: x\ndata: {...}\n\n"); leaves the rest.
    let end;
    while ((end = buffer.text.indexOf("\n\n")) >= 0) {
      const block = buffer.text.slice(0, end);
      buffer.text = buffer.text.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      let payload = null;
      try { payload = JSON.parse(data.join("\n")); } catch (_) { /* ignored */ }
      yield [name, payload];
    }
  }

  async function continueText() {
    if (state.generating) { state.generating.abort(); return; }
    const controller = new AbortController();
    state.generating = controller;
    clearMessage("generate");
    ui.generation.textContent = "";
    ui.cont.textContent = "Stop";
    ui.text.readOnly = true;
    ui.text.setAttribute("aria-busy", "true");
    let caret = ui.text.selectionStart;
    const t0 = performance.now();
    let words = 0;
    let firstMs = NaN;
    const { model, version } = selectedModel();
    const request = {
      prompt: ui.text.value.slice(0, caret), max_words: 16, strategy: "sample", temperature: 0.8, top_p: 0.9,
      stream: true, ...(model ? { model } : {}), ...(version ? { version } : {}),
    };
    try {
      const response = await fetch("/v1/generate", {
        method: "POST", signal: controller.signal, body: JSON.stringify(request),
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      });
      if (!response.ok) {
        showMessage(`Continue failed: ${await errorText(response)}.`, "generate");
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const buffer = { text: "" };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer.text += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        for (const [name, data] of events(buffer)) {
          if (name === "word" && data && data.index === 0 && typeof data.text === "string") {
            if (!words) firstMs = performance.now() - t0;
            words += 1;
            ui.text.setRangeText(data.text, caret, caret, "end");
            caret += data.text.length;
            ui.text.setSelectionRange(caret, caret);
            sync();
          } else if (name === "error") {
            showMessage(`Continue stopped: ${describe(data)}.`, "generate");
          }
        }
      }
      ui.generation.textContent = `continued: ${words} word${words === 1 ? "" : "s"} · first after ${Math.round(firstMs)} ms`
        + ` · all after ${Math.round(performance.now() - t0)} ms`;
    } catch (error) {
      if (!error || error.name !== "AbortError") showMessage("Continue failed: the connection was lost.", "generate");
    } finally {
      state.generating = null;
      ui.cont.textContent = "Continue";
      ui.text.readOnly = false;
      ui.text.removeAttribute("aria-busy");
      ui.text.focus();
      sync();
    }
  }

  // ------------------------------------------------------------------ models

  async function loadModels() {
    const options = [];
    try {
      const response = await fetch("/v1/models");
      if (!response.ok) throw new Error(await errorText(response));
      const body = await response.json();
      for (const m of body.models || []) {
        options.push({ text: `${m.name} (serving version)`, value: { model: m.name }, selected: m.name === body.default_model });
        for (const v of m.versions || []) {
          const usable = v.status === "serving" || v.status === "loaded";
          options.push({ text: `${m.name} v${v.version}${v.status === "serving" ? " (serving)" : usable ? "" : ` (${v.status})`}`,
            value: { model: m.name, version: v.version }, disabled: !usable });
        }
      }
    } catch (_) {
      showMessage("Could not list the models; using the default one.", "connection");
    }
    if (!options.length) options.push({ text: "default model", value: {} });
    ui.model.replaceChildren(...options.map((o) => {
      const option = new Option(o.text, "", false, Boolean(o.selected));
      option.disabled = Boolean(o.disabled);
      return option;
    }));
    state.models = options.map((o) => o.value);
  }

  // ------------------------------------------------------------------ events

  ui.text.addEventListener("input", () => { state.dismissed = false; ui.chipBar.classList.remove("dismissed"); sync(); });
  for (const type of ["keyup", "click", "focus"]) ui.text.addEventListener(type, () => sync());
  document.addEventListener("selectionchange", () => { if (document.activeElement === ui.text) sync(); });
  ui.text.addEventListener("keydown", (e) => {
    const plainTab = e.key === "Tab" && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey;
    if (plainTab && !state.dismissed && !state.generating && state.slots[1]) {
      e.preventDefault();
      accept(state.slots[1]);
    } else if (e.key === "Escape") {
      state.dismissed = true;
      ui.chipBar.classList.add("dismissed");
    }
  });
  ui.model.addEventListener("change", () => openSession("new session (model changed)"));
  ui.k.addEventListener("change", () => {
    ui.k.value = String(kValue());
    if (state.ready) send({ text: "" }, state.sent); // the same text, the new number of suggestions
  });
  ui.cont.addEventListener("click", continueText);

  loadModels().then(() => openSession("new session"));
})();
