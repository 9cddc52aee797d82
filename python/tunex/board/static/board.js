// The tunex board's page: polls /api/run for the chosen run and redraws its charts with Chart.js.
"use strict";

const INTERVAL_MS = Number(document.body.dataset.intervalMs) || 2000;
const SMOOTHING = 0.9; // weight of the running average in the smoothed loss (as TensorBoard's slider)
const charts = {};
let current = null;

function lineChart(id, series, yTitle, logScale) {
  const datasets = series.map((s) => ({
    label: s.label, data: [], borderColor: s.color, backgroundColor: s.color,
    borderWidth: s.width || 1.5, pointRadius: s.points ? 3 : 0, showLine: !s.pointsOnly, tension: 0,
  }));
  charts[id] = new Chart(document.getElementById(id), {
    type: "line",
    data: { datasets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, parsing: false, normalized: true,
      interaction: { mode: "nearest", intersect: false },
      scales: {
        x: { type: "linear", title: { display: true, text: "step" } },
        y: { type: logScale ? "logarithmic" : "linear", title: { display: true, text: yTitle } },
      },
      plugins: { legend: { display: series.length > 1 } },
    },
  });
}

lineChart("chart-loss", [
  { label: "train loss", color: "rgba(31,119,180,0.35)", width: 1 },
  { label: "train loss (smoothed)", color: "rgb(31,119,180)", width: 2 },
  { label: "eval loss", color: "rgb(214,39,40)", points: true, width: 2 },
], "loss");
lineChart("chart-eval", [{ label: "eval perplexity", color: "rgb(214,39,40)", points: true }], "perplexity");
lineChart("chart-lr", [{ label: "learning rate", color: "rgb(44,160,44)" }], "lr");
lineChart("chart-tps", [{ label: "tokens/s", color: "rgb(148,103,189)" }], "tokens/s");

function points(records, key) {
  return records.filter((r) => typeof r[key] === "number").map((r) => ({ x: r.step, y: r[key] }));
}

// an exponential moving average, debiased at the start (divided by the weight it has gathered)
function smoothed(data) {
  let avg = 0;
  let weight = 0;
  return data.map((p) => {
    avg = SMOOTHING * avg + (1 - SMOOTHING) * p.y;
    weight = SMOOTHING * weight + (1 - SMOOTHING);
    return { x: p.x, y: avg / weight };
  });
}

function setData(id, lists) {
  const chart = charts[id];
  lists.forEach((data, i) => { chart.data.datasets[i].data = data; });
  chart.update("none");
}

function fmt(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : "-";
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
}

function render(run) {
  const m = run.metrics;
  const train = points(m, "loss");
  const evals = points(m, "eval_loss");
  setData("chart-loss", [train, smoothed(train), evals]);
  setData("chart-eval", [points(m, "eval_perplexity")]);
  setData("chart-lr", [points(m, "lr")]);
  setData("chart-tps", [points(m, "tokens_per_s")]);

  const last = [...m].reverse().find((r) => typeof r.loss === "number");
  const lastEval = [...m].reverse().find((r) => typeof r.eval_loss === "number");
  const parts = [];
  if (last) {
    parts.push(`<b>step</b> ${last.step}`, `<b>loss</b> <span id="last-loss">${fmt(last.loss, 4)}</span>`,
      `<b>lr</b> ${typeof last.lr === "number" ? last.lr.toExponential(2) : "-"}`, `<b>tokens/s</b> ${fmt(last.tokens_per_s, 0)}`);
  }
  if (lastEval) {
    parts.push(`<b>eval_loss</b> <span id="last-eval-loss">${fmt(lastEval.eval_loss, 4)}</span> (step ${lastEval.step})`,
      `<b>eval_perplexity</b> ${fmt(lastEval.eval_perplexity, 3)}`);
  }
  if (run.best) parts.push(`<b>best</b> ${run.best.metric} ${fmt(run.best.value, 4)} at step ${run.best.step}`);
  const summary = parts.length ? parts.join(" &nbsp; ") : "no step logged yet";
  const box = document.getElementById("summary");
  if (box.innerHTML !== summary) box.innerHTML = summary; // unchanged: the DOM stays as it is
  document.getElementById("problems").textContent = run.problems.join("\n");

  const answers = document.querySelector("#answers tbody");
  answers.replaceChildren();
  [...run.answers].reverse().forEach((a) => {
    const row = answers.insertRow();
    cell(row, a.step);
    cell(row, a.prompt);
    cell(row, a.answer, "answer");
  });

  const ckpts = document.querySelector("#checkpoints tbody");
  ckpts.replaceChildren();
  run.checkpoints.forEach((c) => {
    const row = ckpts.insertRow();
    if (c.name.startsWith("best")) row.className = "best";
    cell(row, c.name);
    cell(row, c.step === null ? (run.best ? run.best.step : "") : c.step);
    cell(row, bytes(c.bytes));
    cell(row, new Date(c.modified * 1000).toLocaleString());
  });
  const config = document.getElementById("config");
  if (config.textContent !== run.config) config.textContent = run.config || "(no config.toml yet)";
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const runs = (await (await fetch("/api/runs")).json()).runs;
    const select = document.getElementById("run");
    if (select.options.length !== runs.length || [...select.options].some((o, i) => o.value !== runs[i])) {
      select.replaceChildren(...runs.map((r) => new Option(r, r)));
      if (current && runs.includes(current)) select.value = current;
    }
    current = select.value || runs[0] || null;
    if (current) {
      const reply = await fetch(`/api/run?name=${encodeURIComponent(current)}`);
      const run = await reply.json();
      if (!reply.ok) throw new Error(run.error);
      render(run);
    }
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  } catch (err) {
    status.textContent = `not updated: ${err.message}`;
  }
}

document.getElementById("run").addEventListener("change", (e) => { current = e.target.value; poll(); });
poll();
setInterval(poll, INTERVAL_MS);
