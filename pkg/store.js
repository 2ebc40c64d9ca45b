// Training runs kept in the origin-private file system (OPFS), so that a reload, a closed tab
// or a crashed worker loses nothing: the run resumes from its last checkpoint, to the byte.
//
//   webpeft-runs/<id>/run.json       what the run is: model, adapter (name + config), examples, options
//   webpeft-runs/<id>/step-<N>/      a checkpoint's files (state.json with sizes and SHA-256s, tensors)
//   webpeft-runs/<id>/latest.json    {step, totalSteps, dir, done, savedAt}
//
// A checkpoint is written in full into a new step-<N>/ before latest.json names it; latest.json
// is written through createWritable, which commits on close (all or nothing). So a crash in the
// middle of a save leaves latest.json naming the previous, complete checkpoint. Older step
// folders are removed only after the switch.

const ROOT = 'webpeft-runs';
const enc = new TextEncoder();
const dec = new TextDecoder();

const storeError = (message) => Object.assign(new Error(`webpeft: run storage: ${message}`), { code: 'io' });

async function root() {
  if (typeof navigator === 'undefined' || !navigator.storage?.getDirectory) throw storeError('this browser has no origin-private file system');
  return (await navigator.storage.getDirectory()).getDirectoryHandle(ROOT, { create: true });
}

function checkId(id) {
  if (typeof id !== 'string' || !/^[\w.-]{1,100}$/.test(id)) throw Object.assign(new Error(`webpeft: run id ${JSON.stringify(id)}: use 1-100 letters, digits, '_', '-' or '.'`), { code: 'config' });
  return id;
}

async function writeFile(dir, name, bytes) {
  const f = await dir.getFileHandle(name, { create: true });
  const w = await f.createWritable();
  try {
    await w.write(typeof bytes === 'string' ? enc.encode(bytes) : bytes);
    await w.close();
  } catch (e) {
    await w.abort().catch(() => {});
    throw storeError(`writing ${name}: ${e.name === 'QuotaExceededError' ? 'the storage quota is full' : e.message}`);
  }
}

async function readFile(dir, name) {
  return new Uint8Array(await (await (await dir.getFileHandle(name)).getFile()).arrayBuffer());
}

const readJson = async (dir, name) => JSON.parse(dec.decode(await readFile(dir, name)));

/** Start (or restart) a run's record: everything needed to continue it in a fresh worker. */
export async function beginRun(id, run) {
  const top = await root();
  await top.removeEntry(checkId(id), { recursive: true }).catch(() => {}); // a new run under an old id
  const dir = await top.getDirectoryHandle(id, { create: true });
  await writeFile(dir, 'run.json', JSON.stringify({ ...run, startedAt: Date.now() }));
}

/** Keep a checkpoint of run `id` (atomically: see above). */
export async function saveCheckpoint(id, { step, totalSteps, files, done = false }) {
  const dir = await (await root()).getDirectoryHandle(checkId(id));
  const name = `step-${step}`;
  const sub = await dir.getDirectoryHandle(name, { create: true });
  for (const [f, bytes] of Object.entries(files)) await writeFile(sub, f, bytes);
  await writeFile(dir, 'latest.json', JSON.stringify({ step, totalSteps, dir: name, done, savedAt: Date.now() }));
  for await (const [entry, handle] of dir.entries()) {
    if (handle.kind === 'directory' && entry !== name) await dir.removeEntry(entry, { recursive: true }).catch(() => {});
  }
}

/** Mark run `id` finished (its last checkpoint stays, so the adapter can still be recovered). */
export async function finishRun(id) {
  const dir = await (await root()).getDirectoryHandle(checkId(id));
  let latest = null;
  try { latest = await readJson(dir, 'latest.json'); } catch { return; }
  await writeFile(dir, 'latest.json', JSON.stringify({ ...latest, done: true, savedAt: Date.now() }));
}

/** The kept runs: `[{id, step, totalSteps, done, savedAt, adapter, model}]` (runs without a checkpoint yet are left out). */
export async function listRuns() {
  const out = [];
  for await (const [id, dir] of (await root()).entries()) {
    if (dir.kind !== 'directory') continue;
    try {
      const [run, latest] = [await readJson(dir, 'run.json'), await readJson(dir, 'latest.json')];
      out.push({ id, step: latest.step, totalSteps: latest.totalSteps, done: latest.done, savedAt: latest.savedAt, adapter: run.adapter, model: run.model });
    } catch { /* no checkpoint yet, or not a run */ }
  }
  return out.sort((a, b) => b.savedAt - a.savedAt);
}

/** A run's record and its last checkpoint's files. */
export async function loadRun(id) {
  let dir;
  try { dir = await (await root()).getDirectoryHandle(checkId(id)); } catch { throw Object.assign(new Error(`webpeft: no saved run ${JSON.stringify(id)}`), { code: 'config' }); }
  let run, latest;
  try { [run, latest] = [await readJson(dir, 'run.json'), await readJson(dir, 'latest.json')]; } catch (e) { throw storeError(`run ${id} has no readable checkpoint (${e.message})`); }
  const sub = await dir.getDirectoryHandle(latest.dir);
  const files = {};
  for await (const [name, h] of sub.entries()) if (h.kind === 'file') files[name] = await readFile(sub, name);
  return { run, latest, files };
}

/** Forget run `id`. */
export async function deleteRun(id) {
  try { await (await root()).removeEntry(checkId(id), { recursive: true }); return true; } catch (e) { if (e.code === 'config') throw e; return false; }
}
