// The webpeft worker: every wasm and GPU call of a session (pkg/session.js) runs here, off the
// page's main thread, so the page stays responsive while a model loads or trains. Model files
// are downloaded (and cached) here too, so their bytes never pass through the page.
//
// Protocol (structured clone; large buffers are transferred, not copied):
//   page → worker  {id, op, target, args}   a call; `target` is a model handle or absent
//                  {cancel: id}             cancel call `id` (an AbortSignal fired)
//                  {pause: id} {resume: id} pause / resume training call `id`
//   worker → page  {id, event, data}        progress of call `id` (progress, step, paused, ...)
//                  {id, ok: true, value} | {id, ok: false, error: {name, code, message}}
//                  {deviceLost: {reason, message}}   the GPU device was lost: this worker is
//                                           done; the page starts a new one (pkg/session.js)
import { init, Model, TaskModel, parseData, parseLabeled, clearCache } from './index.js';
import { filesFromUrl, adapterFilesFromUrl, abortError, buffersOf } from './files.js';
import { beginRun, saveCheckpoint, finishRun, listRuns, loadRun, deleteRun } from './store.js';

const objects = new Map(); // handle → Model | TaskModel
const sources = new Map(); // handle → the model's URL (kept in a saved run's record), or null
let nextHandle = 1;
const calls = new Map(); // id → {cancelled, controller, model, resume: () => void, waiting}

const post = (msg, transfer = []) => self.postMessage(msg, transfer);
const event = (id, name, data, transfer) => post({ id, event: name, data }, transfer);

// The GPU devices the wasm module acquires: WebGPU's requestDevice is wrapped before the module
// starts, so that a lost device (a driver reset, the browser reclaiming the GPU, or
// `device.destroy()`) is seen here. The worker then stops every call and reports the loss; its
// wasm module is no longer usable, so the page replaces the worker, reloads the models and
// resumes kept training runs from their checkpoints. Nothing computed after the loss is saved.
const devices = [];
let lostDevice = null; // {reason, message} once a device is lost
let destroyed = false; // set as the device is destroyed, before the loss is reported
let loseAtStep = null; // testing aid (simulateDeviceLoss): destroy the device when this step is reported
let onLost;
const deviceLost = new Promise((resolve) => { onLost = resolve; });
if (typeof GPUAdapter !== 'undefined') {
  const requestDevice = GPUAdapter.prototype.requestDevice;
  GPUAdapter.prototype.requestDevice = async function (...args) {
    const device = await requestDevice.apply(this, args);
    devices.push(device);
    device.lost.then((info) => {
      if (lostDevice) return;
      lostDevice = { reason: info?.reason ?? 'unknown', message: info?.message ?? '' };
      post({ deviceLost: lostDevice });
      for (const c of calls.values()) {
        c.cancelled = true;
        c.controller?.abort();
        c.waiting?.reject(abortError());
      }
      onLost();
    });
    return device;
  };
}
const destroyDevices = () => { destroyed = true; devices.forEach((d) => d.destroy()); };
/** Whether the device is gone (or going): nothing computed from here on is reported or saved. */
const deviceGone = () => lostDevice !== null || destroyed;

async function modelFiles(source, call, id, { cache } = {}) {
  if (typeof source !== 'string') return source;
  call.controller = new AbortController();
  return filesFromUrl(source, { cache, signal: call.controller.signal, onProgress: (p) => event(id, 'progress', p) });
}

function checkCancelled(call) {
  if (call.cancelled) throw abortError();
}

/** Names of the adapters a training call trains. */
const trainedNames = (method, data, options) => (method === 'trainTasks' ? Object.keys(data) : [options.adapter ?? 'default'].flat());

/**
 * A training call that can pause: on pause the wasm run stops after its step with a
 * checkpoint; on resume it continues from that checkpoint, to the byte. Cancelling stops it at
 * the next step boundary (what was trained so far stays in the adapter). With `persist` (a run
 * id), the run and each checkpoint are kept in OPFS (pkg/store.js) to resume after a reload.
 *
 * A kept checkpoint is written while training stands still: OPFS calls complete only when the
 * worker's event loop runs, which during training is about once per step, so a save that
 * overlapped training would take many steps. Every `checkpointEvery` steps the worker pauses
 * the run itself (it stops after the next step with a checkpoint), writes that checkpoint, and
 * goes on from it: the same run to the byte, as a user's pause and resume.
 */
