// The packed package under Vite's dev server, as `npm run dev` gives it to a user: Vite
// pre-bundles dependencies into node_modules/.vite, which breaks packages that find their
// worker or wasm file next to their own module. Runs the same check as the built app
// (tests/browser/vite-app/main.js) in headless Chromium against `vite` (default options but
// the base path), and fails on a failed check or a request that leaves the dev server.
//   node tests/browser/vite-dev.mjs APP_DIR     (APP_DIR: the app with webpeft and vite installed)
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { launch, root } from './serve.mjs';

const app = path.resolve(process.argv[2] ?? '.');
// The model the check loads, served by Vite from the app's public folder.
const pub = path.join(app, 'public/tests/fixtures/tiny-llama');
fs.mkdirSync(pub, { recursive: true });
for (const f of ['config.json', 'tokenizer.json', 'model.safetensors']) fs.copyFileSync(path.join(root, 'tests/fixtures/tiny-llama', f), path.join(pub, f));

const port = await new Promise((resolve) => {
  const s = net.createServer().listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => resolve(p)); });
});
const origin = `http://127.0.0.1:${port}`;
const vite = spawn(path.join(app, 'node_modules/.bin/vite'), ['--host', '127.0.0.1', '--port', String(port), '--strictPort', '--base', '/'], { cwd: app, stdio: ['ignore', 'pipe', 'pipe'] });
let out = '';
vite.stdout.on('data', (d) => { out += d; });
vite.stderr.on('data', (d) => { out += d; });
const stop = () => { try { vite.kill('SIGTERM'); } catch { /* gone */ } };

let results = [];
let foreign = [];
try {
  const t0 = Date.now();
  for (;;) {
    if (vite.exitCode !== null) throw new Error(`vite exited: ${out}`);
    if (Date.now() - t0 > 60000) throw new Error(`vite did not start in 60 s: ${out}`);
    try { if ((await fetch(`${origin}/`)).ok) break; } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 250));
  }
  const b = await launch(origin);
  foreign = b.foreign;
  try {
    const page = await b.newPage();
    await page.goto(`${origin}/`);
    await page.waitForFunction(() => window.__result, null, { timeout: 10 * 60 * 1000, polling: 1000 });
    results = await page.evaluate(() => window.__result);
  } finally {
    await b.browser.close();
  }
} catch (e) {
  results.push({ name: 'the Vite dev server serves the app', ok: false, detail: e.message, ms: 0 });
} finally {
  stop();
}
let failed = results.filter((r) => !r.ok).length;
if (foreign.length) { console.log(`requests outside the dev server: ${foreign.join(', ')}`); failed += 1; }
for (const r of results) console.log(`${r.ok ? 'ok  ' : 'FAIL'} vite dev: ${r.name} (${(r.ms / 1000).toFixed(1)} s) ${r.detail ?? ''}`);
console.log(`vite dev: ${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
