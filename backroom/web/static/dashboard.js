// backroom dashboard: vanilla JS, no build step, nothing loaded from elsewhere.
// It polls the JSON API and redraws in place (no full reload). Every value that came from a
// job (name, tag, payload, error, traceback) is inserted as text: textContent, text nodes and
// setAttribute on inert attributes only, never innerHTML or a URL built from data.
"use strict";

(() => {
  const TOKEN_KEY = "backroom.token";
  const STATES = ["scheduled", "queued", "running", "retrying", "succeeded", "dead",
    "cancelled", "rejected"];
  const POLL_MS = 2000;
  const SLOW_EVERY = 5; // workers, schedules, queues, failures, tags, charts: every 5th poll
  const PAGE_SIZE = 25;

  const ui = {
    token: sessionStorage.getItem(TOKEN_KEY),
    skew: 0, // server clock minus ours, in seconds
    tick: 0,
    filters: { state: "", job: "", tag: "" },
    cursor: null, // `before` of the page shown; null: the newest page
    older: [], // cursors of the newer pages we came through
    next: null,
    detailId: null,
    rendered: new Map(), // section -> JSON last drawn, to skip identical redraws
    timer: null,
    stats: null,
  };

  // -- DOM helpers: text only ------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    const p = props || {};
    if (p.class) node.className = p.class;
    if (p.text !== undefined && p.text !== null) node.textContent = String(p.text);
    if (p.title) node.setAttribute("title", String(p.title));
    if (p.type) node.setAttribute("type", p.type);
    if (p.testid) node.setAttribute("data-testid", p.testid);
    for (const [key, value] of Object.entries(p.data || {})) node.dataset[key] = String(value);
    for (const [event, fn] of Object.entries(p.on || {})) node.addEventListener(event, fn);
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function row(...cells) {
    return el("tr", null, ...cells.map((c) => (c instanceof HTMLTableCellElement ? c : el("td", null, c))));
  }
  const td = (text, cls, title) => el("td", { class: cls, text, title });
  const num = (text) => td(text, "num");

  function fill(tbody, rows, emptyText, columns) {
    if (!rows.length) {
      const cell = el("td", { text: emptyText });
      cell.colSpan = columns;
      tbody.replaceChildren(el("tr", { class: "empty" }, cell));
    } else {
      tbody.replaceChildren(...rows);
    }
  }

  function changed(key, data) {
    const text = JSON.stringify(data);
    if (ui.rendered.get(key) === text) return false;
    ui.rendered.set(key, text);
    return true;
  }

  // -- formatting ------------------------------------------------------------------------------
  function seconds(v) {
    if (v === null || v === undefined) return "-";
    if (v < 1e-3) return `${Math.round(v * 1e6)} µs`;
    if (v < 1) return `${(v * 1e3).toFixed(1)} ms`;
    if (v < 120) return `${v.toFixed(2)} s`;
    if (v < 7200) return `${(v / 60).toFixed(1)} min`;
    return `${(v / 3600).toFixed(1)} h`;
  }
  const serverNow = () => Date.now() / 1000 + ui.skew;
  function ago(ts) {
    if (!ts) return "-";
    const d = serverNow() - ts;
    if (d < 0) return `in ${seconds(-d)}`;
    return `${seconds(d)} ago`;
  }
  function when(ts) {
    if (!ts) return "-";
    const date = new Date(ts * 1000);
    const today = new Date().toDateString() === date.toDateString();
    return today ? date.toLocaleTimeString() : date.toLocaleString();
  }
  const pct = (v) => `${(100 * (v || 0)).toFixed(1)}%`;
  const shortId = (id) => (id.length > 12 ? `…${id.slice(-10)}` : id);
  function compact(value, limit = 80) {
    let text;
    try { text = JSON.stringify(value); } catch (e) { text = String(value); }
    return text.length > limit ? `${text.slice(0, limit - 1)}…` : text;
  }

  // -- the API ---------------------------------------------------------------------------------
  class AuthNeeded extends Error {}

  async function api(path, options = {}) {
    const headers = { Accept: "application/json" };
    if (ui.token) headers.Authorization = `Bearer ${ui.token}`;
    const init = { method: options.method || "GET", headers, cache: "no-store",
      credentials: "same-origin" };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    const response = await fetch(path, init);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (response.status === 401) throw new AuthNeeded((data && data.message) || "token needed");
    if (!response.ok) throw new Error((data && data.message) || `${response.status} ${response.statusText}`);
    if (data && typeof data.now === "number") ui.skew = data.now - Date.now() / 1000;
    return data;
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
    const text = q.toString();
    return text ? `?${text}` : "";
  }

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  // -- small charts: inline SVG drawn here -----------------------------------------------------
  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  // values: numbers (bars) or numbers/nulls (line), one per minute
  function chart(values, { kind = "bar", cls = "bar-ok", width = 120, height = 26, label = "",
    unit = (v) => String(v) } = {}) {
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
    const present = values.filter((v) => v !== null && v !== undefined);
    const max = Math.max(0, ...present);
    const title = svg("title");
    const total = kind === "bar" ? present.reduce((a, b) => a + b, 0) : null;
    title.textContent = kind === "bar" ? `${label}: ${total} in the last hour, peak ${max}/min`
      : `${label}: highest ${present.length ? unit(max) : "-"}`;
    root.append(title);
    const step = width / Math.max(1, values.length);
    root.append(svg("line", { class: "axis", x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5 }));
    if (max <= 0) return root;
    if (kind === "bar") {
      values.forEach((v, i) => {
        if (!v) return;
        const h = Math.max(1, (v / max) * (height - 2));
        root.append(svg("rect", { class: cls, x: i * step, y: height - 1 - h,
          width: Math.max(1, step - 0.5), height: h }));
      });
    } else {
      let d = "";
      values.forEach((v, i) => {
        if (v === null || v === undefined) return;
        const x = i * step + step / 2;
        const y = height - 1 - (v / max) * (height - 3);
        const prev = values[i - 1];
        d += `${prev === null || prev === undefined || d === "" ? "M" : "L"}${x.toFixed(1)},${y.toFixed(1)} `;
      });
      if (d) root.append(svg("path", { class: cls, d }));
    }
    return root;
  }

  // -- rendering -------------------------------------------------------------------------------
  function stateBadge(state) {
    return el("span", { class: `badge state-${STATES.includes(state) ? state : "other"}`, text: state });
  }

  function tagChips(tags) {
    const cell = el("td");
    for (const tag of tags || []) {
      cell.append(el("button", { class: "tag", type: "button", text: tag, title: `filter by tag ${tag}`,
        on: { click: () => setFilters({ tag }) } }));
    }
    return cell;
  }

  function jobLink(id, text) {
    return el("button", { class: "link mono", type: "button", text: text || shortId(id), title: id,
      data: { id }, on: { click: () => openDetail(id) } });
  }

  function jobNameButton(name) {
    return el("button", { class: "link", type: "button", text: name, title: `jobs named ${name}`,
      on: { click: () => setFilters({ job: name, state: "" }) } });
  }

  function renderOverview(stats, activity) {
    const byName = new Map((activity ? activity.jobs : []).map((s) => [s.job, s]));
    const queueOf = new Map();
    for (const q of ui.queues || []) for (const name of q.jobs) queueOf.set(name, q.name);
    const rows = stats.jobs.map((job) => {
      const series = byName.get(job.job);
      const done = series ? series.succeeded.reduce((a, b) => a + b, 0) : 0;
      const minutes = activity ? (activity.now - activity.start) / 60 : 0;
      const perMin = series && minutes > 0 ? (done / minutes).toFixed(1) : "-";
      return row(
        el("td", null, jobNameButton(job.job)),
        td(queueOf.get(job.job) || ""),
        num(job.counts.queued + job.counts.scheduled),
        num(job.counts.running),
        num(job.counts.succeeded),
        num(job.counts.dead),
        num(job.recoveries),
        num(pct(job.failure_rate)),
        num(seconds(job.run_time.p50)),
        num(seconds(job.run_time.p95)),
        num(seconds(job.wait_time.p95)),
        num(perMin),
        el("td", null, series ? chart(series.succeeded, { label: `${job.job} succeeded` }) : ""),
        el("td", null, series ? chart(series.failed, { cls: "bar-fail", label: `${job.job} failed` }) : ""),
        el("td", null, series ? chart(series.p95, { kind: "line", cls: "line-p95", label: `${job.job} p95 run time`, unit: seconds }) : ""),
      );
    });
    fill($("overview-table").tBodies[0], rows, "No jobs registered or seen yet.", 15);

    if (activity) {
      const size = activity.jobs.length ? activity.jobs[0].succeeded.length : 60;
      const ok = new Array(size).fill(0);
      const failed = new Array(size).fill(0);
      for (const s of activity.jobs) s.succeeded.forEach((v, i) => { ok[i] += v; });
      for (const s of activity.jobs) s.failed.forEach((v, i) => { failed[i] += v; });
      $("chart-throughput").replaceChildren(chart(ok, { width: 480, height: 60, label: "succeeded" }));
      $("chart-failures").replaceChildren(chart(failed, { width: 480, height: 60, cls: "bar-fail", label: "failed" }));
    }
  }

  function renderTags(stats) {
    const tags = stats.tags;
    const datalist = $("known-tags");
    datalist.replaceChildren(...tags.map((t) => el("option", { text: t.tag })));
    for (const option of datalist.options) option.value = option.textContent;
    const outcomes = (t) => STATES.filter((s) => t.counts[s]).map((s) => `${t.counts[s]} ${s}`).join(", ") || "-";
    const rows = tags.map((t) => row(
      el("td", null, el("button", { class: "tag", type: "button", text: t.tag, on: { click: () => setFilters({ tag: t.tag }) } })),
      td(t.jobs.join(", "), "wrap"),
      td(outcomes(t), "wrap"),
      num(t.running),
      num(t.retries),
      num(pct(t.failure_rate)),
      num(seconds(t.run_time.p50)),
      num(seconds(t.run_time.p95)),
      num(seconds(t.wait_time.p95)),
    ));
    fill($("tags-table").tBodies[0], rows, "No tags yet.", 9);
    const notes = [];
    if (stats.tags_kept > tags.length) notes.push(`The ${tags.length} busiest of ${stats.tags_kept} tags.`);
    if (stats.other_tags) {
      notes.push(`Tags past the first ${stats.max_tags} are counted together: ${outcomes(stats.other_tags)}.`);
    }
    $("tags-note").textContent = notes.join(" ");
  }

  function renderRunning(jobs) {
    const rows = jobs.map((job) => {
      const elapsed = num(job.started_at ? seconds(serverNow() - job.started_at) : "-");
      if (job.started_at) elapsed.dataset.since = String(job.started_at);
      const bar = el("progress", { title: job.progress_message || "" });
      bar.max = 1;
      if (job.progress !== null) bar.value = job.progress;
      return row(
        el("td", null, jobLink(job.id)),
        td(job.job),
        tagChips(job.tags),
        td(job.worker_id || "-", "mono"),
        elapsed,
        el("td", null, bar, " ", job.progress_message || (job.progress !== null ? pct(job.progress) : "")),
        el("td", null, el("button", { type: "button", class: "danger", text: job.cancel_requested ? "stopping…" : "Cancel",
          on: { click: () => act(`api/jobs/${encodeURIComponent(job.id)}/cancel`, "cancelled") } })),
      );
    });
    rows.sort((a, b) => Number(a.children[4].dataset.since || 0) - Number(b.children[4].dataset.since || 0));
    fill($("running-table").tBodies[0], rows, "Nothing is running.", 7);
  }

  function renderJobs(page) {
    const rows = page.jobs.map((job) => {
      const tr = row(
        el("td", null, jobLink(job.id)),
        td(job.job),
        el("td", null, stateBadge(job.state)),
        tagChips(job.tags),
        td(job.source),
        num(`${job.attempts}/${job.max_retries + 1}`),
        td(ago(job.created_at), null, when(job.created_at)),
        num(seconds(job.run_time)),
        td(compact(job.payload), "payload", compact(job.payload, 2000)),
        el("td", null, jobActions(job)),
      );
      tr.dataset.id = job.id;
      tr.setAttribute("data-testid", "job-row");
      return tr;
    });
    fill($("jobs-table").tBodies[0], rows, "No jobs match.", 10);
    ui.next = page.next;
    $("page-older").disabled = !page.next;
    $("page-newer").disabled = ui.cursor === null;
    $("page-label").textContent = `page ${ui.older.length + 1}`;
    const f = ui.filters;
    $("bulk-retry").hidden = !["dead", "rejected", "cancelled"].includes(f.state);
    $("bulk-delete").hidden = !["dead", "rejected", "cancelled", "succeeded"].includes(f.state);
  }

  function jobActions(job) {
    const box = el("span");
    if (["scheduled", "queued", "retrying", "running"].includes(job.state) && !job.cancel_requested) {
      box.append(el("button", { type: "button", class: "danger", text: "Cancel", testid: "row-cancel",
        on: { click: () => act(`api/jobs/${encodeURIComponent(job.id)}/cancel`, "cancelled") } }));
    }
    if (["dead", "rejected", "cancelled"].includes(job.state)) {
      box.append(el("button", { type: "button", text: "Retry", testid: "row-retry",
        on: { click: () => act(`api/jobs/${encodeURIComponent(job.id)}/retry`, "queued again") } }));
    }
    return box;
  }

  function renderFailures(data) {
    // job "" and type "": the groups past the broker's cap, counted together
    const rows = data.groups.map((g) => row(
      g.job ? el("td", null, jobNameButton(g.job)) : td(`(groups past ${data.max_groups})`, "muted"),
      td(g.type, "mono"),
      num(g.failures),
      num(g.dead),
      el("td", null, jobLink(g.latest.id, ago(g.latest.at))),
      td(g.latest.message || "", "wrap"),
      el("td", null, g.dead && g.job ? el("button", { type: "button", text: "Show dead",
        on: { click: () => setFilters({ job: g.job, state: "dead", tag: "" }) } }) : ""),
    ));
    fill($("failures-table").tBodies[0], rows, "No failures. ", 7);
    const totals = Object.entries(data.dead_total).map(([job, n]) => `${job}: ${n}`).join(", ");
    $("failures-note").textContent = "Every failed attempt since the last purge, by job and exception type." +
      (totals ? ` Dead in total: ${totals}.` : "");
    const rejections = [];
    for (const [job, reasons] of Object.entries(data.rejections)) {
      for (const [reason, n] of Object.entries(reasons)) rejections.push(row(td(job), td(reason, "wrap"), num(n)));
    }
    fill($("rejections-table").tBodies[0], rejections, "No rejections.", 3);
  }

  function renderSchedules(data) {
    const rows = data.schedules.map((s) => row(
      td(s.name), td(s.job), td(s.cron, "mono"), td(s.timezone),
      td(s.last_run ? when(s.last_run) : "never", null, s.last_run ? ago(s.last_run) : ""),
      td(when(s.next_run), null, ago(s.next_run)),
    ));
    fill($("schedules-table").tBodies[0], rows, "No cron schedules.", 6);
  }

  function renderWorkers(data) {
    const rows = data.workers.map((w) => {
      const current = el("td", { class: "wrap" });
      for (const job of w.current) {
        const progress = job.progress !== null && job.progress !== undefined ? ` ${pct(job.progress)}` : "";
        current.append(el("div", null, jobLink(job.id, job.job || job.id), ` ${job.started_at ? seconds(serverNow() - job.started_at) : ""}${progress}`));
      }
      if (!w.current.length) current.textContent = "idle";
      return row(td(w.id, "mono"), td(w.host), num(w.pid), td(w.queues.join(", ")), num(w.concurrency),
        td(ago(w.started_at), null, when(w.started_at)), td(ago(w.seen_at)), current);
    });
    fill($("workers-table").tBodies[0], rows, "No live workers.", 8);
  }

  function renderQueues(data) {
    ui.queues = data.queues;
    const rows = data.queues.map((q) => row(
      td(q.name), num(q.depth), td(q.jobs.join(", "), "wrap"),
      el("td", null, el("span", { class: q.paused ? "badge state-dead" : "badge state-succeeded", text: q.paused ? "paused" : "active" })),
      el("td", null, el("button", { type: "button", text: q.paused ? "Resume" : "Pause", testid: `queue-toggle`,
        on: { click: () => act(`api/queues/${encodeURIComponent(q.name)}/${q.paused ? "resume" : "pause"}`, q.paused ? "resumed" : "paused") } })),
    ));
    fill($("queues-table").tBodies[0], rows, "No queues.", 5);
  }

  // -- job detail ------------------------------------------------------------------------------
  async function openDetail(id) {
    ui.detailId = id;
    ui.rendered.delete("detail");
    $("detail-message").textContent = "";
    $("detail").hidden = false;
    if (location.hash !== `#job=${encodeURIComponent(id)}`) history.replaceState(null, "", `#job=${encodeURIComponent(id)}`);
    await loadDetail();
  }

  function closeDetail() {
    ui.detailId = null;
    $("detail").hidden = true;
    if (location.hash.startsWith("#job=")) history.replaceState(null, "", location.pathname + location.search);
  }

  async function loadDetail() {
    if (!ui.detailId) return;
    try {
      const job = await api(`api/jobs/${encodeURIComponent(ui.detailId)}`);
      const { now: _ignored, ...stable } = job;
      if (changed("detail", stable)) renderDetail(job);
    } catch (error) {
      if (error instanceof AuthNeeded) throw error;
      $("detail-message").textContent = error.message;
    }
  }

  function renderDetail(job) {
    $("detail-title").textContent = `${job.job} · ${job.id}`;
    const fields = [
      ["state", stateBadge(job.state)],
      ["job", job.job + (job.registered ? "" : " (not registered)")],
      ["id", job.id],
      ["source", job.source],
      ["queue", `${job.queue} (priority ${job.priority})`],
      ["tags", (job.tags || []).join(", ") || "-"],
      ["attempts", `${job.attempts} of ${job.max_retries + 1}`],
      ["progress", job.progress === null ? "-" : `${pct(job.progress)}${job.progress_message ? ` · ${job.progress_message}` : ""}`],
      ["created", when(job.created_at)],
      ["queued", when(job.queued_at)],
      ["started", when(job.started_at)],
      ["finished", when(job.finished_at)],
      ["eta", job.eta ? when(job.eta) : "-"],
      ["wait time", seconds(job.wait_time)],
      ["run time", seconds(job.run_time)],
      ["worker", job.worker_id || "-"],
      ["unique key", job.unique_key || "-"],
      ["reason", job.reason || "-"],
    ];
    if (job.cancel_requested) fields.push(["cancel", "requested; the worker is stopping it"]);
    $("detail-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", null, v)]));
    $("detail-payload").textContent = JSON.stringify(job.payload, null, 2);
    $("detail-result-block").hidden = job.result === null || job.result === undefined;
    $("detail-result").textContent = JSON.stringify(job.result, null, 2);
    $("detail-error-block").hidden = !job.error;
    $("detail-error-title").textContent = ["dead", "retrying"].includes(job.state) ? "Error" : "Earlier failed attempt";
    $("detail-error").textContent = job.error ? `${job.error.type}: ${job.error.message}` : "";
    $("detail-traceback").textContent = job.error ? job.error.traceback || "" : "";
    $("detail-retry").disabled = !["dead", "rejected", "cancelled"].includes(job.state);
    $("detail-cancel").disabled = !["scheduled", "queued", "retrying", "running"].includes(job.state) || job.cancel_requested;
  }

  // -- actions ---------------------------------------------------------------------------------
  async function act(path, done, body) {
    const message = ui.detailId ? $("detail-message") : $("jobs-message");
    try {
      const result = await api(path, { method: "POST", body });
      message.textContent = done;
      await refresh(true);
      return result;
    } catch (error) {
      if (error instanceof AuthNeeded) return needLogin(error.message);
      message.textContent = error.message;
      return null;
    }
  }

  async function bulk(action) {
    const f = ui.filters;
    const what = [f.state, f.job && `job ${f.job}`, f.tag && `tag ${f.tag}`].filter(Boolean).join(", ");
    if (!window.confirm(`${action === "retry" ? "Retry" : "Delete"} every job matching: ${what}?`)) return;
    const body = { state: f.state };
    if (f.job) body.job = f.job;
    if (f.tag) body.tag = f.tag;
    let total = 0;
    for (;;) {
      const result = await act(`api/bulk/${action}`, `${action} done`, body);
      if (!result) return;
      total += result.retried || result.deleted || 0;
      if (!result.more) break;
    }
    $("jobs-message").textContent = `${action === "retry" ? "Retried" : "Deleted"} ${total} jobs.`;
  }

  function setFilters(changes) {
    Object.assign(ui.filters, changes);
    $("filter-state").value = ui.filters.state;
    ensureOption($("filter-job"), ui.filters.job);
    $("filter-job").value = ui.filters.job;
    $("filter-tag").value = ui.filters.tag;
    ui.cursor = null;
    ui.older = [];
    ui.rendered.delete("jobs");
    $("jobs-message").textContent = "";
    $("jobs").scrollIntoView({ block: "start" });
    loadJobs().catch(handleError);
  }

  function ensureOption(select, value) {
    if (!value || [...select.options].some((o) => o.value === value)) return;
    const option = el("option", { text: value });
    option.value = value;
    select.append(option);
  }

  function updateJobOptions(names) {
    const select = $("filter-job");
    const have = [...select.options].map((o) => o.value).slice(1);
    if (JSON.stringify(have) === JSON.stringify(names)) return;
    const keep = select.value;
    select.replaceChildren(el("option", { text: "any" }), ...names.map((n) => el("option", { text: n })));
    select.options[0].value = "";
    for (const option of [...select.options].slice(1)) option.value = option.textContent;
    ensureOption(select, keep);
    select.value = keep;
  }

  // -- loading ---------------------------------------------------------------------------------
  async function loadJobs() {
    const f = ui.filters;
    const page = await api(`api/jobs${query({ state: f.state, job: f.job, tag: f.tag, limit: PAGE_SIZE, before: ui.cursor })}`);
    const { now: _ignored, ...stable } = page;
    if (changed("jobs", { stable, f, cursor: ui.cursor })) renderJobs(page);
  }

  async function refresh(everything) {
    const slow = everything || ui.tick % SLOW_EVERY === 0;
    ui.tick += 1;
    const [stats, running] = await Promise.all([
      api(`api/stats${slow ? "" : "?tags=0"}`),
      api("api/jobs?state=running&limit=200"),
    ]);
    if (slow) {
      const [activity, failures, workers, schedules, queues] = await Promise.all([
        api("api/activity"), api("api/failures"), api("api/workers"), api("api/schedules"), api("api/queues"),
      ]);
      ui.activity = activity;
      if (changed("queues", queues)) renderQueues(queues);
      if (changed("failures", failures)) renderFailures(failures);
      const { now: _w, ...w } = workers;
      if (changed("workers", w)) renderWorkers(workers);
      const { now: _s, ...s } = schedules;
      if (changed("schedules", s)) renderSchedules(schedules);
      const { tags, tags_kept, max_tags, other_tags } = stats;
      if (tags && changed("tags", { tags, tags_kept, other_tags })) renderTags({ tags, tags_kept, max_tags, other_tags });
    }
    const { now: _n, tags: _t, tags_kept: _k, max_tags: _m, other_tags: _o, throughput: _tp, ...rest } = stats;
    // the API's throughput window grows with every poll; this table draws its own per-minute column
    const overview = { ...rest, jobs: rest.jobs.map(({ throughput: _j, ...job }) => job) };
    ui.stats = stats;
    if (changed("overview", { overview, a: ui.activity && ui.activity.now })) renderOverview(stats, ui.activity);
    updateJobOptions(stats.jobs.map((j) => j.job));
    const { now: _r, ...runningStable } = running;
    if (changed("running", runningStable)) renderRunning(running.jobs);
    await loadJobs();
    await loadDetail();
    setStatus(`live · updated ${new Date().toLocaleTimeString()}`);
  }

  function handleError(error) {
    if (error instanceof AuthNeeded) return needLogin(error.message);
    setStatus(`error: ${error.message}`, true);
    return null;
  }

  async function poll() {
    clearTimeout(ui.timer);
    try {
      await refresh(false);
    } catch (error) {
      handleError(error);
      if (error instanceof AuthNeeded) return;
    }
    ui.timer = setTimeout(poll, POLL_MS);
  }

  function tickClocks() {
    for (const cell of document.querySelectorAll("[data-since]")) {
      cell.textContent = seconds(serverNow() - Number(cell.dataset.since));
    }
  }

  // -- signing in ------------------------------------------------------------------------------
  function needLogin(message) {
    clearTimeout(ui.timer);
    $("dashboard").hidden = true;
    $("detail").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = ui.token ? message : "";
    setStatus("signed out", true);
    $("token").focus();
  }

  async function start() {
    try {
      const me = await api("api/whoami");
      $("whoami").textContent = `enqueues as ${me.source}`;
      $("logout").hidden = !ui.token;
      $("login").hidden = true;
      $("dashboard").hidden = false;
      ui.rendered.clear();
      if (location.hash.startsWith("#job=")) {
        let id = null;
        try { id = decodeURIComponent(location.hash.slice(5)); } catch (e) { id = null; }
        if (id) openDetail(id).catch(handleError);
      }
      poll();
    } catch (error) {
      handleError(error);
    }
  }

  function wire() {
    const stateSelect = $("filter-state");
    for (const s of STATES) {
      const option = el("option", { text: s });
      option.value = s;
      stateSelect.append(option);
    }
    $("filters").addEventListener("submit", (event) => {
      event.preventDefault();
      setFilters({ state: $("filter-state").value, job: $("filter-job").value, tag: $("filter-tag").value.trim() });
    });
    $("filter-state").addEventListener("change", () => setFilters({ state: $("filter-state").value }));
    $("filter-job").addEventListener("change", () => setFilters({ job: $("filter-job").value }));
    $("filter-clear").addEventListener("click", () => setFilters({ state: "", job: "", tag: "" }));
    $("page-older").addEventListener("click", () => {
      if (!ui.next) return;
      ui.older.push(ui.cursor);
      ui.cursor = ui.next;
      loadJobs().catch(handleError);
    });
    $("page-newer").addEventListener("click", () => {
      ui.cursor = ui.older.length ? ui.older.pop() : null;
      loadJobs().catch(handleError);
    });
    $("bulk-retry").addEventListener("click", () => bulk("retry"));
    $("bulk-delete").addEventListener("click", () => bulk("delete"));
    $("detail-close").addEventListener("click", closeDetail);
    $("detail-retry").addEventListener("click", () => act(`api/jobs/${encodeURIComponent(ui.detailId)}/retry`, "queued again"));
    $("detail-cancel").addEventListener("click", () => act(`api/jobs/${encodeURIComponent(ui.detailId)}/cancel`, "cancel requested"));
    document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeDetail(); });
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      ui.token = $("token").value.trim();
      $("token").value = "";
      sessionStorage.setItem(TOKEN_KEY, ui.token);
      start();
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      ui.token = null;
      needLogin("");
    });
    setInterval(tickClocks, 1000);
  }

  document.addEventListener("DOMContentLoaded", () => { wire(); start(); });
})();
