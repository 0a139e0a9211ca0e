// The clinicians' page. The conversation lives in this page's memory only: nothing is
// written to localStorage, sessionStorage, IndexedDB or cookies. Every request goes to
// this appliance's own origin.
"use strict";

(function () {
  const body = document.body;
  const csrf = body.dataset.csrf;
  const caution = body.dataset.caution || "";
  const idleSeconds = Number(body.dataset.idleSeconds || "900");
  const form = document.getElementById("ask-form");
  const modelSelect = document.getElementById("model");
  const sourcesSelect = document.getElementById("sources");
  const about = document.getElementById("model-about");
  const question = document.getElementById("question");
  const askButton = document.getElementById("ask");
  const stopButton = document.getElementById("stop");
  const clearButton = document.getElementById("clear");
  const log = document.getElementById("conversation");
  const status = document.getElementById("status");

  let history = []; // [{role, content}], in memory only
  // The conversation's key, from its first answer: sent with every later turn, so that
  // behind a balancer the conversation stays on the box that holds its beginning.
  let conversationId = "";
  let models = {};
  let controller = null;
  let idleTimer = null;

  function say(text, kind) {
    status.textContent = text;
    status.className = kind || "";
  }

  function clearConversation() {
    history = [];
    conversationId = "";
    log.replaceChildren();
  }

  function signedOut(message) {
    clearConversation();
    form.hidden = true;
    say(message || "You are signed out.", "error");
    const link = document.createElement("a");
    link.href = "/login";
    link.textContent = "Sign in again";
    status.append(" ", link);
  }

  function resetIdleTimer() {
    if (idleTimer !== null) window.clearTimeout(idleTimer);
    idleTimer = window.setTimeout(idleSignOut, idleSeconds * 1000);
  }

  function idleSignOut() {
    clearConversation();
    // End the session on the appliance too, then show the sign-in page.
    fetch("/logout", {
      method: "POST",
      headers: {"Content-Type": "application/x-www-form-urlencoded"},
      body: "csrf_token=" + encodeURIComponent(csrf),
      credentials: "same-origin",
      redirect: "manual",
    }).finally(function () { window.location.assign("/login?expired=1"); });
  }

  ["keydown", "pointerdown", "input"].forEach(function (name) {
    document.addEventListener(name, resetIdleTimer, {passive: true});
  });

  function addMessage(role, text) {
    const item = document.createElement("article");
    item.className = "message " + role;
    const who = document.createElement("h2");
    who.textContent = role === "user" ? "You" : "Answer";
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    item.append(who, content);
    log.append(item);
    return item;
  }

  // A routed answer says which model answered it and why, or that it was referred.
  const OUTCOMES = {
    specialist: "answered by the specialist ",
    generalist: "outside the specialists' domains: answered by the generalist ",
    fallback: "the specialist was not confident: answered by the generalist ",
    referral: "neither model was confident: referred",
  };

  function routeNote(item, route) {
    const note = document.createElement("p");
    note.className = "meta route";
    note.dataset.outcome = route.outcome;
    const by = route.outcome === "referral" ? "" : route.answered_by;
    note.textContent = "Route " + route.route + ": " + (OUTCOMES[route.outcome] || "") + by;
    item.append(note);
  }

  // A grounded answer lists the passages it cites; each opens to the passage's text.
  function sourcesNote(item, grounding) {
    const box = document.createElement("div");
    box.className = "sources";
    if (grounding.no_source) {
      const none = document.createElement("p");
      none.className = "meta no-source";
      none.textContent = "No source found in " + grounding.collections.join(", ") + ".";
      box.append(none);
      item.append(box);
      return;
    }
    const title = document.createElement("p");
    title.className = "meta";
    title.textContent = grounding.citations.length ? "Sources cited:" :
      "Sources given, none cited:";
    box.append(title);
    const list = document.createElement("ol");
    const shown = grounding.citations.length ? grounding.citations : grounding.sources;
    for (const c of shown) {
      const entry = document.createElement("li");
      entry.value = c.source;
      entry.className = "source";
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = "[" + c.source + "] " + c.document + ", version " + c.version +
        (c.heading ? " (" + c.heading + ")" : "") +
        (c.cited_by === "attributed" ? ": attributed, not cited by the model" : "");
      const passage = document.createElement("blockquote");
      passage.className = "passage";
      passage.textContent = c.text;
      details.append(summary, passage);
      entry.append(details);
      list.append(entry);
    }
    box.append(list);
    item.append(box);
  }

  function finishAnswer(item, requestId, text, route, grounding) {
    if (route) routeNote(item, route);
    if (grounding) sourcesNote(item, grounding);
    const small = document.createElement("p");
    small.className = "meta caution-note";
    small.textContent = caution;
    item.append(small);
    const meta = document.createElement("p");
    meta.className = "meta";
    const cite = document.createElement("span");
    cite.className = "audit-id";
    cite.textContent = "Audit id: " + requestId;
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy answer";
    copy.addEventListener("click", function () {
      const done = function () { say("Answer copied.", ""); };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, function () { say("Copy failed.", "error"); });
      } else {
        const area = document.createElement("textarea");
        area.value = text;
        document.body.append(area);
        area.select();
        document.execCommand("copy");
        area.remove();
        done();
      }
    });
    meta.append(cite, " ", copy);
    item.append(meta);
  }

  async function errorMessage(response) {
    let detail = "";
    try {
      const data = await response.json();
      detail = (data.error && (data.error.message || data.error)) || "";
    } catch (e) { detail = ""; }
    if (response.status === 401) return {signedOut: true, text: "You are signed out."};
    if (response.status === 503) {
      const wait = response.headers.get("Retry-After");
      if (detail.indexOf("busy") !== -1 && wait) {
        return {text: "The specialist is busy: try again in " + wait + " s."};
      }
      return {text: "This specialist is unavailable: " + detail};
    }
    if (response.status === 429) {
      return {text: "Too many questions at once: try again in " +
        (response.headers.get("Retry-After") || "a few") + " s."};
    }
    return {text: "The question was not accepted: " + detail};
  }

  function setBusy(busy) {
    askButton.disabled = busy;
    stopButton.disabled = !busy;
    modelSelect.disabled = busy;
  }

  // A plain model: a little cooler than the API's default. A specialist: its manifest's
  // sampling. A route: the temperature its thresholds were calibrated at (the server's).
  function sampling(m) {
    const kind = m ? m.kind : "chat";
    if (kind === "specialist" || kind === "route") return {};
    return {temperature: 0.7};
  }

  async function ask(text) {
    const model = modelSelect.value;
    history.push({role: "user", content: text});
    addMessage("user", text);
    const answer = addMessage("assistant", "");
    const content = answer.querySelector(".content");
    controller = new AbortController();
    setBusy(true);
    const routed = models[model] && models[model].kind === "route";
    // A route checks an answer before it shows it: the text comes whole, a moment later.
    say(routed ? "Answering… (routed: the answer shows once it is checked)" : "Answering…", "");
    let received = "";
    let route = null;
    let grounding = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: Object.assign(
          {"Content-Type": "application/json", "X-CSRF-Token": csrf},
          conversationId ? {"X-Conversation-Id": conversationId} : {}),
        // The answer's length is the server's to bound (the site's max_tokens, the
        // context left, a specialist's default); the sampling is the model's own where
        // it has one (sampling()).
        body: JSON.stringify(Object.assign(
          {model: model, messages: history, stream: true},
          sampling(models[model]),
          sourcesSelect.value ?
            {appliance_grounding: {collections: [sourcesSelect.value]}} : {})),
        credentials: "same-origin",
        signal: controller.signal,
      });
      if (!response.ok) {
        const problem = await errorMessage(response);
        answer.remove();
        history.pop();
        if (problem.signedOut) { signedOut(problem.text); return; }
        say(problem.text, "error");
        question.value = text;
        return;
      }
      const requestId = response.headers.get("X-Request-Id") || "";
      answer.dataset.requestId = requestId;
      conversationId = response.headers.get("X-Conversation-Id") || conversationId;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        const chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) !== -1) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") { done = true; break; }
            const parsed = JSON.parse(data);
            if (parsed.error) { throw new Error(parsed.error.message || "generation failed"); }
            if (parsed.appliance_route) route = parsed.appliance_route;
            if (parsed.appliance_grounding) grounding = parsed.appliance_grounding;
            const delta = parsed.choices && parsed.choices[0] && parsed.choices[0].delta;
            if (delta && delta.content) {
              received += delta.content;
              content.textContent = received;
            }
          }
        }
      }
      history.push({role: "assistant", content: received});
      finishAnswer(answer, requestId, received, route, grounding);
      say("", "");
    } catch (error) {
      if (error.name === "AbortError") {
        history.push({role: "assistant", content: received});
        finishAnswer(answer, answer.dataset.requestId || "", received);
        say("Stopped.", "");
      } else if (error instanceof TypeError) {
        answer.remove();
        history.pop();
        question.value = text;
        say("Network lost: the appliance cannot be reached. Your question is kept; try again.",
            "error");
      } else {
        say("The answer failed: " + error.message, "error");
      }
    } finally {
      controller = null;
      setBusy(false);
    }
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const text = question.value.trim();
    if (!text || controller) return;
    question.value = "";
    ask(text);
  });
  question.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stopButton.addEventListener("click", function () {
    if (controller) controller.abort();
  });
  clearButton.addEventListener("click", function () {
    if (!controller) { clearConversation(); say("", ""); }
  });
  modelSelect.addEventListener("change", function () {
    const m = models[modelSelect.value];
    about.textContent = m ? m.domain + ": " + m.description : "";
  });

  async function loadModels() {
    try {
      const response = await fetch("/v1/models", {credentials: "same-origin"});
      if (!response.ok) {
        const problem = await errorMessage(response);
        if (problem.signedOut) { signedOut(problem.text); return; }
        say(problem.text, "error");
        return;
      }
      const data = await response.json();
      modelSelect.replaceChildren();
      // Only the models that answer questions; embedding models serve search.
      const chat = data.data.filter(function (m) {
        return m.kind === "chat" || m.kind === "specialist" ||
          (m.kind === "route" && m.state === "ready");
      });
      for (const m of chat) {
        models[m.id] = m;
        const option = document.createElement("option");
        option.value = m.id;
        // A model that is not loaded takes a few seconds more on its first question.
        const later = m.state === "ready" ? "" : ", loads when first asked";
        option.textContent = m.id + " (" + m.domain + later + ")";
        modelSelect.append(option);
      }
      const preferred = chat.find(function (m) { return m.default; });
      if (preferred) modelSelect.value = preferred.id;  // the default model, until one is picked
      if (!chat.length) say("No specialist is available right now.", "error");
      modelSelect.dispatchEvent(new Event("change"));
    } catch (error) {
      say("Network lost: the appliance cannot be reached.", "error");
    }
  }

  // The document collections this user may read: an answer can be grounded on one.
  async function loadCollections() {
    try {
      const response = await fetch("/v1/collections", {credentials: "same-origin"});
      if (!response.ok) return;
      const data = await response.json();
      for (const c of data.data) {
        const option = document.createElement("option");
        option.value = c.id;
        option.textContent = "Documents: " + c.id + " (" + c.documents + ")";
        sourcesSelect.append(option);
      }
    } catch (error) {
      // the picker keeps its one choice: the model's own knowledge
    }
  }

  // The caution shows when the page opens, until it is acknowledged (this page only:
  // nothing is stored); every answer carries it in small print.
  document.getElementById("caution-ok").addEventListener("click", function () {
    document.getElementById("caution").hidden = true;
    question.focus();
  });

  resetIdleTimer();
  loadModels();
  loadCollections();
})();
