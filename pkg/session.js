// The main-thread API: a session is a dedicated Web Worker (pkg/worker.js) that holds the wasm
// module, the GPU device and the loaded models; every call is a message, answered by a promise,
// with its progress as callbacks. The page never blocks on the GPU. Buffers passed in (model
// files, adapter files) are transferred to the worker, not copied: the caller's copies are
// detached afterwards.

import { abortError, buffersOf } from './files.js';

/** The error of a call that was in flight when the GPU device was lost. */
function deviceLostError({ reason, message }) {
  return Object.assign(new Error(`webpeft: the GPU device was lost (${reason}${message ? `: ${message}` : ''})`), { code: 'device' });
}

function toError(e) {
  return Object.assign(new Error(e.message), { name: e.name === 'AbortError' ? 'AbortError' : 'Error', code: e.code });
}

/** A training call in progress: a promise of its step reports that can pause and resume. */
export class TrainRun {
  #session; #id; #promise; #state = 'running'; #onPaused = []; #lastCheckpoint = null; #pausedAt = null;
  constructor(session, id, promise) {
    this.#session = session;
    this.#id = id;
    this.#promise = promise.finally(() => {
      this.#state = 'done';
      this.#onPaused.splice(0).forEach((f) => f(null));
    });
    this.#promise.catch(() => { this.#state = 'failed'; });
  }

  /** 'running' | 'pausing' | 'paused' | 'done' | 'failed' */
  get state() { return this.#state; }

  /** The last checkpoint's files (every `checkpointEvery` steps and at a pause), or null. */
  get checkpoint() { return this.#lastCheckpoint; }

  /**
   * Stop after the current step, keeping the run's state (a checkpoint); resolves to the step
   * it paused after (null if the run ended first).
   */
  pause() {
    if (this.#state !== 'running') return Promise.resolve(this.#state === 'paused' ? this.#pausedAt : null);
    this.#state = 'pausing';
    this.#session._post({ pause: this.#id });
    return new Promise((resolve) => this.#onPaused.push(resolve));
  }

  /** Continue a paused run from its checkpoint; the result is the uninterrupted run's. */
  resume() {
    if (this.#state !== 'paused') return false;
    this.#state = 'running';
    this.#session._post({ resume: this.#id });
    return true;
  }

  _event(name, data) {
    if (name === 'checkpoint') this.#lastCheckpoint = data.files;
    if (name === 'paused') {
      this.#state = 'paused';
      this.#pausedAt = data.step;
      this.#onPaused.splice(0).forEach((f) => f(data.step));
    }
  }

  then(a, b) { return this.#promise.then(a, b); }
  catch(b) { return this.#promise.catch(b); }
  finally(f) { return this.#promise.finally(f); }
}

/** A model loaded in the session's worker; the methods mirror `Model` of the direct API. */
export class RemoteModel {
  #session; #handle; #info;
  constructor(session, handle, info) { this.#session = session; this.#handle = handle; this.#info = info; }
  #call(op, args, options) { return this.#session._call(op, args, { ...options, model: this }); }
  get _handle() { return this.#handle; }
  set _handle(h) { this.#handle = h; }

  /** `{modelType, vocabSize, hiddenSize, layers, parameters, device}` */
  info() { return this.#info; }
  tokenize(text) { return this.#call('tokenize', [text]); }
  addAdapter(name, config, options) { return this.#call('addAdapter', [name, config, options]); }
  /**
   * Load a PEFT adapter: files (as for `Model.loadAdapter`, or one .zip; buffers are
   * transferred), or a URL of a PEFT folder or .zip, downloaded in the worker with
   * `onProgress`, `signal` and `cache` as `loadModel`.
   */
  loadAdapter(name, source, { onProgress, signal, cache } = {}) {
    if (typeof source === 'string') {
      return this.#call('loadAdapter', [name, resolveUrl(source), { cache }], { signal, onEvent: (n, d) => n === 'progress' && onProgress?.(d) });
    }
    const files = Array.isArray(source) || (typeof FileList !== 'undefined' && source instanceof FileList) ? Object.fromEntries(Array.from(source, (f) => [f.name, f])) : source;
    return this.#call('loadAdapter', [name, files], { signal, transfer: buffersOf(files) });
  }
  saveAdapter(name) { return this.#call('saveAdapter', [name]); }
  /** The adapter as one zip (Uint8Array), as `Model.saveAdapterZip`. */
  saveAdapterZip(name) { return this.#call('saveAdapterZip', [name]); }
  /** What a run would take before starting it, as `Model.estimate`. */
  estimate(config, options, { probe } = {}) { return this.#call('estimate', [config, options, { probe }]); }
  /** What training sees of `examples`, as `Model.preview`. */
  preview(examples, options) { return this.#call('preview', [examples, options]); }
  adapters() { return this.#call('adapters', []); }
  deleteAdapter(name) { return this.#call('deleteAdapter', [name]); }
  logits(ids, adapter) { return this.#call('logits', [Array.from(ids), adapter]); }
  logitsPerRow(rows, adapters) { return this.#call('logitsPerRow', [rows.map((r) => Array.from(r)), adapters]); }
  addWeightedAdapter(name, adapters, weights, options) { return this.#call('addWeightedAdapter', [name, adapters, weights, options]); }
  mergeAdapter(name) { return this.#call('mergeAdapter', [name]); }
  unmergeAdapter(name) { return this.#call('unmergeAdapter', [name]); }
  exportModel() { return this.#call('exportModel', []); }

  /**
   * Generate text; `onToken(id, text)` streams each token, `signal` cancels (the promise then
   * rejects with an AbortError). Other options as `Model.generate`.
   */
  generate(prompt, { onToken, signal, ...options } = {}) {
    return this.#call('generate', [prompt, options], { signal, onEvent: (n, d) => n === 'token' && onToken?.(d.id, d.text) });
  }

  /**
   * Train (options as `Model.train`). Returns a TrainRun: a promise of the step reports with
   * `pause()` / `resume()`. `onStep(report)` gets each report (with `etaSeconds`), `onEval`
   * each validation result (`{step, loss, targets}`, with `validation` / `validationData`),
   * `onCheckpoint({step, files})` each checkpoint, `signal` cancels at the next step boundary
   * (what was trained so far stays in the adapter; the promise rejects with an AbortError).
   * `persist` (a run id) keeps the run and its checkpoints (every `checkpointEvery` steps,
   * default 10, at a pause and at the end) in the origin-private file system: after a reload or
   * a crash, `session.savedRuns()` lists it and `resumeRun(id)` continues it.
   */
  train(examples, options = {}, { onStep, onEval, onCheckpoint, onWarning, signal, persist } = {}) {
    return this.#session._run('train', [examples, options, persist], this, { onStep, onEval, onCheckpoint, onWarning, signal, persist });
  }

  /** Multi-task training (as `Model.trainTasks`), with the controls of `train`. */
  trainTasks(tasks, options = {}, { onStep, onCheckpoint, onWarning, signal, persist } = {}) {
    return this.#session._run('trainTasks', [tasks, options, persist], this, { onStep, onCheckpoint, onWarning, signal, persist });
  }

  /**
   * Continue a run kept with `persist` from its last checkpoint (its adapters are re-created
   * if this model lacks them); the result is the uninterrupted run's, to the byte.
   */
  resumeRun(id, { onStep, onEval, onCheckpoint, onWarning, signal } = {}) {
    return this.#session._run('resumeRun', [id], this, { onStep, onEval, onCheckpoint, onWarning, signal, persist: id });
  }

  /** Free the model in the worker. */
  dispose() { this.#session._forget(this); return this.#session._call('dispose', [this._handle]); }
}

/** A task model (classifier / embeddings) in the worker; methods mirror `TaskModel`. */
export class RemoteTaskModel {
  #session; #handle; #info;
  constructor(session, handle, info) { this.#session = session; this.#handle = handle; this.#info = info; }
  #call(op, args, options) { return this.#session._call(op, args, { ...options, model: this }); }
  get _handle() { return this.#handle; }
  set _handle(h) { this.#handle = h; }
  info() { return this.#info; }
  addLora(config, options) { return this.#call('addLora', [config, options]); }
  addBitFit() { return this.#call('addBitFit', []); }
  loadAdapter(files) { return this.#call('loadAdapter', [files], { transfer: buffersOf(files) }); }
  saveAdapter() { return this.#call('saveAdapter', []); }
  predict(texts, options) { return this.#call('predict', [texts, options]); }
  predictImages(images, options) { return this.#call('predictImages', [images, options]); }
  embed(texts, options) { return this.#call('embed', [texts, options]); }
  /** `onEpoch(report)` per epoch, `signal` cancels at the next step. */
  trainClassifier(rows, options, { onEpoch, signal } = {}) {
    return this.#call('trainClassifier', [rows, options], { signal, onEvent: (n, d) => n === 'epoch' && onEpoch?.(d) });
  }
  trainImageClassifier(rows, options, { onEpoch, signal } = {}) {
    return this.#call('trainImageClassifier', [rows, options], { signal, onEvent: (n, d) => n === 'epoch' && onEpoch?.(d) });
  }
  trainEmbeddings(pairs, options, { onStep, signal } = {}) {
    return this.#call('trainEmbeddings', [pairs, options], { signal, onEvent: (n, d) => n === 'step' && onStep?.(d) });
  }
  dispose() { this.#session._forget(this); return this.#session._call('dispose', [this._handle]); }
}

const resolveUrl = (u) => (typeof location !== 'undefined' ? new URL(u, location.href).href : u);

/** Model files for the worker: a URL (downloaded there), or files (buffers transferred). */
async function sourceFor(source) {
  if (typeof source === 'string') return { source: resolveUrl(source), transfer: [] };
  const out = {};
  const entries = Array.isArray(source) || (typeof FileList !== 'undefined' && source instanceof FileList)
    ? Array.from(source, (f) => [f.name, f]) : Object.entries(source);
  for (const [k, v] of entries) out[k] = v; // Blobs / Files go as handles: no bytes are copied
  return { source: out, transfer: buffersOf(out) };
}

/** A session: one worker with the wasm module and the GPU device. Create with `createSession`. */
export class Session {
  #worker; #factory; #initOptions = {}; #next = 1; #calls = new Map(); #dead = null; #device = null;
  #models = new Map(); // RemoteModel | RemoteTaskModel → how it was loaded: {op, source, options}
  #recovering = null;
  #resuming = new Map(); // id → call: kept runs waiting for a new device to resume on
  #loseAgain = 0; // testing aid: devices of recovery workers to lose too (simulateDeviceLoss)
  constructor(worker, factory = null) {
    this.#factory = factory;
    this.#attach(worker);
  }

  #attach(worker) {
    this.#worker = worker;
    worker.onmessage = ({ data }) => this.#receive(data);
    worker.onerror = (e) => { e.preventDefault?.(); this.#fail(`the worker failed: ${e.message ?? 'unknown error'}`); };
    worker.onmessageerror = () => this.#fail('a message from the worker could not be read');
  }

  /**
   * The worker lost its GPU device. Its wasm module is done with, so a new worker takes over:
   * it acquires a device, the models loaded from URLs are loaded again (from the cache), and
   * each training run kept with `persist` resumes from its last checkpoint under the same
   * promise (its `onWarning` says so). Other calls in flight reject with code "device"; models
   * loaded from files, and adapters outside a kept run, went with the device.
   */
  #recover(info) {
    const lost = deviceLostError(info);
    const old = this.#worker;
    old.onmessage = old.onerror = old.onmessageerror = null;
    old.terminate();
    for (const [id, c] of this.#calls) {
      if (c.persist && c.model) this.#resuming.set(id, c);
      // A call of a recovery under way (its worker lost its device too) makes it start over.
      else { c.cleanup?.(); c.reject(c.internal ? Object.assign(new Error(lost.message), { lostAgain: true }) : lost); }
    }
    this.#calls.clear();
    if (!this.#factory) {
      this.#dead = Object.assign(new Error(`${lost.message}; this session was given its worker, so it cannot start another: create a new session`), { code: 'device' });
      for (const [, c] of this.#resuming) { c.cleanup?.(); c.reject(this.#dead); }
      this.#resuming.clear();
      return;
    }
    if (this.#recovering) return;
    this.#recovering = (async () => {
      for (let attempt = 1; ; attempt++) {
        try { return await this.#restart(lost); }
        catch (e) { if (!e.lostAgain || attempt >= 3) throw e; }
      }
    })().catch((e) => {
      const err = Object.assign(new Error(`${lost.message}; recovering failed: ${e.message}`), { code: e.code ?? 'device' });
      for (const [, c] of this.#resuming) { c.cleanup?.(); c.reject(err); }
      this.#resuming.clear();
      // Every new device was lost too: no worker is left, so this session ends here (calls
      // waiting for the recovery, and later ones, reject with this error instead of hanging).
      if (e.lostAgain) { this.#dead = err; this.#worker.terminate(); }
    }).finally(() => { this.#recovering = null; });
  }

  /** A new worker and device, the URL models loaded again, the kept runs resumed. */
  async #restart(lost) {
    this.#attach(this.#factory());
    this.#device = await this._call('init', [this.#initOptions], { internal: true });
    if (this.#loseAgain > 0) { this.#loseAgain--; await this._call('simulateDeviceLoss', [{}], { internal: true }); }
    for (const [m, how] of this.#models) {
      if (typeof how.source !== 'string') { m._handle = null; continue; }
      m._handle = (await this._call(how.op, [how.source, { ...how.options, cache: true }], { internal: true })).handle;
    }
    for (const [id, c] of this.#resuming) {
      if (c.model._handle === null) throw new Error('its model was loaded from files, which went with the device: load it again and call resumeRun');
    }
    for (const [id, c] of this.#resuming) {
      c.onEvent?.('warning', { message: `${lost.message}; a new device was acquired, the model reloaded and run ${c.persist} resumes from its last checkpoint` });
      this.#calls.set(id, c);
      this._post({ id, op: 'resumeRun', target: c.model._handle, args: [c.persist] });
    }
    this.#resuming.clear();
  }

  _forget(model) { this.#models.delete(model); }

  #fail(message) {
    this.#dead = Object.assign(new Error(`webpeft: ${message}`), { code: 'panic' });
    for (const c of this.#calls.values()) c.reject(this.#dead);
    this.#calls.clear();
  }

  #receive(msg) {
    if (msg.deviceLost) { this.#recover(msg.deviceLost); return; }
    const c = this.#calls.get(msg.id);
    if (!c) return;
    if (msg.event) { c.onEvent?.(msg.event, msg.data); return; }
    this.#calls.delete(msg.id);
    c.cleanup?.();
    if (msg.ok) c.resolve(msg.value);
    else c.reject(toError(msg.error));
  }

  _post(msg, transfer = []) { if (!this.#dead) this.#worker.postMessage(msg, transfer); }

  _call(op, args, options = {}) {
    // While a new worker takes over from one that lost its device, calls wait for it.
    if (this.#recovering && !options.internal) return this.#recovering.then(() => this._call(op, args, options));
    const { onEvent, signal, transfer = [], id = this.#next++, model, persist } = options;
    const target = model ? model._handle : options.target;
    if (this.#dead) return Promise.reject(this.#dead);
    if (target === null) return Promise.reject(Object.assign(new Error('webpeft: this model was loaded from files and went with the lost GPU device: load it again'), { code: 'device' }));
    if (signal?.aborted) return Promise.reject(abortError(signal));
    return new Promise((resolve, reject) => {
      const onAbort = () => this._post({ cancel: id });
      signal?.addEventListener('abort', onAbort, { once: true });
      const cleanup = () => signal?.removeEventListener('abort', onAbort);
      this.#calls.set(id, { resolve, reject, onEvent, cleanup, model, persist, internal: options.internal });
      this._post({ id, op, target, args }, transfer);
    });
  }

  _run(op, args, model, { onStep, onEval, onCheckpoint, onWarning, signal, persist }) {
    const id = this.#next++;
    let run = null;
    const seen = []; // a kept run's step reports, to give the whole run's when it resumed after a lost device
    const promise = this._call(op, args, {
      id, signal, model, persist,
      onEvent: (name, data) => {
        run?._event(name, data);
        if (name === 'step') {
          if (persist) seen.push(data);
          onStep?.(data);
          if (data.eval) onEval?.({ step: data.step, ...data.eval });
        }
        else if (name === 'checkpoint') onCheckpoint?.(data);
        else if (name === 'warning') (onWarning ?? console.warn)(data.message);
      },
    });
    // After a recovery the worker's answer holds the resumed steps only: the earlier ones come first.
    const whole = promise.then((reports) => {
      const first = reports[0]?.step ?? Infinity;
      return seen.length && seen[0].step < first ? [...seen.filter((r) => r.step < first), ...reports] : reports;
    });
    run = new TrainRun(this, id, whole);
    return run;
  }

  async _init(options) { this.#initOptions = options; this.#device = await this._call('init', [options]); return this; }

  /**
   * Testing aid: lose the worker's GPU device (`device.destroy()`, as a driver reset would), now
   * or, with `atStep`, when a training run reports that step. The session recovers as from a
   * real loss. With `again: n`, the devices of the next n workers that take over are lost too,
   * as soon as they are acquired (each recovery then starts over, three tries in all).
   */
  simulateDeviceLoss({ atStep, again = 0 } = {}) {
    this.#loseAgain = again;
    return this._call('simulateDeviceLoss', [{ atStep }]);
  }

  /** The GPU adapter the worker uses (from the self-check). */
  get device() { return this.#device; }

  /**
   * Load a model (a URL of a Hugging Face-layout folder or a .gguf file, or files the user
   * picked). options: {onProgress({file, loaded, total, cached}), signal, cache (default true),
   * timeoutMs}.
   */
  async loadModel(source, { onProgress, signal, cache, timeoutMs, base, attention } = {}) {
    const s = await sourceFor(source);
    const { handle, info } = await this._call('loadModel', [s.source, { cache, timeoutMs, base, attention }], { signal, transfer: s.transfer, onEvent: (n, d) => n === 'progress' && onProgress?.(d) });
    const m = new RemoteModel(this, handle, info);
    this.#models.set(m, { op: 'loadModel', source: s.source, options: { timeoutMs, base, attention } });
    return m;
  }

  /** Load a classifier / embedding model (`task`: 'classification' | 'embedding'), as `loadModel`. */
  async loadTaskModel(source, { task, onProgress, signal, cache, timeoutMs } = {}) {
    const s = await sourceFor(source);
    const { handle, info } = await this._call('loadTaskModel', [s.source, { task, cache, timeoutMs }], { signal, transfer: s.transfer, onEvent: (n, d) => n === 'progress' && onProgress?.(d) });
    const m = new RemoteTaskModel(this, handle, info);
    this.#models.set(m, { op: 'loadTaskModel', source: s.source, options: { task, timeoutMs } });
    return m;
  }

  /** Parse a data file (plain text, JSONL or CSV by the extension of `name`) into examples. */
  parseData(name, text) { return this._call('parseData', [name, text]); }

  /** Parse labelled rows for a classifier (CSV/TSV `text`,`label` columns or JSONL) into `[{text, label}]`. */
  parseLabeled(name, text) { return this._call('parseLabeled', [name, text]); }

  /** Runs kept with `persist`: `[{id, step, totalSteps, done, savedAt, adapter, model}]`, newest first. */
  savedRuns() { return this._call('savedRuns', []); }

  /** Forget a kept run. */
  deleteRun(id) { return this._call('deleteRun', [id]); }

  /** Remove every cached model file. */
  clearCache() { return this._call('clearCache', []); }

  /** Stop the worker: its models and GPU memory are freed; pending calls reject. */
  terminate() {
    this.#factory = null;
    this.#worker.terminate();
    this.#fail('the session was terminated');
  }
}

/**
 * Start a session: a dedicated worker with the wasm module and the WebGPU device. options:
 * {worker (a Worker running webpeft/worker, for bundlers that need to build it themselves),
 * wasmUrl, timeoutMs}. Rejects with `code: "device"` when WebGPU is unavailable.
 */
export async function createSession({ worker, wasmUrl, timeoutMs } = {}) {
  if (typeof Worker === 'undefined') throw Object.assign(new Error('webpeft: Web Workers are not available here'), { code: 'device' });
  const factory = typeof worker === 'function' ? worker : worker ? null : () => new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
  const session = new Session(factory ? factory() : worker, factory);
  try {
    return await session._init({ wasmUrl, timeoutMs });
  } catch (e) {
    session.terminate();
    throw e;
  }
}
