// The packed package in a Vite build (the worker and the wasm file come from the bundle) or
// under Vite's dev server (from node_modules, through its dependency pre-bundling).
import { createSession } from 'webpeft';

const results = [];
const log = (s) => { document.getElementById('log').textContent += s + '\n'; console.log(s); };
async function check(name, fn) {
  const t0 = performance.now();
  try {
    const detail = await fn();
    results.push({ name, ok: true, detail, ms: performance.now() - t0 });
    log(`ok   ${name} ${detail}`);
  } catch (e) {
    results.push({ name, ok: false, detail: `${e.code ?? ''} ${e.message}`, ms: performance.now() - t0 });
    log(`FAIL ${name}: ${e.message}`);
  }
}
const assert = (c, msg) => { if (!c) throw new Error(msg); };

await check(`the packed package in a Vite ${import.meta.env.DEV ? 'dev server' : 'build'}: worker session, load, train, generate`, async () => {
  const session = await createSession();
  const model = await session.loadModel('/tests/fixtures/tiny-llama', { cache: false });
  await model.addAdapter('a', { target_modules: ['q_proj', 'v_proj'], r: 4, lora_alpha: 8 }, { seed: 1 });
  const losses = [];
  await model.train(['Beautiful is better than ugly.', 'Explicit is better than implicit.'], { adapter: 'a', steps: 4, batch: 2, seqLen: 32, lr: 1e-2 }, { onStep: (r) => losses.push(r.loss) });
  assert(losses.length === 4 && losses[3] < losses[0], `losses ${losses}`);
  const text = await model.generate('Beautiful is', { adapter: 'a', maxNewTokens: 4 });
  const worker = performance.getEntriesByType('resource').map((e) => e.name).filter((n) => /worker[^/]*\.js(\?|$)/.test(n));
  session.terminate();
  return `losses ${losses.map((l) => l.toFixed(3)).join(' ')}; ${JSON.stringify(text)}; worker ${worker.map((w) => w.split('/').pop())}`;
});
window.__result = results;
