// The mmdit dashboard: polls the coordinator's /api/series and /api/run, draws uPlot charts.
// Every chart container gets data-points (how many points it draws), for tests and curious eyes.
"use strict";

const charts = {};
let versions = [];

// Vertical lines at data-config changes, labelled with the version and its reason.
function changeMarkers() {
  return {
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        ctx.save();
        ctx.strokeStyle = "#d33";
        ctx.fillStyle = "#d33";
        ctx.lineWidth = 1.5;
        ctx.font = "11px sans-serif";
        for (const v of versions) {
          if (!v.time) continue;
          const x = u.valToPos(v.time, "x", true);
          if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.fillText(`v${v.version}${v.why ? ": " + v.why : ""}`, x + 3, u.bbox.top + 12);
        }
        ctx.restore();
      }],
    },
  };
}

function makeChart(id, series, scales, byStep) {
  const el = document.getElementById(id);
  const right = series.find(s => s.scale && s.scale !== "y");
  const opts = {
    width: Math.max(320, el.clientWidth || 540), height: 200,
    scales: Object.assign({ x: { time: !byStep } }, scales || {}),
    series: [{}].concat(series),
    axes: [{}].concat(right ? [{}, { scale: right.scale, side: 1, grid: { show: false } }] : [{}]),
    plugins: byStep ? [] : [changeMarkers()],
  };
  charts[id] = new uPlot(opts, [[]].concat(series.map(() => [])), el);
}

function setData(id, columns) {
  const points = columns[0].length;
  charts[id].setData(columns);
  document.getElementById(id).dataset.points = String(points);
}

function init() {
  makeChart("chart-loss", [{ label: "loss", stroke: "#1f77b4" }]);
  makeChart("chart-throughput", [{ label: "samples/s", stroke: "#2ca02c" }]);
  makeChart("chart-flops", [{ label: "TFLOP/s", stroke: "#9467bd" },
                            { label: "MFU", stroke: "#ff7f0e", scale: "mfu" }], { mfu: { range: [0, 1] } });
  makeChart("chart-wait", [{ label: "data wait", stroke: "#8c564b" }], { y: { range: [0, 1] } });
  makeChart("chart-walltime", [{ label: "steps", stroke: "#2ca02c" }, { label: "data wait", stroke: "#8c564b" },
                               { label: "checkpoint stall", stroke: "#d62728" },
                               { label: "eval stall", stroke: "#9467bd" }], { y: { range: [0, 1] } });
  makeChart("chart-evals", [{ label: "held-out loss", stroke: "#1f77b4", points: { show: true } },
                            { label: "OCR word accuracy", stroke: "#ff7f0e", scale: "acc", points: { show: true } }],
            { acc: { range: [0, 1] } }, true);
  makeChart("chart-objective", [{ label: "reward margin", stroke: "#1f77b4" },
                                { label: "preference accuracy", stroke: "#ff7f0e", scale: "acc" }],
            { acc: { range: [0, 1] } });
  makeChart("chart-grpo-reward", [{ label: "reward mean", stroke: "#2ca02c", width: 2 },
                                  { label: "mean - std", stroke: "#98df8a", dash: [4, 4] },
                                  { label: "mean + std", stroke: "#98df8a", dash: [4, 4] }]);
  makeChart("chart-grpo-time", [{ label: "rollout", stroke: "#1f77b4" }, { label: "update", stroke: "#ff7f0e" },
                                { label: "reward wait", stroke: "#d62728" },
                                { label: "images/s", stroke: "#7f7f7f", scale: "ips" }]);
  makeChart("chart-producers", [{ label: "batches/s", stroke: "#17becf" }]);
  makeChart("chart-alive", [{ label: "producers", stroke: "#7f7f7f" }]);
  makeChart("chart-coord-calls", [{ label: "lease", stroke: "#17becf" }, { label: "locate", stroke: "#1f77b4" },
                                  { label: "ack", stroke: "#2ca02c" }, { label: "register", stroke: "#d62728" }]);
  makeChart("chart-coord-load", [{ label: "lock busy", stroke: "#d62728" }, { label: "CPU", stroke: "#8c564b" },
                                 { label: "headroom", stroke: "#2ca02c", scale: "times" },
                                 { label: "pending", stroke: "#7f7f7f", scale: "times" }], { y: { range: [0, 1] } });
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
}

function fmt(v, digits) {
  return v === null || v === undefined ? "n/a" : Number(v).toFixed(digits);
}

// The held-out loss and the OCR word accuracy on one step axis (either may lack a step).
function evalColumns(e) {
  const steps = [...new Set(e.loss.step.concat(e.text.step))].sort((a, b) => a - b);
  const at = (xs, ys) => steps.map(s => { const i = xs.indexOf(s); return i < 0 ? null : ys[i]; });
  return [steps, at(e.loss.step, e.loss.eval_loss), at(e.text.step, e.text.word_accuracy)];
}