async function trainRun(model, method, data, options, call, id, persist, fresh = true) {
  const reports = [];
  let resume = options.resume;
  let seconds = 0;
  let saving = Promise.resolve();
  let every = 0;
  if (persist) {
    every = options.checkpointEvery ?? 10;
    // The wasm run hands out only the last step's checkpoint; the others come from the pauses.
    options = { ...options, checkpointEvery: 1e9 };
    if (fresh) {
      const names = trainedNames(method, data, options);
      const configs = {};
      for (const n of names) configs[n] = (await model.saveAdapter(n))['adapter_config.json'];
      const { resume: _, ...kept } = options;
      await beginRun(persist, { method, model: sources.get(call.handle) ?? null, adapter: names, configs, data, options: kept });
    }
  }
  const keep = (step, totalSteps, files) => {
    if (deviceGone()) return;
    saving = saving.then(() => saveCheckpoint(persist, { step, totalSteps, files })).catch((e) => {
      console.warn(e.message);
      event(id, 'warning', { message: e.message });
    });
  };
  let autoPause = false;
  for (;;) {
    const part = await model[method](data, resume ? { ...options, resume } : options, (r) => {
      if (deviceGone()) return false;
      const { checkpoint, ...report } = r;
      seconds += r.seconds;
      report.etaSeconds = Math.max(0, r.totalSteps - r.step) * (seconds / (reports.length + 1));
      if (checkpoint) {
        call.checkpoint = checkpoint;
        // A copy (not transferred): the worker keeps this one to resume from.
        event(id, 'checkpoint', { step: r.step, files: checkpoint });
        if (persist) keep(r.step, r.totalSteps, checkpoint);
      }
      reports.push(report);
      event(id, 'step', report);
      // (A user's pause that came while no wasm run was going is passed on here.)
      if (!r.paused && (call.userPause || (every && r.step % every === 0))) {
        if (!call.userPause) autoPause = true;
        model.requestPause();
      }
      if (loseAtStep !== null && r.step >= loseAtStep) {
        loseAtStep = null;
        destroyDevices();
      }
      return !call.cancelled;
    });
    await saving;
    checkCancelled(call);
    const last = part.at(-1);
    if (!last?.paused) {
      if (persist) await finishRun(persist);
      return reports;
    }
    resume = call.checkpoint;
    if (autoPause && !call.userPause) {
      autoPause = false;
      continue;
    }
    autoPause = false;
    call.userPause = false;
    event(id, 'paused', { step: last.step });
    await new Promise((resolve, reject) => { call.waiting = { resolve, reject }; });
    call.waiting = null;
    event(id, 'resumed', { step: last.step });
  }
}

const ops = {
  async init(_call, _id, options) { return init(options); },
  async parseData(_call, _id, name, text) { return parseData(name, text); },
  async parseLabeled(_call, _id, name, text) { return parseLabeled(name, text); },
  async clearCache() { return clearCache(); },
  async loadModel(call, id, source, options = {}) {
    await init();
    const files = await modelFiles(source, call, id, options);
    checkCancelled(call);
    const m = await Model.load(files, { timeoutMs: options.timeoutMs, base: options.base, attention: options.attention });
    const handle = nextHandle++;
    objects.set(handle, m);
    sources.set(handle, typeof source === 'string' ? source : null);
    return { handle, info: m.info() };
  },
  async loadTaskModel(call, id, source, options = {}) {
    await init();
    const files = await modelFiles(source, call, id, options);
    checkCancelled(call);
    const m = await TaskModel.load(files, { task: options.task, timeoutMs: options.timeoutMs });
    const handle = nextHandle++;
    objects.set(handle, m);
    return { handle, info: m.info() };
  },
  dispose(_call, _id, handle) { sources.delete(handle); return objects.delete(handle); },
  savedRuns() { return listRuns(); },
  /**
   * Testing aid: lose the GPU device as a driver reset would (`device.destroy()`), now or, with
   * `atStep`, when a training run reports that step.
   */
  simulateDeviceLoss(_call, _id, { atStep } = {}) {
    if (atStep === undefined) destroyDevices();
    else loseAtStep = atStep;
    return true;
  },
  deleteRun(_call, _id, runId) { return deleteRun(runId); },
};

