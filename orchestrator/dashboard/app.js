// gpumarket orchestrator dashboard: polls GET /v1/dashboard with the operator token and draws
// it. Plain JS, no dependencies, no network beyond this origin. Wei arrive as decimal strings
// and stay BigInt here: a JS number loses wei past 2**53.
"use strict";

(() => {
  const ENDPOINT = "/v1/dashboard";
  const POLL_MS = 2000;
  const TIMEOUT_MS = 5000;
  const STALE_MS = 3 * POLL_MS + TIMEOUT_MS;
  const WINDOW_MIN = 30;
  const BUCKET_S = 60;
  const TOKEN_KEY = "gpumarket.operatorToken";
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Header order; a state the server adds later is shown after these.
  const JOB_STATES = ["queued", "assigned", "running", "verifying", "succeeded", "failed", "cancelled", "expired"];

  const $ = (id) => document.getElementById(id);
  let token = null;
  let timer = null;
  let generation = 0; // bumped on every token change: answers to an older token are dropped
  let lastOk = 0;

  // ---- formatting ----------------------------------------------------------------------

  const group = (digits) => digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");

  /** Exact decimal of wei / 10**decimals, trailing zeros trimmed. */
  function scaled(wei, decimals) {
    const base = 10n ** BigInt(decimals);
    const frac = (wei % base).toString().padStart(decimals, "0").replace(/0+$/, "");
    return group((wei / base).toString()) + (frac ? "." + frac : "");
  }

  /** {readable, exact}: the amount in ETH, gwei or wei (whichever reads best), always exact. */
  function weiText(text) {
    const wei = BigInt(text);
    const exact = group(wei.toString()) + " wei";
    if (wei >= 10n ** 15n) return { readable: scaled(wei, 18) + " ETH", exact };
    if (wei >= 10n ** 6n) return { readable: scaled(wei, 9) + " gwei", exact };
    return { readable: exact, exact: null };
  }

  /** A short, rounded label for a chart axis (the tables and tooltips stay exact). */
  function weiAxis(wei) {
    const [unit, decimals] = wei >= 10n ** 15n ? ["ETH", 18] : wei >= 10n ** 6n ? ["gwei", 9] : ["wei", 0];
    const value = Number(wei) / 10 ** decimals;
    return `${value.toLocaleString("en-US", { maximumSignificantDigits: 3 })} ${unit}`;
  }

  function weiNode(text) {
    const span = el("span", "wei");
    span.dataset.wei = text;
    const { readable, exact } = weiText(text);
    span.append(el("span", "readable", readable));
    if (exact) span.append(el("span", "exact", exact));
    span.title = `${group(text)} wei = ${scaled(BigInt(text), 18)} ETH`;
    return span;
  }

  function joules(j) {
    if (j >= 1e6) return `${(j / 1e6).toFixed(2)} MJ`;
    if (j >= 1e3) return `${(j / 1e3).toFixed(2)} kJ`;
    return `${j.toFixed(j < 10 ? 2 : 1)} J`;
  }

  function seconds(s) {
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 120) return `${s.toFixed(2)} s`;
    return `${(s / 60).toFixed(1)} min`;
  }

  // 24-hour, like the status line's time: "14:05", never "02:05 PM".
  const clock = (date) => date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  const clockS = (date) => date.toLocaleTimeString([], { hour12: false });
  const short = (id) => (id && id.length > 12 ? `${id.slice(0, 6)}…${id.slice(-4)}` : id || "");

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function cell(content, cls) {
    const td = el("td", cls);
    if (content instanceof Node) td.append(content);
    else td.textContent = content === null || content === undefined ? "—" : String(content);
    return td;
  }

  // ---- token, errors, status -------------------------------------------------------------

  function tokenFromFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    const given = params.get("token");
    if (!given) return null;
    params.delete("token");
    const rest = params.toString();
    // Out of the address bar and history, so the token is not shared with a screenshot.
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    return given;
  }

  function useToken(value) {
    token = value || null;
    generation += 1;
    for (const section of Object.keys(drawn)) delete drawn[section];
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("token-form").hidden = Boolean(token);
    $("change-token").hidden = !token;
    if (timer) clearTimeout(timer);
    timer = null;
    if (token) {
      setStatus("connecting…", "");
      poll();
    } else {
      // Figures stay hidden until a token is accepted (they may be another token's).
      $("board").hidden = true;
      lastOk = 0;
      setStatus("not connected", "");
      $("token-input").focus();
    }
  }

  function showError(title, detail) {
    $("error-title").textContent = title;
    $("error-detail").textContent = detail;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
  }

  function setStatus(text, cls) {
    const status = $("status");
    status.textContent = text;
    status.className = "status " + cls;
  }

  function tickStatus() {
    if (!token || !lastOk) return;
    const age = Date.now() - lastOk;
    const when = clockS(new Date(lastOk));
    if (age > STALE_MS) setStatus(`stale · last update ${when}`, "stale");
    else setStatus(`live · updated ${when}`, "live");
  }

  // ---- polling ---------------------------------------------------------------------------

  function schedule() {
    if (token) timer = setTimeout(poll, POLL_MS);
  }

  async function problemDetail(resp) {
    try {
      const body = await resp.json();
      return body.detail || body.title || resp.statusText;
    } catch {
      return resp.statusText;
    }
  }

  async function poll() {
    timer = null;
    const mine = generation;
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), TIMEOUT_MS);
    let resp;
    try {
      const query = `?minutes=${WINDOW_MIN}&bucket_s=${BUCKET_S}`;
      resp = await fetch(ENDPOINT + query, {
        headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
        cache: "no-store",
        signal: abort.signal,
      });
    } catch (err) {
      if (mine !== generation) return;
      const why = err.name === "AbortError" ? `no answer in ${TIMEOUT_MS / 1000} s` : "connection failed";
      const since = lastOk ? `; the figures below are from ${clockS(new Date(lastOk))}` : "";
      showError("Orchestrator unreachable.", `${location.origin} did not answer (${why}). Retrying every ${POLL_MS / 1000} s${since}.`);
      setStatus("offline", "stale");
      schedule();
      return;
    } finally {
      clearTimeout(timeout);
    }
    if (mine !== generation) return;
    if (resp.status === 401 || resp.status === 403) {
      const detail = (await problemDetail(resp)).replace(/\.$/, "");
      useToken(null);
      showError(
        `Token refused (${resp.status}).`,
        `${detail}. Paste the right one below: the value of GPUMARKET_ADMIN_TOKEN, or the admin-token file in the orchestrator's data folder.`,
      );
      return;
    }
    if (!resp.ok) {
      showError(`The orchestrator answered ${resp.status}.`, `${await problemDetail(resp)}. Retrying.`);
      schedule();
      return;
    }
    try {
      const data = await resp.json();
      if (mine !== generation) return;
      render(data);
      $("board").hidden = false;
      clearError();
      lastOk = Date.now();
      tickStatus();
    } catch (err) {
      showError("Cannot show the figures.", String(err));
    }
    schedule();
  }

  // ---- rendering -------------------------------------------------------------------------

  // What each section was last drawn from: a section whose data did not change is left alone,
  // so a poll does not redraw (and flicker, or drop a text selection) what stayed the same.
  const drawn = {};

  function changed(section, value) {
    const key = JSON.stringify(value);
    if (drawn[section] === key) return false;
    drawn[section] = key;
    return true;
  }

  function render(data) {
    if (changed("totals", [data.totals, data.payments])) renderTotals(data);
    if (changed("workers", [data.workers, data.payments])) renderWorkers(data.workers, data.payments);
    if (changed("jobs", data.jobs)) renderJobs(data.jobs);
    if (changed("generation", data.generation)) renderGeneration(data.generation);
    if (!changed("series", [data.series, data.payments])) return;
    const buckets = data.series.buckets;
    const label = data.series.bucket_s === 60 ? "minute" : `${data.series.bucket_s} s`;
    for (const node of document.querySelectorAll(".bucket-label")) node.textContent = label;
    barChart($("chart-throughput"), buckets, data.series.bucket_s, [
      { cls: "ok", name: "succeeded", value: (b) => BigInt(b.jobs_succeeded) },
      { cls: "bad", name: "failed", value: (b) => BigInt(b.jobs_failed) },
    ], (v) => v.toString());
    const weiKey = data.payments ? "wei_settled" : "wei_billed";
    $("chart-wei-title").textContent = data.payments ? "Wei settled" : "Wei billed (no on-chain payments)";
    barChart($("chart-wei"), buckets, data.series.bucket_s, [
      { cls: "money", name: data.payments ? "settled" : "billed", value: (b) => BigInt(b[weiKey]) },
    ], weiAxis);
  }

  function renderTotals(data) {
    const t = data.totals;
    $("total-workers-online").textContent = t.workers_online;
    $("total-workers-registered").textContent = t.workers_registered;
    const list = $("total-jobs");
    list.replaceChildren();
    const extra = Object.keys(t.jobs_by_state).filter((s) => !JOB_STATES.includes(s));
    for (const state of [...JOB_STATES, ...extra]) {
      const n = t.jobs_by_state[state] || 0;
      const item = el("li", `state-${state}${n ? "" : " zero"}`);
      item.dataset.state = state;
      item.append(el("b", "n", n), el("span", "", ` ${state}`));
      list.append(item);
    }
    const chip = $("payments");
    chip.hidden = false;
    chip.textContent = data.payments ? "on-chain payments" : "no on-chain payments";
    chip.className = "chip " + (data.payments ? "on" : "off");
    $("total-wei-title").textContent = data.payments ? "Wei settled" : "Wei billed";
    const main = data.payments ? t.wei_settled_total : t.wei_billed_total;
    $("total-wei").replaceChildren(weiNode(main));
    const more = $("total-wei-more");
    more.replaceChildren();
    if (data.payments) {
      more.append(`${t.ledger_entries} ledger entries · redeemed on chain `, weiNode(t.wei_redeemed_total));
    } else {
      more.append("what succeeded jobs cost; nothing is settled without a chain");
    }
    $("total-energy").textContent = joules(t.energy_j_total);
    $("total-energy").title = `${t.energy_j_total} J`;
    $("total-energy-source").textContent = energySource(t.energy_j_total, t.energy_j_estimated || 0);
  }

  const count = (n) => group(String(n));

  function tokensPerS(rate) {
    return `${rate.toFixed(rate < 10 ? 2 : 1)} tokens/s`;
  }

  /** Generate jobs over the window: tokens, tokens per second, time to first token. */
  function renderGeneration(g) {
    $("gen-window").textContent = `${WINDOW_MIN} min`;
    const none = !g.jobs && !g.first_token_jobs;
    $("gen-empty").hidden = !none;
    $("gen-figures").hidden = none;
    if (none) {
      $("gen-empty").textContent = `No generation yet in the last ${WINDOW_MIN} min: tokens, tokens per second and time to first token show here once generate jobs run.`;
      return;
    }
    const total = g.prompt_tokens + g.completion_tokens;
    $("gen-tokens").textContent = count(total);
    $("gen-tokens").dataset.value = String(total);
    $("gen-tokens-more").textContent =
      `${count(g.prompt_tokens)} prompt + ${count(g.completion_tokens)} completion, ${g.jobs} ${g.jobs === 1 ? "job" : "jobs"} succeeded`;
    const rate = $("gen-rate");
    rate.textContent = g.completion_tokens_per_s === null ? "—" : tokensPerS(g.completion_tokens_per_s);
    rate.dataset.value = g.completion_tokens_per_s === null ? "" : String(g.completion_tokens_per_s);
    const ttft = $("gen-ttft");
    const more = $("gen-ttft-more");
    if (g.first_token_p50_s === null) {
      ttft.textContent = "—";
      ttft.dataset.value = "";
      more.textContent = "no streamed text yet";
      return;
    }
    ttft.textContent = `${seconds(g.first_token_p50_s)} p50`;
    ttft.dataset.value = String(g.first_token_p50_s);
    ttft.dataset.p99 = String(g.first_token_p99_s);
    more.textContent =
      `p99 ${seconds(g.first_token_p99_s)} · submission to first streamed text, ${g.first_token_jobs} ${g.first_token_jobs === 1 ? "job" : "jobs"}`;
  }

  /** How the energy total was found: metered (NVML, RAPL), estimated, or some of each. */
  function energySource(total, estimated) {
    if (!total) return "succeeded jobs; none reported energy yet";
    if (estimated >= total) return "succeeded jobs, estimated by workers (no power meter readable)";
    if (!estimated) return "succeeded jobs, as measured by workers (NVML or RAPL)";
    const share = Math.round((estimated / total) * 100);
    return `succeeded jobs; ${share}% estimated by workers without a power meter, the rest measured`;
  }

  function emptyRow(tbody, columns, text) {
    const tr = el("tr", "empty");
    const td = cell(text);
    td.colSpan = columns;
    tr.append(td);
    tbody.replaceChildren(tr);
  }

  function renderWorkers(workers, payments) {
    const tbody = $("workers").tBodies[0];
    if (!workers.length) {
      emptyRow(tbody, 9, "No workers registered yet. Start one with: gpumarket worker run --orchestrator " + location.origin);
      return;
    }
    const rows = workers.map((w) => {
      const tr = el("tr");
      tr.dataset.workerId = w.id;
      const who = el("span", "mono", short(w.address));
      who.title = `${w.address}\nworker id ${w.id}`;
      const hw = el("span", "", w.hardware_summary);
      hw.title = w.gpu_name ? `CPU: ${w.cpu_model} (${w.cpu_cores} cores)` : "no GPU: runs on the CPU";
      const status = el("span", `badge ${w.online ? "ok" : "bad"}`, w.status);
      const load = el("span", "load");
      const bar = el("span", "bar");
      const fill = el("span", "fill");
      fill.style.width = `${Math.min(100, Math.round(w.load * 100))}%`;
      bar.append(fill);
      load.append(bar, el("span", "", `${w.running_jobs}/${w.max_concurrency}`));
      const money = (v) => (payments ? weiNode(v) : el("span", "muted", "—"));
      tr.append(
        cell(who, "col-worker"),
        cell(hw, "col-hardware"),
        cell(status, "col-status"),
        cell(load, "col-load"),
        cell(w.reputation.toFixed(2), "col-reputation num"),
        cell(`${w.jobs_succeeded} / ${w.jobs_failed}`, "col-jobs num"),
        cell(weiNode(w.billed_wei), "col-billed num"),
        cell(money(w.settled_wei), "col-settled num"),
        cell(money(w.redeemed_wei), "col-redeemed num"),
      );
      return tr;
    });
    tbody.replaceChildren(...rows);
  }

  function renderJobs(jobs) {
    const tbody = $("jobs").tBodies[0];
    if (!jobs.length) {
      emptyRow(tbody, 8, "No jobs yet. Submit one with POST /v1/jobs or: gpumarket job submit");
      return;
    }
    const rows = jobs.map((j) => {
      const tr = el("tr");
      tr.dataset.jobId = j.id;
      const id = el("span", "mono", short(j.id));
      id.title = j.id;
      const worker = el("span", "mono", j.worker_address ? short(j.worker_address) : "—");
      if (j.worker_address) worker.title = j.worker_address;
      let energy = null;
      if (j.energy_j !== null) {
        energy = el("span", "", joules(j.energy_j));
        if (j.energy_source) energy.append(el("span", "muted", ` ${j.energy_source}`));
      }
      tr.append(
        cell(id, "col-id"),
        cell(j.type, "col-type"),
        cell(j.model, "col-model"),
        cell(el("span", `badge state-${j.state}`, j.state), "col-state"),
        cell(worker, "col-worker"),
        cell(j.latency_s === null ? null : seconds(j.latency_s), "col-latency num"),
        cell(j.cost_wei === null ? null : weiNode(j.cost_wei), "col-cost num"),
        cell(energy, "col-energy num"),
      );
      return tr;
    });
    tbody.replaceChildren(...rows);
  }

  /** Stacked bars, one per bucket; ``series`` values are BigInt so wei stay exact. */
  function barChart(root, buckets, bucketS, series, format) {
    const W = 600, H = 200, left = 84, right = 8, top = 10, bottom = 24;
    const plotW = W - left - right, plotH = H - top - bottom;
    const totals = buckets.map((b) => series.reduce((sum, s) => sum + s.value(b), 0n));
    const max = totals.reduce((m, v) => (v > m ? v : m), 0n);
    const nodes = [];
    nodes.push(svg("line", { x1: left, y1: top + plotH, x2: W - right, y2: top + plotH, class: "axis" }));
    nodes.push(svg("text", { x: left - 6, y: top + 8, class: "tick end" }, max ? format(max) : ""));
    nodes.push(svg("text", { x: left - 6, y: top + plotH, class: "tick end" }, "0"));
    const step = plotW / Math.max(1, buckets.length);
    const labelEvery = Math.max(1, Math.ceil(buckets.length / 6));
    let drawn = 0;
    buckets.forEach((b, i) => {
      const start = new Date(b.start);
      if (i % labelEvery === 0) {
        nodes.push(svg("text", { x: left + i * step, y: H - 6, class: "tick" }, clock(start)));
      }
      let y = top + plotH;
      const parts = [];
      for (const s of series) {
        const v = s.value(b);
        parts.push(`${format(v)} ${s.name}`);
        if (!max || !v) continue;
        const h = (Number((v * 100000n) / max) / 100000) * plotH;
        y -= h;
        nodes.push(svg("rect", {
          x: (left + i * step + 1).toFixed(1), y: y.toFixed(1),
          width: Math.max(1, step - 2).toFixed(1), height: Math.max(1, h).toFixed(1),
          class: `bar ${s.cls}`,
        }));
        drawn += 1;
      }
      const end = new Date(start.getTime() + bucketS * 1000);
      const hover = svg("rect", {
        x: (left + i * step).toFixed(1), y: top, width: step.toFixed(1), height: plotH, class: "hover",
      });
      hover.append(svg("title", {}, `${clockS(start)}–${clockS(end)}: ${parts.join(", ")}`));
      nodes.push(hover);
    });
    if (!max) {
      nodes.push(svg("text", { x: left + plotW / 2, y: top + plotH / 2, class: "chart-empty" },
        `nothing in the last ${WINDOW_MIN} min`));
    }
    root.dataset.bars = String(drawn);
    root.dataset.total = totals.reduce((a, v) => a + v, 0n).toString();
    root.replaceChildren(...nodes);
  }

  // ---- start -----------------------------------------------------------------------------

  function start() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token-input").value.trim();
      $("token-input").value = "";
      if (value) {
        clearError();
        useToken(value);
      }
    });
    $("change-token").addEventListener("click", () => {
      useToken(null);
      clearError();
    });
    window.addEventListener("hashchange", () => {
      const given = tokenFromFragment();
      if (given) useToken(given);
    });
    setInterval(tickStatus, 1000);
    useToken(tokenFromFragment() || sessionStorage.getItem(TOKEN_KEY));
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
