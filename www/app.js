// The webpeft demo app: load a model, paste text, train an adapter in a worker with a live loss
// chart, pause / resume / cancel, compare base and adapted generations, export / import the
// adapter. Runs are kept in OPFS, so a reload offers to resume where training stopped.
// `?model=URL` sets the default model; window.__app exposes the state to the browser test.
import { createSession } from '../pkg/index.js';
import uPlot from '../node_modules/uplot/dist/uPlot.esm.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
$('url').value = params.get('model') ?? '/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf';

const app = { state: 'starting', steps: [], losses: [], adapters: [], error: null, outputs: {} };
// The model answers one call at a time (a second one meanwhile is refused as busy): the
// preview and the estimate's probe take turns through this queue, and training waits for it.
let queue = Promise.resolve();
const exclusive = (f) => { const p = queue.then(f); queue = p.catch(() => {}); return p; };
window.__app = app;
let session = null;
let model = null;
let modelUrl = null;
let run = null;
let controller = null;
let counter = 0;

const log = (s) => { $('log').textContent += `${new Date().toLocaleTimeString()} ${s}\n`; $('log').scrollTop = 1e9; };
function status(id, text, state = 'idle') { $(id).textContent = text; $(id).dataset.state = state; }
const mb = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(1)} kB`);
const css = (name) => (name.startsWith('--') ? getComputedStyle(document.documentElement).getPropertyValue(name).trim() : getComputedStyle(document.body)[name]);
const fmtTime = (s) => (s >= 90 ? `${Math.round(s / 60)} min` : `${Math.round(s)} s`);

// ---- the loss chart
const chart = new uPlot({
  width: Math.min(860, $('chart').clientWidth || 860), height: 220,
  scales: { x: { time: false } },
  // Colours read at each draw, so the chart follows the light / dark scheme.
  axes: ['step', 'loss'].map((label) => ({ label, stroke: () => css('color'), grid: { stroke: () => css('--line') }, ticks: { stroke: () => css('--line') } })),
  series: [{ label: 'step' }, { label: 'loss', stroke: '#3f6ff0', width: 2, points: { show: true, size: 4 } },
    { label: 'validation loss', stroke: '#e0702a', width: 2, dash: [6, 4], spanGaps: true, points: { show: true, size: 6 } }],
}, [[], [], []], $('chart'));
matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => chart.redraw(false, true));
function plot() { chart.setData([app.steps.map((s) => s.step), app.steps.map((s) => s.loss), app.steps.map((s) => s.valLoss ?? null)]); }

// ---- UI state
function setBusy(kind) {
  app.state = kind;
  const training = kind === 'training' || kind === 'paused' || kind === 'pausing';
  $('load').disabled = training || kind === 'loading' || !session;
  $('train').disabled = !model || kind !== 'ready';
  $('pause').disabled = !(kind === 'training' || kind === 'paused');
  $('pause').textContent = kind === 'paused' ? 'Resume' : 'Pause';
  $('cancel').disabled = !training;
  $('gen').disabled = !model || kind !== 'ready';
  $('export').disabled = !model || kind !== 'ready' || !app.adapters.length;
  $('export-files').disabled = $('export').disabled;
  $('import-go').disabled = !model || kind !== 'ready';
}

function refreshAdapters(select) {
  const pick = $('adapter-pick');
  pick.replaceChildren(...app.adapters.map((n) => new Option(n, n)));
  if (select) pick.value = select;
  setBusy(app.state);
}

// ---- WebGPU and the worker
async function start() {
  if (!navigator.gpu) {
    $('nogpu').hidden = false;
    status('gpu', 'WebGPU: not available', 'error');
    app.state = 'no-webgpu';
    return;
  }
  try {
    session = await createSession();
    $('gpu').textContent = `WebGPU ready (${session.device.device}), in a worker`;
  } catch (e) {
    $('nogpu').hidden = false;
    $('gpu').textContent = `WebGPU unusable: ${e.message}`;
    app.state = 'no-webgpu';
    return;
  }
  setBusy('idle');
  await offerResume();
}

async function offerResume() {
  const open = (await session.savedRuns()).filter((r) => !r.done);
  if (!open.length) { $('resume').hidden = true; return; }
  const r = open[0];
  $('resume-text').textContent = `Training of “${r.adapter.join(', ')}” stopped at step ${r.step} of ${r.totalSteps} (${new Date(r.savedAt).toLocaleString()}). Nothing was lost.`;
  $('resume').hidden = false;
  $('resume').dataset.run = r.id;
  $('resume').dataset.model = r.model ?? '';
  app.resumable = r;
}

// ---- 1. the model
async function loadModel(source) {
  setBusy('loading');
  status('model-status', 'Loading…', 'busy');
  $('progress').replaceChildren();
  const rows = {};
  try {
    model?.dispose();
    model = null;
    app.adapters = [];
    refreshAdapters();
    model = await session.loadModel(source, {
      onProgress: ({ file, loaded, total, cached }) => {
        if (!rows[file]) {
          const li = document.createElement('li');
          li.innerHTML = '<span></span><progress max="1" value="0"></progress><span></span>';
          li.children[0].textContent = file;
          $('progress').append(li);
          rows[file] = li;
        }
        const li = rows[file];
        li.children[1].max = total || 1;
        li.children[1].value = total ? loaded : 0;
        li.children[2].textContent = cached ? `${mb(loaded)} (cached)` : `${mb(loaded)}${total ? ` / ${mb(total)}` : ''}`;
      },
    });
    modelUrl = typeof source === 'string' ? source : null;
    const i = model.info();
    app.info = i;
    status('model-status', `${i.modelType}: ${(i.parameters / 1e6).toFixed(1)} M parameters, ${i.layers} layers, hidden ${i.hiddenSize}, vocabulary ${i.vocabSize}; frozen weights ${i.base === 'f32' ? 'in f32' : `kept in ${i.base.toUpperCase()}`}, ${(i.baseBytes / 2 ** 20).toFixed(0)} MiB on the GPU.`, 'done');
    log(`loaded ${JSON.stringify(i)}`);
    setBusy('ready');
    estimate();
    preview();
  } catch (e) {
    app.error = e.message;
    status('model-status', `Could not load the model: ${e.message}`, 'error');
    log(`error (${e.code}): ${e.message}`);
    setBusy(model ? 'ready' : 'idle');
  }
}
$('load').onclick = () => loadModel($('url').value.trim());
$('url').onkeydown = (e) => { if (e.key === 'Enter' && !$('load').disabled) loadModel($('url').value.trim()); };
$('files').onchange = () => $('files').files.length && loadModel([...$('files').files]);
$('drop').onkeydown = (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); $('files').click(); } };
$('drop').ondragover = (e) => { e.preventDefault(); $('drop').classList.add('over'); };
$('drop').ondragleave = () => $('drop').classList.remove('over');
$('drop').ondrop = (e) => { e.preventDefault(); $('drop').classList.remove('over'); if (e.dataTransfer.files.length && session) loadModel([...e.dataTransfer.files]); };

// ---- 2. the data
const dataName = () => (/^\s*\{/.test($('data').value) ? 'pasted.jsonl' : 'pasted.txt');
async function examples() { return session.parseData(app.dataFile ?? dataName(), $('data').value); }
$('data-file').onchange = async () => {
  const f = $('data-file').files[0];
  if (!f) return;
  $('data').value = await f.text();
  app.dataFile = f.name;
  preview();
};
$('data').oninput = () => { app.dataFile = null; clearTimeout(app.previewTimer); app.previewTimer = setTimeout(preview, 400); };
async function preview() {
  if (!session) return;
  try {
    const ex = await examples();
    const box = $('preview-text');
    box.replaceChildren();
    if (model && app.state === 'ready') {
      // Exactly what training tokenises: the tokens, and which ones the loss counts.
      const m = model;
      for (const row of await exclusive(() => m.preview(ex, { seqLen: Number($('seq').value), limit: 3 }))) {
        for (let i = 0; i < row.ids.length; i++) {
          const span = document.createElement(row.trained[i] ? 'mark' : 'span');
          if (row.trained[i]) span.className = 'trained';
          span.textContent = row.pieces[i];
          span.title = `token ${row.ids[i]}`;
          box.append(span);
        }
        box.append(`\n  ${row.ids.length} tokens, ${row.trained.filter(Boolean).length} trained\n\n`);
      }
    } else {
      box.textContent = ex.slice(0, 3).map((e) => JSON.stringify(e)).join('\n') + `\n(${model ? 'the tokens show when the model is free' : 'load a model to see its tokens'})\n`;
    }
    if (ex.length > 3) box.append(`… and ${ex.length - 3} more`);
    status('data-status', `${ex.length} example${ex.length === 1 ? '' : 's'}`, 'done');
    app.examples = ex.length;
  } catch (e) {
    status('data-status', e.message, 'error');
    app.examples = 0;
  }
  estimate();
}

// ---- 3. training
function adapterConfig() {
  const r = Number($('rank').value);
  switch ($('method').value) {
    case 'lora-all': return { peft_type: 'LORA', r, lora_alpha: 2 * r, target_modules: 'all-linear' };
    case 'ia3': return { peft_type: 'IA3' };
    case 'prompt': return { peft_type: 'PROMPT_TUNING', num_virtual_tokens: 20 };
    default: return { peft_type: 'LORA', r, lora_alpha: 2 * r, target_modules: ['q_proj', 'v_proj'] };
  }
}
/** The validation share: held out from 5 examples on (fewer leave too little to train on). */
const validation = () => ((app.examples ?? 0) >= 5 ? Number($('val').value) || 0 : 0);
const trainOptions = () => ({ steps: Number($('steps').value), lr: Number($('lr').value), batch: Number($('batch').value), seqLen: Number($('seq').value), schedule: 'cosine', warmup: 2, checkpointEvery: Number($('every').value), ...(validation() > 0 ? { validation: validation(), evalEvery: Math.max(1, Math.round(Number($('steps').value) / 10)) } : {}) });

/**
 * Before training: the memory the run needs (the same plan training uses) and its time, from
 * a training step over one row measured on this GPU in the worker. Training waits for a running estimate.
 */
let estimateSeq = 0;
function estimate() {
  clearTimeout(app.estimateTimer);
  if (!model || app.state !== 'ready') return;
  app.estimateTimer = setTimeout(() => {
    const seq = ++estimateSeq;
    const o = trainOptions();
    $('estimate').textContent = 'Estimating memory and time on this GPU…';
    const m = model;
    app.estimating = exclusive(() => (seq === estimateSeq ? m.estimate(adapterConfig(), o, { probe: true }) : null)).then((e) => {
      if (!e) return;
      if (seq !== estimateSeq) return;
      app.estimate = e;
      const split = e.batch !== o.batch ? ` (as ${e.gradAccum} micro-batches of ${e.batch} to fit the GPU)` : '';
      $('estimate').textContent = `Estimate: ${(e.trainable / 1e3).toFixed(1)} k trainable values; ${mb(e.memory.total)} of GPU memory at batch ${o.batch} × ${o.seqLen} tokens${split}; about ${fmtTime(e.totalSeconds)} for ${o.steps} steps (${e.stepSeconds.toFixed(2)} s per step, from a training step over one row measured here: ${(e.rowSeconds * 1e3).toFixed(0)} ms).`;
    }).catch((err) => { if (seq === estimateSeq) $('estimate').textContent = `Cannot train with these settings: ${err.message}`; });
  }, 300);
}
for (const id of ['method', 'rank', 'batch', 'seq', 'steps']) $(id).addEventListener('input', estimate);

function onStep(r) {
  app.steps.push({ step: r.step, loss: r.loss, valLoss: r.eval?.loss, seconds: r.seconds });
  if (r.eval) app.valLosses = [...(app.valLosses ?? []), { step: r.step, loss: r.eval.loss }];
  app.losses.push(r.loss);
  plot();
  status('train-status', `step ${r.step} / ${r.totalSteps} · loss ${r.loss.toFixed(3)}${app.valLosses?.length ? ` · validation ${app.valLosses.at(-1).loss.toFixed(3)}` : ''} · lr ${r.lr.toExponential(1)} · ${r.tokensPerSecond.toFixed(0)} tokens/s · ${r.etaSeconds !== undefined ? `about ${fmtTime(r.etaSeconds)} left` : ''}${r.memoryInUse ? ` · GPU ${mb(r.memoryInUse)}` : ''}`, 'busy');
}

async function follow(name) {
  setBusy('training');
  try {
    await run;
    status('train-status', `Done: ${app.steps.length ? `loss ${app.steps[0].loss.toFixed(3)} → ${app.steps.at(-1).loss.toFixed(3)}` : ''}. Adapter “${name}” is ready.`, 'done');
    app.trained = name;
  } catch (e) {
    if (e.name === 'AbortError') status('train-status', `Cancelled after step ${app.steps.at(-1)?.step ?? 0}; “${name}” keeps what it learned.`, 'idle');
    else { status('train-status', `Training failed: ${e.message}`, 'error'); app.error = e.message; }
  }
  run = null;
  controller = null;
  refreshAdapters(name);
  setBusy('ready');
  $('resume').hidden = true;
}

$('train').onclick = async () => {
  let ex;
  try { ex = await examples(); } catch (e) { status('train-status', e.message, 'error'); return; }
  const name = `${$('method').value}-${Date.now().toString(36)}-${++counter}`;
  clearTimeout(app.estimateTimer);
  estimateSeq++;
  await queue; // a preview or the estimate's probe holds the model until it ends
  try {
    await model.addAdapter(name, adapterConfig(), { seed: 0 });
  } catch (e) { status('train-status', e.message, 'error'); return; }
  app.adapters.push(name);
  app.steps = [];
  app.losses = [];
  app.valLosses = [];
  plot();
  controller = new AbortController();
  status('train-status', 'Starting (the first step compiles the GPU kernels)…', 'busy');
  run = model.train(ex, { adapter: name, ...trainOptions() }, { onStep, signal: controller.signal, persist: name });
  follow(name);
};
$('pause').onclick = async () => {
  if (!run) return;
  if (run.state === 'paused') {
    run.resume();
    setBusy('training');
    status('train-status', 'Resuming…', 'busy');
    return;
  }
  setBusy('pausing');
  status('train-status', 'Pausing after this step…', 'busy');
  const at = await run.pause();
  if (at !== null) { setBusy('paused'); status('train-status', `Paused after step ${at} (saved).`, 'idle'); }
};
$('cancel').onclick = () => controller?.abort();
$('data').onkeydown = (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && !$('train').disabled) $('train').click(); };

$('resume-go').onclick = async () => {
  const id = $('resume').dataset.run;
  const url = $('resume').dataset.model;
  $('resume').hidden = true;
  if (!model || (url && url !== modelUrl)) {
    if (url) { $('url').value = url; await loadModel(url); }
    if (!model) { status('train-status', 'Load the model this run used, then resume.', 'error'); return; }
  }
  app.steps = [];
  app.losses = [];
  app.valLosses = [];
  plot();
  controller = new AbortController();
  status('train-status', `Resuming ${id}…`, 'busy');
  if (!app.adapters.includes(id)) app.adapters.push(id);
  run = model.resumeRun(id, { onStep, signal: controller.signal });
  follow(id);
};
$('resume-drop').onclick = async () => { await session.deleteRun($('resume').dataset.run); await offerResume(); };

// ---- 4. compare generations
$('gen').onclick = async () => {
  const prompt = $('prompt').value.replace(/\\n/g, '\n');
  setBusy('generating');
  app.outputs = {};
  try {
    for (const [pane, adapter] of [['out-base', undefined], ['out-tuned', $('adapter-pick').value || undefined]]) {
      $(pane).textContent = '';
      const text = await exclusive(() => model.generate(prompt, { adapter, maxNewTokens: 32, onToken: (_id, piece) => { $(pane).textContent += piece; } }));
      app.outputs[adapter ?? 'base'] = text;
    }
  } catch (e) { log(`error (${e.code}): ${e.message}`); app.error = e.message; }
  setBusy('ready');
};
$('prompt').onkeydown = (e) => { if (e.key === 'Enter' && !$('gen').disabled) $('gen').click(); };

// ---- 5. adapters out and in
function download(name, bytes) {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([bytes]));
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
$('export').onclick = async () => {
  const name = $('adapter-pick').value;
  const zip = await exclusive(() => model.saveAdapterZip(name));
  download(`${name}.zip`, zip);
  status('adapter-status', `Exported “${name}” as ${name}.zip (${mb(zip.length)}): unzip it for PeftModel.from_pretrained.`, 'done');
};
$('export-files').onclick = async () => {
  const name = $('adapter-pick').value;
  const files = await exclusive(() => model.saveAdapter(name));
  for (const [file, content] of Object.entries(files)) download(file, content);
  status('adapter-status', `Exported “${name}” (${Object.keys(files).join(', ')}).`, 'done');
};
async function importAdapter(source, what) {
  const name = `imported-${++counter}`;
  setBusy('importing');
  try {
    await exclusive(() => model.loadAdapter(name, source));
    app.adapters.push(name);
    refreshAdapters(name);
    status('adapter-status', `Imported “${name}” from ${what}.`, 'done');
  } catch (e) { status('adapter-status', `Could not import: ${e.message}`, 'error'); }
  setBusy('ready');
}
$('import-go').onclick = () => { const url = $('import-url').value.trim(); if (url) importAdapter(url, url); };
$('import-url').onkeydown = (e) => { if (e.key === 'Enter' && !$('import-go').disabled) $('import-go').click(); };
$('import').onchange = async () => {
  const picked = [...$('import').files];
  $('import').value = '';
  if (picked.length) await importAdapter(picked, picked.map((f) => f.name).join(', '));
};

start();
