// Open the test pages (tests/browser/worker.html: the worker session API; tests/browser/pkg.html:
// the direct API, SmolLM2 included) in headless Chromium with WebGPU, and report their checks.
// Fails on any failed check, on any request that leaves the local server (the library must make
// no other network request); the pages are served with a strict Content-Security-Policy (no
// eval: only 'wasm-unsafe-eval') and check it was obeyed (tests/browser/serve.mjs).
// Options: --page PATH (repeatable; default the two pages above), --mount PREFIX=DIR (serve DIR
// under PREFIX, e.g. a built app), --no-smollm2.
import path from 'node:path';
import { serve, launch } from './serve.mjs';

const argv = process.argv.slice(2);
const values = (flag) => argv.flatMap((a, i) => (a === flag && argv[i + 1] ? [argv[i + 1]] : []));
const pages = values('--page');
if (!pages.length) pages.push('/tests/browser/worker.html', '/tests/browser/pkg.html');
const mounts = values('--mount').map((m) => { const [prefix, dir] = m.split('='); return { prefix, dir: path.resolve(dir) }; });
const query = argv.includes('--no-smollm2') ? '?smollm2=0' : '';

const server = await serve(mounts);
const { browser, foreign, newPage } = await launch(server.origin);
const results = [];
try {
  for (const name of pages) {
    const page = await newPage();
    await page.goto(`${server.origin}${name}${query}`);
    await page.waitForFunction(() => window.__result, null, { timeout: 20 * 60 * 1000, polling: 1000 });
    for (const r of await page.evaluate(() => window.__result)) results.push({ ...r, name: `${name}: ${r.name}` });
    await page.close();
  }
} finally {
  await browser.close();
  server.close();
}
let failed = results.filter((r) => !r.ok).length;
if (foreign.length) { console.log(`requests outside the local server: ${foreign.join(', ')}`); failed += 1; }
for (const r of results) console.log(`${r.ok ? 'ok  ' : 'FAIL'} ${r.name} (${(r.ms / 1000).toFixed(1)} s) ${r.detail ?? ''}`);
console.log(`browser: ${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
