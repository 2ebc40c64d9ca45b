// Serve the repository on 127.0.0.1, open tests/browser/pkg.html in headless Chromium with
// WebGPU, and report its checks. Fails on any failed check, on any request that leaves the
// local server (the library must make no other network request); the page is served with a
// strict Content-Security-Policy (no eval: only 'wasm-unsafe-eval') and checks it was obeyed.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
// What a careful host page would set: scripts only from the origin (and the test page's own
// inline module, by nonce), WebAssembly compilation but no eval, no connections elsewhere.
const CSP = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval' 'nonce-webpeft-test'; connect-src 'self'; object-src 'none'; base-uri 'none'";
const types = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json' };
const server = http.createServer((req, res) => {
  const p = path.join(root, decodeURIComponent(new URL(req.url, 'http://x').pathname));
  if (!p.startsWith(root) || !fs.existsSync(p) || !fs.statSync(p).isFile()) { res.writeHead(404); res.end(); return; }
  const headers = { 'content-type': types[path.extname(p)] ?? 'application/octet-stream', 'content-length': fs.statSync(p).size };
  if (path.extname(p) === '.html') headers['content-security-policy'] = CSP;
  res.writeHead(200, headers);
  fs.createReadStream(p).pipe(res);
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const origin = `http://127.0.0.1:${server.address().port}`;

const browser = await chromium.launchPersistentContext(fs.mkdtempSync(path.join(os.tmpdir(), 'webpeft-chromium-')), {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--headless=new', '--no-sandbox', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--enable-unsafe-webgpu'],
});
const page = browser.pages()[0] ?? await browser.newPage();
const foreign = [];
page.on('request', (r) => { if (!r.url().startsWith(origin) && !r.url().startsWith('data:')) foreign.push(r.url()); });
page.on('console', (m) => console.log(`[browser] ${m.text()}`));
page.on('pageerror', (e) => console.log(`[browser error] ${e.message}`));
const query = process.argv.includes('--no-smollm2') ? '?smollm2=0' : '';
await page.goto(`${origin}/tests/browser/pkg.html${query}`);
let results;
try {
  await page.waitForFunction(() => window.__result, null, { timeout: 20 * 60 * 1000, polling: 1000 });
  results = await page.evaluate(() => window.__result);
} finally {
  await browser.close();
  server.close();
}
let failed = results.filter((r) => !r.ok).length;
if (foreign.length) { console.log(`requests outside the local server: ${foreign.join(', ')}`); failed += 1; }
for (const r of results) console.log(`${r.ok ? 'ok  ' : 'FAIL'} ${r.name} (${(r.ms / 1000).toFixed(1)} s) ${r.detail ?? ''}`);
console.log(`browser: ${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