// GRPO's figures (consumer/grpo_objective.py), drawn only once a step reported them. The reward
// wait is reward_wait_s where the objective reports it, else the reward's own time (reward_s);
// images/s is a step's images over its rollout + update + reward wait (a step that reused the
// previous rollout rolled out no images: no point).
function grpoColumns(o) {
  const nulls = o.time.map(() => null);
  const col = (name) => o[name] || nulls;
  const mean = col("reward_mean"), std = col("reward_std");
  const band = (sign) => mean.map((m, i) => (m === null || std[i] === null ? null : m + sign * std[i]));
  const rollout = col("rollout_s"), update = col("update_s"), wait = o.reward_wait_s ? o.reward_wait_s : col("reward_s");
  const images = col("images");
  const perSecond = images.map((n, i) => {
    const s = (rollout[i] || 0) + (update[i] || 0) + (wait[i] || 0);
    return n && s > 0 ? n / s : null;
  });
  return { reward: [o.time, mean, band(-1), band(1)], time: [o.time, rollout, update, wait, perSecond] };
}

function wallLine(w) {
  const n = w.time.length;
  if (!n || w.steps[n - 1] === null) return "wall time: n/a";
  const pct = (v) => `${fmt(100 * v, 0)}%`;
  return `in steps ${pct(w.steps[n - 1])} (data wait ${pct(w.data_wait[n - 1])}, checkpoints ` +
    `${pct(w.checkpoint_stall[n - 1])}, evaluation ${pct(w.eval_stall[n - 1])})`;
}

async function refresh() {
  try {
    const [series, run] = await Promise.all([fetch("/api/series").then(r => r.json()),
                                             fetch("/api/run").then(r => r.json())]);
    versions = run.history;
    const t = series.trainer;
    setData("chart-loss", [t.time, t.loss]);
    setData("chart-throughput", [t.time, t.samples_per_second]);
    setData("chart-flops", [t.time, t.tflops_per_device, t.mfu]);
    setData("chart-wait", [t.time, t.data_wait_fraction]);
    const w = series.wall;
    setData("chart-walltime", [w.time, w.steps, w.data_wait, w.checkpoint_stall, w.eval_stall]);
    setData("chart-evals", evalColumns(series.evaluations));
    const o = series.objective || { time: [] };
    setData("chart-objective", [o.time, o.reward_margin || o.time.map(() => null),
                                o.preference_accuracy || o.time.map(() => null)]);
    const grpo = Boolean(o.reward_mean);
    for (const id of ["grpo-reward", "grpo-time"]) {
      const panel = document.getElementById(`panel-${id}`), el = document.getElementById(`chart-${id}`);
      if (grpo && panel.hidden) {  // made while hidden (no width): fit the panel once it shows
        panel.hidden = false;
        charts[`chart-${id}`].setSize({ width: Math.max(320, el.clientWidth || 540), height: 200 });
      }
      panel.hidden = !grpo;
    }
    if (grpo) {
      const g = grpoColumns(o);
      setData("chart-grpo-reward", g.reward);
      setData("chart-grpo-time", g.time);
    }
    const p = series.producers;
    setData("chart-producers", [p.time, p.batches_per_second]);
    setData("chart-alive", [p.time, p.producers_alive]);
    const c = series.coordinator;
    setData("chart-coord-calls", [c.time, c.lease_per_second, c.locate_per_second, c.ack_per_second,
                                  c.register_per_second]);
    setData("chart-coord-load", [c.time, c.lock_busy_fraction, c.cpu_fraction, c.headroom, c.pending]);
    const n = t.step.length;
    document.getElementById("summary").textContent = n
      ? `step ${t.step[n - 1]} | loss ${fmt(t.loss[n - 1], 4)} | ${fmt(t.samples_per_second[n - 1], 2)} samples/s | ` +
        `${fmt(t.tflops_per_device[n - 1], 3)} TFLOP/s/dev | MFU ${t.mfu[n - 1] === null ? "n/a" : fmt(100 * t.mfu[n - 1], 1) + "%"} | ` +
        `data wait ${fmt(100 * t.data_wait_fraction[n - 1], 1)}% | ${wallLine(w)} | config v${run.config_version} | ` +
        `${run.producers_alive} producers`
      : "waiting for the first training step...";
    const vt = document.getElementById("versions");
    vt.innerHTML = "<tr><th>version</th><th>from step</th><th>changes</th><th>why</th></tr>";
    for (const v of run.history) {
      const r = vt.insertRow();
      cell(r, v.version); cell(r, v.from_step); cell(r, JSON.stringify(v.changes)); cell(r, v.why);
    }
    const pt = document.getElementById("processes");
    pt.innerHTML = "<tr><th>role</th><th>name</th><th>pid</th><th>state</th></tr>";
    for (const proc of run.processes) {
      const r = pt.insertRow();
      cell(r, proc.role); cell(r, proc.name); cell(r, proc.pid ?? "");
      cell(r, proc.alive ? "alive" : `exited ${proc.returncode ?? ""}`, proc.alive ? "" : "dead");
    }
    const samples = document.getElementById("samples");
    if (run.samples.length) {
      samples.innerHTML = "";
      for (const src of run.samples) {
        const img = document.createElement("img");
        img.src = src;
        img.title = src;
        samples.appendChild(img);
      }
    }
  } catch (err) {
    document.getElementById("summary").textContent = "the coordinator does not answer: " + err;
  }
}

window.mmditCharts = charts;
init();
refresh();
setInterval(refresh, 2000);
