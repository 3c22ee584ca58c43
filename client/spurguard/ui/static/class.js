// The class page of `spurguard ui`: one row per component. Visualize streams fill each row
// (top images, heatmaps, the feature attack as it runs); labels are set with buttons or keys
// and other labellers' changes arrive on a live stream. Plain JS, no libraries, no network
// assets: everything comes from this app (app.py), which talks to spurguard over gRPC.
"use strict";

(() => {
  const page = JSON.parse(document.getElementById("page-data").textContent);
  const base = `/models/${encodeURIComponent(page.model)}/classes/${page.class_index}`;
  const rows = [...document.querySelectorAll("section.component")];
  const byComponent = new Map(rows.map((row) => [Number(row.dataset.component), row]));
  const part = (row, role) => row.querySelector(`[data-role="${role}"]`);
  const banner = document.getElementById("banner");
  const VISUALIZE_AT_ONCE = 2; // a server runs few heavy calls at once (serve --max-heavy-calls)
  const RETRY_BUSY_MS = 3000;
  let focused = 0;
  let labels = page.labels;

  // ---- messages ----

  function showBanner(text, kind) {
    banner.textContent = text;
    banner.className = `banner ${kind || "error"}`;
    banner.hidden = false;
  }

  function clearBanner(kind) {
    if (!kind || banner.classList.contains(kind)) banner.hidden = true;
  }

  function problemText(problem) {
    return problem.details ? `${problem.error} (${problem.code}: ${problem.details})` : problem.error;
  }

  // ---- focus and keys ----

  function focusRow(index, scroll) {
    if (!rows.length) return;
    focused = Math.max(0, Math.min(rows.length - 1, index));
    rows.forEach((row, i) => row.classList.toggle("focused", i === focused));
    if (scroll) rows[focused].scrollIntoView({ block: "nearest", behavior: "smooth" });
    startVisualizations();
  }

  const KEY_LABELS = { s: "spurious", n: "not_spurious", i: "inconsistent", u: "unlabeled" };

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target instanceof HTMLInputElement && target.dataset.role === "note") {
      if (event.key === "Enter") {
        event.preventDefault();
        saveNote(target.closest("section.component"));
      } else if (event.key === "Escape") {
        const row = target.closest("section.component");
        delete target.dataset.edited;
        target.value = currentLabel(Number(row.dataset.component)).note;
        target.blur();
      }
      return;
    }
    if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
    const row = rows[focused];
    if (event.key === "j") focusRow(focused + 1, true);
    else if (event.key === "k") focusRow(focused - 1, true);
    else if (event.key === "h") toggleHeatmaps();
    else if (event.key === "/" && row) part(row, "note").select(); // typing replaces, arrows edit
    else if (KEY_LABELS[event.key] && row) setLabel(row, KEY_LABELS[event.key]);
    else return;
    event.preventDefault();
  });

  rows.forEach((row, i) => {
    row.addEventListener("click", () => focusRow(i, false));
    row.querySelectorAll("button[data-label]").forEach((button) =>
      button.addEventListener("click", (event) => {
        event.stopPropagation();
        focusRow(i, false);
        setLabel(row, button.dataset.label);
      }));
    const note = part(row, "note");
    note.addEventListener("focus", () => focusRow(i, false));
    // a note being written is not overwritten by someone else's change until it is saved or dropped
    note.addEventListener("input", () => { note.dataset.edited = "1"; });
  });

  // ---- heatmaps ----

  const heatmapButton = document.getElementById("toggle-heatmaps");
  function toggleHeatmaps() {
    const on = document.body.classList.toggle("show-heatmaps");
    heatmapButton.setAttribute("aria-pressed", String(on));
    heatmapButton.textContent = on ? "Show images" : "Show heatmaps";
  }
  heatmapButton.addEventListener("click", toggleHeatmaps);

  // ---- labels ----

  function currentLabel(component) {
    return labels.labels[String(component)] || { label: "unlabeled", note: "", author: "", updated: null };
  }

  function when(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
  }

  function byWhom(record) {
    return record.author || "anonymous (server without tokens)";
  }

  function renderLabel(row, fresh) {
    const component = Number(row.dataset.component);
    const record = currentLabel(component);
    const badge = part(row, "badge");
    const changed = badge.dataset.updated !== String(record.updated);
    badge.className = `label ${record.label}`;
    badge.textContent = record.label.replace("_", " ");
    badge.dataset.updated = String(record.updated);
    row.dataset.label = record.label;
    part(row, "who").textContent = record.updated ? `by ${byWhom(record)}, ${when(record.updated)}` : "";
    const note = part(row, "note");
    if (document.activeElement !== note && !note.dataset.edited) note.value = record.note;
    const writes = labels.history[String(component)] || [];
    const history = part(row, "history");
    history.querySelector("summary").textContent = `history (${writes.length})`;
    history.hidden = writes.length === 0;
    const list = history.querySelector("ol");
    list.replaceChildren(...writes.map((w) => {
      const item = document.createElement("li");
      const tag = document.createElement("span");
      tag.className = `label ${w.label}`;
      tag.textContent = w.label.replace("_", " ");
      item.append(tag, ` ${byWhom(w)}, ${when(w.updated)}`);
      if (w.note) {
        const text = document.createElement("q");
        text.textContent = w.note;
        item.append(": ", text);
      }
      return item;
    }));
    if (fresh && changed) {
      row.classList.remove("flash");
      void row.offsetWidth; // restart the animation
      row.classList.add("flash");
    }
  }

  function renderLabels(fresh) {
    rows.forEach((row) => renderLabel(row, fresh));
  }

  async function send(row, label, note) {
    const component = Number(row.dataset.component);
    const status = part(row, "status");
    status.textContent = "saving…";
    try {
      const response = await fetch(`/api${base}/components/${component}/label`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ label, note }),
      });
      const body = await response.json();
      if (!response.ok) {
        status.textContent = "";
        showBanner(problemText(body));
        return;
      }
      delete part(row, "note").dataset.edited;
      if (body.label === "unlabeled") delete labels.labels[String(component)];
      else labels.labels[String(component)] = body;
      status.textContent = "saved";
      clearBanner("error");
      renderLabel(row, false);
    } catch (error) {
      status.textContent = "";
      showBanner(`The ui itself did not answer (${error}); is spurguard ui still running?`);
    }
  }

  function setLabel(row, label) {
    const note = part(row, "note");
    send(row, label, label === "unlabeled" ? "" : note.value);
  }

  function saveNote(row) {
    const record = currentLabel(Number(row.dataset.component));
    if (record.label === "unlabeled") {
      part(row, "status").textContent = "choose a label (s, n or i) to save the note with";
      return;
    }
    send(row, record.label, part(row, "note").value);
    part(row, "note").blur();
  }

  function watchLabels() {
    const source = new EventSource(`/events${base}/labels`);
    source.addEventListener("labels", (event) => {
      labels = JSON.parse(event.data);
      clearBanner("live");
      renderLabels(true);
    });
    source.addEventListener("error", (event) => {
      if (event.data) showBanner(`Live updates paused: ${problemText(JSON.parse(event.data))}`, "live");
    });
    window.addEventListener("pagehide", () => source.close());
  }

  // ---- visualizations ----

  const queue = rows.map((row) => Number(row.dataset.component));
  const running = new Map(); // component -> EventSource

  function image(src, alt, className) {
    const img = document.createElement("img");
    img.alt = alt;
    img.className = className;
    img.src = src;
    return img;
  }

  function visualize(component) {
    const row = byComponent.get(component);
    const tops = part(row, "tops");
    const frame = part(row, "attack-frame");
    const caption = part(row, "attack-caption");
    caption.textContent = "feature attack from gray: starting…";
    tops.replaceChildren();
    frame.replaceChildren();
    let frames = 0;
    const source = new EventSource(`/events${base}/components/${component}/visualize`);
    running.set(component, source);
    const done = () => {
      source.close();
      running.delete(component);
      startVisualizations();
    };
    source.addEventListener("top_image", (event) => {
      const top = JSON.parse(event.data);
      const figure = document.createElement("figure");
      figure.className = "top";
      figure.dataset.rank = top.rank;
      figure.append(image(top.png, `fit image ${top.image_id}`, "picture"));
      const label = document.createElement("figcaption");
      label.textContent = `α ${top.alpha.toFixed(2)}`;
      label.title = top.image_id;
      figure.append(label);
      tops.append(figure);
    });
    source.addEventListener("heatmap", (event) => {
      const heat = JSON.parse(event.data);
      const figure = tops.querySelector(`figure[data-rank="${heat.rank}"]`);
      if (figure) figure.insertBefore(image(heat.png, `${heat.method} heatmap`, "heat"), figure.lastChild);
    });
    source.addEventListener("frame", (event) => {
      const step = JSON.parse(event.data);
      frames += 1;
      row.dataset.frames = frames;
      const img = frame.querySelector("img") || frame.appendChild(image(step.png, `feature attack of component ${component}`, "attack-image"));
      img.src = step.png;
      caption.textContent = `feature attack from gray: step ${step.step}, α ${step.alpha.toFixed(2)}, p(class) ${step.prob.toFixed(3)}`;
    });
    source.addEventListener("result", (event) => {
      const result = JSON.parse(event.data);
      const img = frame.querySelector("img") || frame.appendChild(image(result.png, `feature attack of component ${component}`, "attack-image"));
      img.src = result.png;
      row.dataset.attack = "done";
      caption.textContent = `feature attack from gray, ${result.steps} steps (eps ${result.eps.toFixed(2)}, ${result.parameterization || "pixel"}): α ${result.start_alpha.toFixed(2)} → ${result.final_alpha.toFixed(2)}, p(class) ${result.final_prob.toFixed(3)}`;
    });
    source.addEventListener("end", done);
    source.addEventListener("error", (event) => {
      if (event.data) {
        const problem = JSON.parse(event.data);
        caption.textContent = problemText(problem);
        row.dataset.attack = "failed";
        if (problem.code === "RESOURCE_EXHAUSTED" || problem.code === "UNAVAILABLE") {
          setTimeout(() => { queue.unshift(component); startVisualizations(); }, RETRY_BUSY_MS);
        }
      } else {
        caption.textContent = "the ui stopped answering; reload the page to try again";
      }
      done();
    });
  }

  function startVisualizations() {
    // the focused component goes first, then the page's order
    const first = rows[focused] ? Number(rows[focused].dataset.component) : null;
    if (first !== null && queue.includes(first)) {
      queue.splice(queue.indexOf(first), 1);
      queue.unshift(first);
    }
    while (running.size < VISUALIZE_AT_ONCE && queue.length) visualize(queue.shift());
  }

  window.addEventListener("pagehide", () => running.forEach((source) => source.close()));

  renderLabels(false);
  focusRow(0, false);
  watchLabels();
})();