/** Continue a run kept in OPFS from its last checkpoint (re-creating its adapters if needed). */
async function resumeRun(m, call, id, runId) {
  const { run, latest, files } = await loadRun(runId);
  if (latest.done) throw Object.assign(new Error(`webpeft: run ${runId} has finished; nothing to resume`), { code: 'config' });
  const have = new Set(m.adapters().map((a) => a.name));
  for (const n of run.adapter) if (!have.has(n)) await m.addAdapter(n, run.configs[n]);
  return trainRun(m, run.method, run.data, { ...run.options, resume: files }, call, id, runId, false);
}

// Calls on a model whose last argument is a callback: the worker passes its own, which posts
// events (and returns false once the call is cancelled, which stops the wasm loop).
const withEvents = {
  generate: (m, call, id, [prompt, options = {}]) =>
    m.generate(prompt, { ...options, onToken: (tok, text) => { event(id, 'token', { id: tok, text }); return !call.cancelled; } }),
  loadAdapter: async (m, call, id, [name, source, options = {}]) => {
    if (typeof source !== 'string') return m.loadAdapter(name, source);
    call.controller = new AbortController();
    const files = await adapterFilesFromUrl(source, { cache: options.cache, signal: call.controller.signal, onProgress: (p) => event(id, 'progress', p) });
    checkCancelled(call);
    return m.loadAdapter(name, files);
  },
  train: (m, call, id, [examples, options = {}, persist]) => trainRun(m, 'train', examples, options, call, id, persist),
  trainTasks: (m, call, id, [tasks, options = {}, persist]) => trainRun(m, 'trainTasks', tasks, options, call, id, persist),
  resumeRun: (m, call, id, [runId]) => resumeRun(m, call, id, runId),
  trainClassifier: (m, call, id, [rows, options]) => m.trainClassifier(rows, options, (e) => { event(id, 'epoch', e); return !call.cancelled; }),
  trainImageClassifier: (m, call, id, [rows, options]) => m.trainImageClassifier(rows, options, (e) => { event(id, 'epoch', e); return !call.cancelled; }),
  trainEmbeddings: (m, call, id, [pairs, options]) => m.trainEmbeddings(pairs, options, (s) => { event(id, 'step', s); return !call.cancelled; }),
};

async function run(msg) {
  const { id, op, target, args = [] } = msg;
  const call = { cancelled: false };
  calls.set(id, call);
  try {
    let value;
    if (target === undefined) {
      if (!ops[op]) throw Object.assign(new Error(`webpeft worker: unknown call ${op}`), { code: 'config' });
      value = await ops[op](call, id, ...args);
    } else {
      const m = objects.get(target);
      if (!m) throw Object.assign(new Error('webpeft: this model was disposed'), { code: 'config' });
      call.model = m;
      call.handle = target;
      if (withEvents[op]) value = await withEvents[op](m, call, id, args);
      else if (typeof m[op] === 'function' && !op.startsWith('_')) value = await m[op](...args);
      else throw Object.assign(new Error(`webpeft worker: unknown call ${op}`), { code: 'config' });
    }
    if (call.cancelled && value?.handle !== undefined) objects.delete(value.handle); // loaded, but no longer wanted
    checkCancelled(call);
    post({ id, ok: true, value }, buffersOf(value));
  } catch (e) {
    // A failure caused by a lost device is not reported as such: the loss is (the page recovers).
    if (!lostDevice && devices.length) await Promise.race([deviceLost, new Promise((r) => setTimeout(r, 100))]);
    if (lostDevice) return;
    const error = { name: e?.name ?? 'Error', code: e?.code ?? (call.cancelled ? 'aborted' : 'internal'), message: e?.message ?? String(e) };
    if (call.cancelled) Object.assign(error, { name: 'AbortError', code: 'aborted' });
    post({ id, ok: false, error });
  } finally {
    calls.delete(id);
  }
}

self.onmessage = ({ data: msg }) => {
  if (msg.cancel !== undefined) {
    const call = calls.get(msg.cancel);
    if (!call) return;
    call.cancelled = true;
    call.controller?.abort();
    call.waiting?.reject(abortError());
  } else if (msg.pause !== undefined) {
    const call = calls.get(msg.pause);
    if (call) call.userPause = true;
    call?.model?.requestPause();
  } else if (msg.resume !== undefined) {
    calls.get(msg.resume)?.waiting?.resolve();
  } else {
    run(msg);
  }
};
