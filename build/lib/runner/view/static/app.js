// Airlock's run viewer. Plain JavaScript, no build step, no dependency.
//
// Everything a run's log holds may have been written by the agent (an output line, a
// model name, a path): it reaches the page only as text (textContent, text nodes,
// attribute values that are never URLs or handlers), never as markup. The page's
// Content-Security-Policy allows this file as the only script.
"use strict";

(() => {
  const main = document.getElementById("main");
  const crumbs = document.getElementById("crumbs");
  const activity = document.getElementById("activity");
  const KEY = "airlock-view-key";
  const CATS = [
    ["all", "All"], ["lifecycle", "Lifecycle"], ["selftest", "Self-test"], ["agent", "Agent"],
    ["provider", "Provider"], ["mcp", "MCP"], ["proxy", "Proxy"], ["budget", "Budget"],
    ["refusal", "Refusals"], ["error", "Errors"],
  ];
  const METER_NAMES = {
    steps: "Agent steps", requests: "Provider requests", tokens: "Tokens",
    mcp_calls: "MCP calls", output_bytes: "Output",
  };

  // -- small helpers -------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    append(e, children);
    return e;
  }

  function append(e, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : String(c)); // a string becomes a text node
    }
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); return e; }
  function str(v) { return typeof v === "string" ? v : v === null || v === undefined ? "" : JSON.stringify(v); }
  function cap(s, n) { s = str(s); return s.length > n ? s.slice(0, n) + "…" : s; }
  function num(n) { return typeof n === "number" ? n.toLocaleString("en-US") : "–"; }
  function bytes(n) {
    if (typeof n !== "number") return "–";
    if (n < 1024) return n + " B";
    const u = ["KiB", "MiB", "GiB", "TiB"];
    let i = -1;
    do { n /= 1024; i++; } while (n >= 1024 && i < u.length - 1);
    return n.toFixed(n < 10 ? 1 : 0) + " " + u[i];
  }
  function dur(s) {
    if (typeof s !== "number") return "–";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
    const m = Math.floor(s / 60);
    return m + " min " + Math.round(s - 60 * m) + " s";
  }
  function when(ts) {
    if (typeof ts !== "number") return "–";
    const d = new Date(ts * 1000);
    const p = (x) => String(x).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }
  function runHref(id) { return "#/run/" + encodeURIComponent(id); }

  function statusBadge(status, live) {
    const s = str(status) || "unknown";
    const kind = live ? "live" : s === "succeeded" ? "ok" : s === "failed" ? "bad"
      : ["budget_exceeded", "timeout", "oom", "lost"].includes(s) ? "warn" : "muted";
    return h("span", { class: "badge badge-" + kind, text: live ? "running" : s.replace(/_/g, " ") });
  }

  function chainBadge(state) {
    const map = {
      intact: ["ok", "✓ verified"], broken: ["bad", "✗ broken"], running: ["live", "● so far intact"],
      checking: ["muted", "… checking"], unfinished: ["warn", "◐ unfinished"],
    };
    const [kind, label] = map[state] || ["muted", str(state)];
    return h("span", { class: "chain chain-" + kind, text: label });
  }

  class HttpError extends Error {
    constructor(status, message) { super(message || "HTTP " + status); this.status = status; }
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = "Bearer " + key;
    const r = await fetch(path, { headers, cache: "no-store", credentials: "same-origin" });
    if (r.status === 401) { showKeyForm(); throw new HttpError(401, "a key is needed"); }
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new HttpError(r.status, body.error);
    return body;
  }

  // -- routing ---------------------------------------------------------------------------

  let generation = 0; // a view's timers stop when another view starts
  const timers = new Set();
  function later(fn, ms) {
    const gen = generation;
    const t = setTimeout(() => { timers.delete(t); if (gen === generation) fn(); }, ms);
    timers.add(t);
  }

  function route() {
    generation++;
    for (const t of timers) clearTimeout(t);
    timers.clear();
    const hash = location.hash || "#/";
    const m = hash.match(/^#\/run\/([^/?]+)/);
    if (m) showRun(decodeURIComponent(m[1]));
    else showList();
  }

  function setCrumbs(...items) {
    clear(crumbs);
    items.forEach((it, i) => {
      if (i) crumbs.append(h("span", { class: "sep", text: "/" }));
      crumbs.append(it.href ? h("a", { href: it.href, text: it.text }) : h("span", { text: it.text }));
    });
  }

  function showKeyForm() {
    generation++;
    setCrumbs({ text: "Sign in" });
    const input = h("input", { type: "password", id: "key", autocomplete: "off", placeholder: "API key" });
    const form = h("form", { class: "card keyform", onsubmit: (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, input.value.trim());
      route();
    } },
    h("h2", { text: "This service needs your API key" }),
    h("p", { class: "muted", text: "The key stays in this tab (session storage) and is sent only to this service." }),
    input, h("button", { type: "submit", text: "Open" }));
    clear(main).append(form);
    input.focus();
  }

  function showError(err) {
    clear(main).append(h("div", { class: "card error-card" },
      h("h2", { text: err.status === 404 ? "No such run" : "Something went wrong" }),
      h("p", { text: err.message || String(err) }),
      h("a", { href: "#/", text: "Back to the runs" })));
  }

  // -- the runs list -------------------------------------------------------------------------

  const listState = { q: "", status: "", refused: false, unverified: false };

  function showList() {
    document.title = "Airlock · runs";
    setCrumbs({ text: "Runs" });
    const search = h("input", { type: "search", id: "run-search", placeholder: "Search id, agent, model, policy…", value: listState.q });
    const status = h("select", { id: "run-status" },
      [["", "Any status"], ["succeeded", "Succeeded"], ["failed", "Failed"], ["budget_exceeded", "Budget exceeded"],
        ["timeout", "Timed out"], ["running", "Running"], ["other", "Other"]].map(([v, t]) =>
        h("option", { value: v, selected: v === listState.status, text: t })));
    const refused = h("input", { type: "checkbox", id: "run-refused", checked: listState.refused });
    const unverified = h("input", { type: "checkbox", id: "run-unverified", checked: listState.unverified });
    const count = h("span", { class: "muted count", id: "run-count" });
    const tbody = h("tbody", { id: "runs-body" });
    const table = h("table", { class: "runs", id: "runs" },
      h("thead", {}, h("tr", {}, ["Run", "Status", "Exit", "Agent", "Model", "Policy", "Started", "Duration",
        "Tokens", "Refusals", "Chain"].map((c) => h("th", { text: c })))), tbody);
    let rows = [];
    const draw = () => {
      listState.q = search.value; listState.status = status.value;
      listState.refused = refused.checked; listState.unverified = unverified.checked;
      const q = listState.q.trim().toLowerCase();
      const shown = rows.filter((r) => {
        if (q && ![r.id, r.agent, r.model, r.policy, r.status, r.exit_reason].some((v) => str(v).toLowerCase().includes(q))) return false;
        const st = r.live ? "running" : r.status;
        if (listState.status === "other" && ["succeeded", "failed", "budget_exceeded", "timeout", "running"].includes(st)) return false;
        if (listState.status && listState.status !== "other" && st !== listState.status) return false;
        if (listState.refused && !r.refusals) return false;
        if (listState.unverified && r.chain === "intact") return false;
        return true;
      });
      clear(tbody);
      for (const r of shown) {
        tbody.append(h("tr", { class: "run-row" + (r.refusals ? " has-refusals" : ""), "data-run": r.id },
          h("td", { class: "mono" }, h("a", { href: runHref(r.id), text: r.id })),
          h("td", {}, statusBadge(r.status, r.live)),
          h("td", { class: "mono", text: r.live ? "" : `${str(r.exit_code)} ${str(r.exit_reason)}` }),
          h("td", { text: str(r.agent) }),
          h("td", { class: "mono", text: cap(r.model, 40) }),
          h("td", { text: cap(r.policy, 30) }),
          h("td", { class: "nowrap", text: when(r.started) }),
          h("td", { class: "num", text: dur(r.duration_s) }),
          h("td", { class: "num", text: num(r.tokens) }),
          h("td", { class: "num" + (r.refusals ? " refusals" : ""), text: num(r.refusals) }),
          h("td", {}, chainBadge(r.chain))));
      }
      if (!shown.length) {
        tbody.append(h("tr", {}, h("td", { colspan: 11, class: "empty",
          text: rows.length ? "No run matches." : "No runs yet: `airlock run -- echo hi` makes one." })));
      }
      count.textContent = `${shown.length} of ${rows.length} runs`;
    };
    for (const c of [search, status, refused, unverified]) c.addEventListener("input", draw);
    clear(main).append(h("section", { class: "card" },
      h("div", { class: "toolbar" }, search, status,
        h("label", { class: "check" }, refused, " with refusals"),
        h("label", { class: "check" }, unverified, " not verified"), count),
      h("div", { class: "table-wrap" }, table)));
    const load = async () => {
      try {
        const data = await api("api/runs");
        rows = data.runs;
        draw();
        activity.textContent = data.pending ? "checking logs…" : "";
        if (data.pending || rows.some((r) => r.live)) later(load, data.pending ? 400 : 2000);
      } catch (err) { if (err.status !== 401) showError(err); }
    };
    load();
  }

  // -- one run -------------------------------------------------------------------------------

  function showRun(id) {
    document.title = "Airlock · " + id;
    setCrumbs({ text: "Runs", href: "#/" }, { text: id });
    const view = {
      id, summary: null, mode: "page", page: 0, cats: new Set(), q: "", filterFrom: [],
      follow: true, open: new Set(), target: null, patchLoaded: false,
    };
    const el = {
      head: h("div", { class: "run-head" }),
      facts: h("div", { class: "facts", id: "facts" }),
      chain: h("div", { id: "chain" }),
      meters: h("div", { class: "meters", id: "meters" }),
      refusals: h("section", { class: "card", id: "refusals" }),
      timeline: h("section", { class: "card", id: "timeline" }),
      selftest: h("section", { class: "card", id: "selftest" }),
      policy: h("section", { class: "card", id: "policy" }),
      patch: h("section", { class: "card", id: "patch" }),
      progress: h("div", { class: "progress", id: "progress" }),
    };
    clear(main).append(el.head, el.progress, el.chain, el.facts,
      h("section", { class: "card" }, h("h2", { text: "Budgets" }), el.meters),
      el.refusals, el.timeline, el.patch, el.selftest, el.policy);
    buildTimeline(view, el);

    const poll = async () => {
      let s;
      try { s = await api("api/runs/" + encodeURIComponent(id)); }
      catch (err) { if (err.status !== 401) showError(err); return; }
      const first = view.summary === null;
      const wasLive = view.summary && view.summary.row.live;
      view.summary = s;
      drawSummary(view, el);
      if (first) {
        if (!s.row.live) view.follow = false;
        await loadEvents(view, el, s.row.live ? "last" : undefined);
      } else if (view.follow && view.mode === "page" && (s.row.live || wasLive)) {
        await followTail(view, el); // new lines only, read from where the last ones ended
      }
      if (!s.log.done) later(poll, 300);
      else if (s.row.live) later(poll, 1000);
      activity.textContent = s.row.live ? "live" : !s.log.done ? "indexing…" : "";
    };
    poll();
  }

  function drawSummary(view, el) {
    const s = view.summary, r = s.row, rep = s.report || {};
    append(clear(el.head), [h("h1", { class: "mono", text: s.id }), statusBadge(r.status, r.live),
      r.live ? h("span", { class: "pulse", title: "following the log as it grows" }) : null]);
    if (!s.log.done) {
      el.progress.hidden = false;
      const pct = s.log.size ? Math.floor((100 * s.log.indexed) / s.log.size) : 100;
      clear(el.progress).append(h("span", { text: `Reading the log: ${pct}% of ${bytes(s.log.size)}` }),
        h("span", { class: "bar" }, h("span", { class: "fill", style: null })));
      el.progress.querySelector(".fill").style.width = pct + "%";
    } else el.progress.hidden = true;

    const models = Object.keys(s.models).length ? Object.keys(s.models) : Object.keys(s.agent_models);
    const start = s.start || {};
    const facts = [
      ["Agent", r.agent], ["Model", models.join(", ") || "–"], ["Policy", r.policy],
      ["Started", when(s.first_ts)], ["Duration", dur(r.duration_s)],
      ["Exit", r.live ? "still running" : `${str(r.exit_code)} (${str(r.exit_reason)})`],
      ["Runtime", start.runtime], ["Network", start.network], ["Workspace", start.workspace_mode],
      ["Events", num(s.log.lines) + " · " + bytes(s.log.size)],
      ["Provider requests", num(s.requests) + (s.latency_ms_avg !== null ? ` · avg ${num(s.latency_ms_avg)} ms` : "")],
      ["Tokens", num(r.tokens)], ["Refusals", num(s.refusal_count)],
    ];
    if (start.task) facts.push(["Task", start.task]);
    if (rep.error) facts.push(["Error", rep.error]);
    append(clear(el.facts), facts.map(([k, v]) => h("div", { class: "fact" + (k === "Refusals" && s.refusal_count ? " fact-bad" : "") + (k === "Task" ? " fact-wide" : "") },
      h("div", { class: "k", text: k }), h("div", { class: "v", text: str(v) || "–" }))));

    drawChain(view, el);
    drawMeters(view, el);
    drawRefusals(view, el);
    drawSelftest(view, el);
    drawPolicy(view, el);
    drawPatch(view, el);
    drawChips(view, el);
    if (view.lastData) drawPager(view, el, view.lastData); // the log may have grown
  }

  function drawChain(view, el) {
    const v = view.summary.verification;
    const text = {
      intact: "Hash chain verified: every line is intact and the log matches report.json.",
      running: "The run is still being written; the chain is intact so far.",
      checking: "Checking the hash chain…",
      unfinished: "The run never ended (its host stopped before writing report.json); the lines it wrote are intact.",
    };
    const box = h("div", { class: "banner banner-" + (v.state === "broken" ? "bad" : v.state === "intact" ? "ok" : v.state === "unfinished" ? "warn" : "muted"), id: "chain-state", "data-state": v.state },
      chainBadge(v.state), " ",
      h("span", { text: v.state === "broken" ? `The log was altered: line ${v.line}: ${v.message}` : text[v.state] || "" }));
    if (v.state === "broken" && v.line) {
      box.append(" ", h("button", { class: "link", id: "show-broken", text: `Show line ${v.line}`, onclick: () => goToLine(view, el, v.line) }));
    }
    clear(el.chain).append(box);
  }

  function drawMeters(view, el) {
    const m = view.summary.meters;
    const series = m.series;
    const t0 = series.length ? series[0][0] : 0;
    const t1 = series.length ? series[series.length - 1][0] : 1;
    clear(el.meters);
    m.counters.forEach((c, i) => {
      const limit = m.limits[c];
      const logged = series.length ? series[series.length - 1][i + 1] : 0;
      const used = m.report_used[c] !== null && m.report_used[c] !== undefined ? m.report_used[c] : logged;
      const fmt = c === "output_bytes" ? bytes : num;
      const pct = limit ? Math.min(100, (100 * used) / limit) : 0;
      const W = 260, H = 56;
      const top = Math.max(limit || 0, ...series.map((p) => p[i + 1]), 1) * 1.08;
      const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "spark", preserveAspectRatio: "none", role: "img" });
      if (limit) {
        const y = H - (H * limit) / top;
        chart.append(svg("line", { x1: 0, x2: W, y1: y, y2: y, class: "limit" }));
      }
      if (series.length) {
        const span = Math.max(t1 - t0, 1e-6);
        let d = `M0 ${H}`;
        for (const p of series) {
          const x = ((p[0] - t0) / span) * W, y = H - (H * p[i + 1]) / top;
          d += ` L${x.toFixed(1)} ${y.toFixed(1)}`;
        }
        chart.append(svg("path", { d: d + ` L${W} ${H - (H * logged) / top} L${W} ${H} Z`, class: "area" }));
        chart.append(svg("path", { d, class: "line" }));
      }
      const card = h("div", { class: "meter" + (limit && used > limit ? " over" : pct >= 80 ? " near" : ""), "data-counter": c },
        h("div", { class: "meter-head" }, h("span", { text: METER_NAMES[c] || c }),
          h("span", { class: "meter-val", text: limit ? `${fmt(used)} / ${fmt(limit)}` : `${fmt(used)} · no limit` })),
        chart,
        h("div", { class: "bar" }, h("span", { class: "fill" })));
      card.querySelector(".fill").style.width = (limit ? pct : 0) + "%";
      el.meters.append(card);
    });
    el.meters.append(h("p", { class: "muted small", text: "Curves: the counters as the log records them over the run; the numbers: the host's own count (report.json) once the run has ended." }));
  }

  function drawRefusals(view, el) {
    const s = view.summary;
    clear(el.refusals).append(h("h2", {}, "Refusals ", h("span", { class: "count-pill" + (s.refusal_count ? " bad" : ""), text: num(s.refusal_count) })));
    if (!s.refusal_count) { el.refusals.append(h("p", { class: "muted", text: "The boundary refused nothing in this run." })); return; }
    const list = h("div", { class: "refusal-list" });
    for (const r of s.refusals) {
      list.append(h("div", { class: "refusal" },
        h("button", { class: "link mono", text: "line " + r.line, onclick: () => goToLine(view, el, r.line) }),
        h("span", { class: "type mono", text: r.type }),
        h("span", { class: "reason", text: r.reason || "(no reason given)" }),
        r.what ? h("span", { class: "mono what", text: r.what }) : null,
        r.detail ? h("span", { class: "muted", text: r.detail }) : null));
    }
    if (s.refusal_count > s.refusals.length) list.append(h("p", { class: "muted", text: `… and ${num(s.refusal_count - s.refusals.length)} more (filter the timeline by Refusals).` }));
    el.refusals.append(list);
  }

  function drawSelftest(view, el) {
    const st = view.summary.selftest;
    clear(el.selftest).append(h("h2", { text: "Self-test" }));
    if (!st) { el.selftest.append(h("p", { class: "muted", text: "No self-test recorded." })); return; }
    el.selftest.append(h("p", {}, st.ok ? h("span", { class: "chain chain-ok", text: "✓ passed" }) : h("span", { class: "chain chain-bad", text: "✗ failed" }),
      ` ${st.checks.length} checks inside the sandbox (${str(st.runtime)})`));
    el.selftest.append(h("div", { class: "checks" }, st.checks.map((c) =>
      h("div", { class: "check-item" + (c.ok ? "" : " bad") }, h("span", { text: c.ok ? "✓" : "✗" }),
        h("span", { class: "mono", text: c.name }), h("span", { class: "muted", text: c.detail })))));
  }

  function drawPolicy(view, el) {
    if (el.policy.dataset.drawn && !view.summary.row.live) return;
    el.policy.dataset.drawn = "1";
    const s = view.summary;
    clear(el.policy).append(h("h2", { text: "Policy in effect" }));
    const start = s.start || {};
    el.policy.append(h("p", {}, h("span", { class: "mono", text: str(start.policy || s.row.policy) }), " ",
      h("span", { class: "muted mono", text: str(start.policy_digest) })));
    if (s.widened.length) {
      el.policy.append(h("div", { class: "widened" }, h("strong", { text: "Widened beyond the secure default:" }),
        h("ul", {}, s.widened.map((w) => h("li", { class: "mono", text: w })))));
    } else el.policy.append(h("p", { class: "muted", text: "Nothing widened beyond the secure defaults." }));
    if (s.policy) {
      el.policy.append(h("details", {}, h("summary", { text: "policy.json (resolved)" }),
        h("pre", { class: "code", text: JSON.stringify(s.policy, null, 2) })));
    }
  }

  async function drawPatch(view, el) {
    const p = view.summary.patch;
    if (!p) { el.patch.hidden = true; return; }
    el.patch.hidden = false;
    if (view.patchLoaded) return;
    view.patchLoaded = true;
    clear(el.patch).append(h("h2", {}, "Changes (copy mode) ", h("span", { class: "muted small", text: bytes(p.bytes) })));
    let data;
    try { data = await api("api/runs/" + encodeURIComponent(view.id) + "/patch"); }
    catch (err) { el.patch.append(h("p", { class: "muted", text: "The patch cannot be read." })); return; }
    const lines = data.text.split("\n");
    const MAX = 4000;
    const pre = h("div", { class: "diff", id: "diff" });
    for (const line of lines.slice(0, MAX)) {
      const cls = line.startsWith("+++") || line.startsWith("---") || line.startsWith("diff ") || line.startsWith("index ") ? "file"
        : line.startsWith("@@") ? "hunk" : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "ctx";
      pre.append(h("div", { class: "dl " + cls, text: line || " " }));
    }
    el.patch.append(pre);
    if (lines.length > MAX || data.truncated) el.patch.append(h("p", { class: "muted", text: "The patch is longer than shown here; the whole of it is changes.patch in the run's directory." }));
  }

  // -- the timeline ----------------------------------------------------------------------------

  function buildTimeline(view, el) {
    view.chips = h("div", { class: "chips", id: "chips" });
    view.search = h("input", { type: "search", placeholder: "Search this log…", id: "ev-search" });
    view.search.addEventListener("keydown", (e) => { if (e.key === "Enter") applyFilter(view, el); });
    view.followBox = h("input", { type: "checkbox", id: "follow", checked: true });
    view.followBox.addEventListener("change", () => { view.follow = view.followBox.checked; if (view.follow) loadEvents(view, el, "last"); });
    view.followLabel = h("label", { class: "check", id: "follow-label" }, view.followBox, " follow");
    view.pager = h("div", { class: "pager", id: "pager" });
    view.rows = h("div", { class: "events", id: "events", role: "list" });
    view.note = h("div", { class: "muted small", id: "ev-note" });
    el.timeline.append(h("div", { class: "tl-head" }, h("h2", { text: "Timeline" }), view.followLabel),
      h("div", { class: "toolbar" }, view.chips, view.search), view.pager, view.rows, view.note);
  }

  function drawChips(view, el) {
    const counts = view.summary.categories;
    clear(view.chips);
    for (const [c, label] of CATS) {
      const n = c === "all" ? view.summary.log.lines : counts[c] || 0;
      const on = c === "all" ? view.cats.size === 0 : view.cats.has(c);
      view.chips.append(h("button", { class: "chip chip-" + c + (on ? " on" : ""), "data-cat": c, onclick: () => {
        if (c === "all") view.cats.clear();
        else if (view.cats.has(c)) view.cats.delete(c); else view.cats.add(c);
        applyFilter(view, el);
      } }, label + " ", h("span", { class: "n", text: num(n) })));
    }
    view.followLabel.hidden = !view.summary.row.live;
  }

  function applyFilter(view, el) {
    view.q = view.search.value.trim();
    drawChips(view, el);
    if (view.cats.size || view.q) {
      view.mode = "filter"; view.filterFrom = [{ offset: 0, line: 1 }]; view.follow = false; view.followBox.checked = false;
    } else { view.mode = "page"; view.page = 0; }
    loadEvents(view, el);
  }

  async function goToLine(view, el, line) {
    view.cats.clear(); view.search.value = ""; view.q = ""; view.mode = "page";
    view.follow = false; view.followBox.checked = false;
    view.page = Math.floor((line - 1) / view.summary.log.page_lines);
    view.target = line;
    drawChips(view, el);
    await loadEvents(view, el);
    el.timeline.scrollIntoView({ block: "start" });
  }

  async function loadEvents(view, el, where) {
    const s = view.summary;
    if (!s) return;
    const base = "api/runs/" + encodeURIComponent(view.id) + "/events?";
    let data;
    try {
      if (view.mode === "page") {
        if (where === "last" || (view.follow && s.row.live)) view.page = s.log.pages - 1;
        data = await api(base + "page=" + view.page);
        if (data.pending) { view.note.textContent = "This page of the log is still being read…"; later(() => loadEvents(view, el), 400); return; }
      } else {
        const from = view.filterFrom[view.filterFrom.length - 1];
        const params = new URLSearchParams({ offset: from.offset, line: from.line, limit: 200 });
        if (view.cats.size) params.set("cat", [...view.cats].join(","));
        if (view.q) params.set("q", view.q);
        data = await api(base + params.toString());
      }
    } catch (err) { if (err.status !== 401) view.note.textContent = "The log cannot be read: " + err.message; return; }
    view.lastData = data;
    view.tail = view.mode === "page" && data.page === s.log.pages - 1
      ? { offset: data.next_offset, line: data.next_line } : null;
    drawPager(view, el, data);
    drawRows(view, el, data.events);
  }

  // Following a running run: ask for the lines after the last one shown (by byte offset),
  // append them, and keep the newest page's worth in the document.
  async function followTail(view, el) {
    if (!view.tail) { await loadEvents(view, el, "last"); return; }
    const s = view.summary;
    const params = new URLSearchParams({ offset: view.tail.offset, line: view.tail.line, limit: 500 });
    let data;
    try { data = await api("api/runs/" + encodeURIComponent(view.id) + "/events?" + params.toString()); }
    catch (err) { return; }
    if (!view.follow || view.mode !== "page") return;
    view.tail = { offset: data.next_offset, line: data.next_line };
    if (!data.events.length) return;
    const empty = view.rows.querySelector(".empty");
    if (empty) empty.remove();
    const brokenLine = s.verification.state === "broken" ? s.verification.line : null;
    for (const item of data.events) view.rows.append(eventRow(view, item, s.first_ts || 0, brokenLine));
    while (view.rows.children.length > s.log.page_lines) view.rows.firstChild.remove();
    const info = view.pager.querySelector("#pg-info");
    if (info) info.textContent = `Following · lines ${num(+view.rows.firstChild.dataset.line)}–${num(data.next_line - 1)} of ${num(Math.max(s.log.lines, data.next_line - 1))}`;
    view.rows.scrollTop = view.rows.scrollHeight;
  }

  function drawPager(view, el, data) {
    const s = view.summary;
    clear(view.pager);
    const btn = (label, id, enabled, fn) => h("button", { class: "pg", id, disabled: !enabled, text: label, onclick: fn });
    if (view.mode === "page") {
      const last = s.log.pages - 1;
      const go = (p) => () => { view.page = p; view.follow = false; view.followBox.checked = false; loadEvents(view, el); };
      const first = view.page * s.log.page_lines + 1;
      const lineInput = h("input", { type: "number", min: 1, max: Math.max(1, s.log.lines), class: "line-input", id: "goto-line", placeholder: "line" });
      lineInput.addEventListener("keydown", (e) => { if (e.key === "Enter" && lineInput.value) goToLine(view, el, Math.max(1, Math.min(s.log.lines, +lineInput.value))); });
      view.pager.append(btn("« First", "pg-first", view.page > 0, go(0)), btn("‹ Prev", "pg-prev", view.page > 0, go(view.page - 1)),
        h("span", { class: "pg-info", id: "pg-info", text: `Page ${num(view.page + 1)} of ${num(s.log.pages)} · lines ${num(first)}–${num(first + data.events.length - 1)} of ${num(s.log.lines)}` }),
        btn("Next ›", "pg-next", view.page < last, go(view.page + 1)), btn("Last »", "pg-last", view.page < last, go(last)),
        h("span", { class: "goto" }, "Go to ", lineInput));
      view.note.textContent = "";
    } else {
      const from = view.filterFrom[view.filterFrom.length - 1];
      view.pager.append(
        btn("« From the start", "pg-first", view.filterFrom.length > 1, () => { view.filterFrom = [{ offset: 0, line: 1 }]; loadEvents(view, el); }),
        btn("‹ Back", "pg-prev", view.filterFrom.length > 1, () => { view.filterFrom.pop(); loadEvents(view, el); }),
        h("span", { class: "pg-info", id: "pg-info", text: `${num(data.events.length)} matches from line ${num(from.line)}; looked through line ${num(data.next_line - 1)} of ${num(s.log.lines)}` }),
        btn("More ›", "pg-next", !data.at_end, () => { view.filterFrom.push({ offset: data.next_offset, line: data.next_line }); loadEvents(view, el); }));
      view.note.textContent = data.at_end ? "End of the log." : "";
    }
  }

  function drawRows(view, el, events) {
    const s = view.summary;
    const t0 = s.first_ts || 0;
    const brokenLine = s.verification.state === "broken" ? s.verification.line : null;
    clear(view.rows);
    for (const item of events) view.rows.append(eventRow(view, item, t0, brokenLine));
    if (!events.length) view.rows.append(h("div", { class: "empty", text: view.mode === "page" ? "No events yet." : "No match in this part of the log." }));
    if (view.target) {
      const row = view.rows.querySelector(`[data-line="${view.target}"]`);
      if (row) { row.classList.add("target"); row.scrollIntoView({ block: "center" }); }
      view.target = null;
    } else if (view.follow && s.row.live) view.rows.scrollTop = view.rows.scrollHeight;
  }

  function eventRow(view, item, t0, brokenLine) {
    const ev = item.event;
    const cls = ["ev", "cat-" + item.cat];
    if (item.cat === "refusal") cls.push("refused");
    if (item.broken || item.line === brokenLine) cls.push("broken");
    if (brokenLine !== null && item.line > brokenLine) cls.push("unverified");
    if (ev && ev.source === "agent") cls.push("untrusted");
    const row = h("div", { class: cls.join(" "), "data-line": item.line, role: "listitem" });
    const head = h("div", { class: "ev-head" },
      h("span", { class: "ln", text: item.line }),
      h("span", { class: "t", text: ev && typeof ev.ts === "number" ? "+" + (ev.ts - t0).toFixed(3) + "s" : "" }),
      h("span", { class: "src src-" + (ev ? str(ev.source) : "none"), text: ev ? cap(ev.source, 12) : "?" }),
      h("span", { class: "type", text: ev ? cap(ev.type, 60) : "unreadable line" }),
      h("span", { class: "sum" }, ev ? summarize(ev) : cap(item.raw, 400)));
    row.append(head);
    if (item.broken || item.line === brokenLine) row.append(h("div", { class: "broken-note", text: "⚠ " + (s(view).verification.message || "the chain breaks here") }));
    head.addEventListener("click", () => {
      if (view.open.has(item.line)) view.open.delete(item.line); else view.open.add(item.line);
      toggleDetail(row, item, view.open.has(item.line));
    });
    if (view.open.has(item.line)) toggleDetail(row, item, true);
    return row;
  }

  function s(view) { return view.summary; }

  function toggleDetail(row, item, open) {
    const old = row.querySelector(".ev-detail");
    if (old) old.remove();
    if (!open) return;
    const text = item.event ? JSON.stringify(item.event, null, 2) : str(item.raw);
    row.append(h("pre", { class: "ev-detail code", text }));
  }

  // One line of text for an event: what a reader looks for first, by type.
  function summarize(ev) {
    const d = ev.data && typeof ev.data === "object" ? ev.data : {};
    const t = ev.type;
    const parts = [];
    const kv = (k, v) => { if (v !== undefined && v !== null && v !== "") parts.push(h("span", { class: "kv" }, k ? h("span", { class: "k", text: k }) : null, k ? " " : null, h("span", { class: "v", text: cap(v, 200) }))); };
    const strong = (v, c) => parts.push(h("span", { class: "em " + (c || ""), text: cap(v, 200) }));
    if (t === "provider.request") {
      strong(d.model); kv("status", d.status); kv("in", num(d.input_tokens)); kv("out", num(d.output_tokens));
      kv("latency", typeof d.latency_ms === "number" ? d.latency_ms + " ms" : null); kv("path", d.path);
      if (d.error) strong(d.error, "bad");
    } else if (ev.source !== "agent" && (t.endsWith(".refused") || t.endsWith(".unauthorized"))) {
      strong(d.reason || "refused", "bad"); kv("what", d.target || d.tool || d.model || d.path); kv("detail", d.detail); kv("status", d.status);
    } else if (t === "budget.exceeded") {
      strong(`${str(d.counter)} ${num(d.used)} > ${num(d.limit)}`, "bad");
    } else if (t === "mcp.call") {
      strong(d.tool); kv("ok", d.ok); kv("took", typeof d.duration_ms === "number" ? d.duration_ms + " ms" : null); kv("error", d.error);
    } else if (t.startsWith("proxy.")) {
      strong(d.target || d.host); kv("address", d.address); kv("rule", d.rule); kv("up", d.bytes_up); kv("down", d.bytes_down); kv("reason", d.reason); kv("error", d.error);
    } else if (t === "agent.output") {
      parts.push(h("span", { class: "stream", text: str(d.stream) }), h("span", { class: "out", text: cap(d.text, 300) }));
    } else if (t === "selftest") {
      strong(d.ok ? "passed" : "failed", d.ok ? "good" : "bad"); kv("checks", Array.isArray(d.checks) ? d.checks.length : null); kv("runtime", d.runtime);
    } else if (t === "run.start") {
      kv("agent", d.agent); kv("policy", d.policy); kv("runtime", d.runtime); kv("network", d.network); kv("workspace", d.workspace_mode);
    } else if (t === "run.end") {
      strong(d.status, d.status === "succeeded" ? "good" : "bad"); kv("exit", d.exit_code); kv("reason", d.exit_reason); kv("took", dur(d.duration_s));
    } else if (t === "policy.widened") {
      strong(d.detail, "warn");
    } else if (t === "agent.tool_call" || t === "agent.command" || t === "agent.mcp_call" || t === "agent.tool_result") {
      strong(d.name || d.tool || "command"); kv("", d.command || d.arguments); kv("ok", d.ok); kv("exit", d.exit_code);
    } else if (t === "agent.message") {
      parts.push(h("span", { class: "out", text: cap(d.text, 300) }));
    } else {
      for (const [k, v] of Object.entries(d).slice(0, 6)) kv(k, v);
    }
    return parts.flatMap((p, i) => (i ? [" ", p] : [p])); // spaces, for copying and reading
  }

  window.addEventListener("hashchange", route);
  route();
})();
