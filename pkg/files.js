// Model files from a URL: download with progress, and a cache of what was downloaded (Cache
// Storage, shared by the page and its workers) so a second visit loads without network. Each
// entry records its size and SHA-256; an entry that no longer matches (a browser that dropped
// part of it, a write cut short) is deleted and downloaded again, never used. Failing to cache
// (quota, a private window without storage) is a warning: the load itself goes on.

const CACHE = 'webpeft-models-v1';

const ioError = (message, extra = {}) => Object.assign(new Error(message), { code: 'io', ...extra });

function abortError(signal) {
  const reason = signal?.reason;
  if (reason instanceof Error && reason.name === 'AbortError') return Object.assign(reason, { code: 'aborted' });
  return Object.assign(new Error('webpeft: the call was cancelled'), { name: 'AbortError', code: 'aborted' });
}

async function sha256(bytes) {
  const d = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, '0')).join('');
}

async function openCache() {
  if (typeof caches === 'undefined') return null;
  try { return await caches.open(CACHE); } catch { return null; }
}

/** The cached bytes of `url`, or null (absent, or damaged: then the entry is removed). */
async function fromCache(cache, url) {
  const res = await cache.match(url);
  if (!res) return null;
  const size = Number(res.headers.get('x-webpeft-size'));
  const hash = res.headers.get('x-webpeft-sha256');
  let bytes = null;
  try { bytes = new Uint8Array(await res.arrayBuffer()); } catch { /* unreadable: damaged */ }
  if (bytes && bytes.length === size && hash && (await sha256(bytes)) === hash) return bytes;
  console.warn(`webpeft: the cached copy of ${url} is damaged (${bytes ? bytes.length : 'unreadable'} of ${size} bytes or a wrong SHA-256); downloading it again`);
  await cache.delete(url);
  return null;
}

async function toCache(cache, url, bytes) {
  try {
    const headers = { 'content-type': 'application/octet-stream', 'x-webpeft-size': String(bytes.length), 'x-webpeft-sha256': await sha256(bytes) };
    await cache.put(url, new Response(bytes, { headers }));
  } catch (e) {
    const why = e?.name === 'QuotaExceededError' ? 'the storage quota is full' : e?.message;
    console.warn(`webpeft: ${url} is not cached (${why}); the next load downloads it again`);
    await cache.delete(url).catch(() => {});
  }
}

async function download(url, file, onProgress, signal) {
  let res;
  try {
    res = await fetch(url, { signal });
  } catch (e) {
    if (signal?.aborted) throw abortError(signal);
    throw ioError(`${url}: network error (offline or blocked by CORS): ${e.message}`);
  }
  if (!res.ok) throw ioError(`${url}: HTTP ${res.status}`, { status: res.status });
  const total = Number(res.headers.get('content-length')) || 0;
  const chunks = [];
  let loaded = 0;
  try {
    if (!res.body) {
      chunks.push(new Uint8Array(await res.arrayBuffer()));
      loaded = chunks[0].length;
    } else {
      const reader = res.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value);
        loaded += value.length;
        onProgress?.({ file, loaded, total, cached: false });
      }
    }
  } catch (e) {
    if (signal?.aborted) throw abortError(signal);
    throw ioError(`${url}: the download broke off after ${loaded} bytes: ${e.message}`);
  }
  if (total && loaded !== total) throw ioError(`${url}: truncated download (${loaded} of ${total} bytes)`);
  const out = chunks.length === 1 ? chunks[0] : new Uint8Array(loaded);
  if (chunks.length !== 1) {
    let off = 0;
    for (const c of chunks) { out.set(c, off); off += c.length; }
  }
  onProgress?.({ file, loaded, total: loaded, cached: false });
  return out;
}

/**
 * The bytes of one file: from the cache when `cache` (default true) and a sound copy is there,
 * else downloaded (then cached). `onProgress({file, loaded, total, cached})`.
 */
export async function fetchFile(url, file, { onProgress, signal, cache = true } = {}) {
  if (signal?.aborted) throw abortError(signal);
  const store = cache ? await openCache() : null;
  if (store) {
    const hit = await fromCache(store, url);
    if (hit) {
      onProgress?.({ file, loaded: hit.length, total: hit.length, cached: true });
      return hit;
    }
  }
  const bytes = await download(url, file, onProgress, signal);
  if (store) await toCache(store, url, bytes);
  return bytes;
}

const isMissing = (e) => e?.status === 404;

/**
 * The files of a model at `url`: a .gguf file, or a Hugging Face-layout folder (config.json,
 * tokenizer.json or preprocessor_config.json, model.safetensors or its shards).
 */
export async function filesFromUrl(url, options = {}) {
  if (/\.gguf(\?|$)/.test(url)) {
    const name = url.split('?')[0].split('/').pop();
    return { [name]: await fetchFile(url, name, options) };
  }
  const base = url.endsWith('/') ? url : `${url}/`;
  const get = (f, o = options) => fetchFile(base + f, f, o);
  const files = { 'config.json': await get('config.json') };
  // An image model has no tokenizer, a text model no preprocessor: each is fetched if there
  // (the chat template too: chat_template.jinja, or inside tokenizer_config.json).
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja', 'preprocessor_config.json']) {
    try { files[f] = await get(f); } catch (e) { if (!isMissing(e)) throw e; }
  }
  try {
    files['model.safetensors'] = await get('model.safetensors');
  } catch (e) {
    if (!isMissing(e)) throw e;
    // A sharded checkpoint: model.safetensors.index.json names the shards.
    let index;
    try { index = await get('model.safetensors.index.json', { ...options, onProgress: undefined }); } catch { throw e; }
    files['model.safetensors.index.json'] = index;
    const map = JSON.parse(new TextDecoder().decode(index)).weight_map ?? {};
    for (const shard of [...new Set(Object.values(map))]) files[shard] = await get(shard);
  }
  return files;
}

/**
 * The files of a PEFT adapter at `url`: a `.zip` of the folder, or the folder itself
 * (`adapter_config.json` + `adapter_model.safetensors`). Cached like model files.
 */
export async function adapterFilesFromUrl(url, options = {}) {
  const name = url.split('?')[0].split('/').pop();
  if (/\.zip$/.test(name)) return { [name]: await fetchFile(url, name, options) };
  const base = url.endsWith('/') ? url : `${url}/`;
  const files = {};
  for (const f of ['adapter_config.json', 'adapter_model.safetensors']) files[f] = await fetchFile(base + f, f, options);
  return files;
}

/** Remove every cached model file (resolves to whether there was a cache). */
export async function clearCache() {
  if (typeof caches === 'undefined') return false;
  return caches.delete(CACHE);
}

/** Every ArrayBuffer inside `v` (typed arrays' buffers), to transfer with a message. */
export function buffersOf(v, out = new Set()) {
  if (ArrayBuffer.isView(v)) out.add(v.buffer);
  else if (v instanceof ArrayBuffer) out.add(v);
  else if (Array.isArray(v)) v.forEach((x) => buffersOf(x, out));
  else if (v && typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype) Object.values(v).forEach((x) => buffersOf(x, out));
  return [...out];
}

export { abortError };
