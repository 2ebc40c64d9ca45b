// What the browser test drivers share: the repository served on 127.0.0.1 under a strict
// Content-Security-Policy, with a log of every path served (GET /__requests), and headless
// Chromium with WebGPU (SwiftShader when there is no GPU) that records every request leaving
// the local server.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
// What a careful host page would set: scripts only from the origin (and the test page's own
// inline module, by nonce), WebAssembly compilation but no eval, no connections elsewhere.
const CSP = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval' 'nonce-webpeft-test'; connect-src 'self'; object-src 'none'; base-uri 'none'";
const types = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css', '.wasm': 'application/wasm', '.json': 'application/json' };

/** Serve the repository (and `mounts`: [{prefix, dir}]) on `port` (0: any); resolves to {origin, served, close}. */
export async function serve(mounts = [], port = 0) {
  const fileOf = (pathname) => {
    const m = mounts.find((x) => pathname.startsWith(`${x.prefix}/`));
    const [base, rest] = m ? [m.dir, pathname.slice(m.prefix.length)] : [root, pathname];
    let p = path.join(base, rest);
    if (p.endsWith(path.sep)) p = path.join(p, 'index.html');
    return p.startsWith(base) ? p : null;
  };
  const served = [];
  const server = http.createServer((req, res) => {
    const pathname = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    if (pathname === '/__requests') {
      res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' });
      res.end(JSON.stringify(served));
      return;
    }
    served.push(pathname);
    if (served.length > 100000) served.splice(0, 50000); // a long-lived `scripts/demo --web` keeps only the recent log
    const p = fileOf(pathname);
    if (!p || !fs.existsSync(p) || !fs.statSync(p).isFile()) { res.writeHead(404); res.end(); return; }
    const headers = { 'content-type': types[path.extname(p)] ?? 'application/octet-stream', 'content-length': fs.statSync(p).size };
    // Pages and scripts (a worker runs under the policy of its own script's response).
    if (['.html', '.js'].includes(path.extname(p))) headers['content-security-policy'] = CSP;
    res.writeHead(200, headers);
    fs.createReadStream(p).pipe(res);
  });
  await new Promise((r) => server.listen(port, '127.0.0.1', r));
  return { origin: `http://127.0.0.1:${server.address().port}`, served, close: () => server.close() };
}

/** Headless Chromium with WebGPU; `foreign` collects requests that leave `origin`. */
export async function launch(origin, options = {}) {
  const browser = await chromium.launchPersistentContext(fs.mkdtempSync(path.join(os.tmpdir(), 'webpeft-chromium-')), {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ['--headless=new', '--no-sandbox', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync', '--enable-unsafe-webgpu'],
    ...options,
  });
  const foreign = [];
  // Every request of the pages and of their workers (the context sees both).
  const watch = (r) => { if (!r.url().startsWith(origin) && !r.url().startsWith('data:') && !r.url().startsWith('blob:')) foreign.push(r.url()); };
  browser.on('request', watch);
  const newPage = async () => {
    const page = await browser.newPage();
    page.on('request', watch);
    page.on('worker', (w) => w.on('console', (m) => console.log(`[worker] ${m.text()}`)));
    page.on('console', (m) => console.log(`[browser] ${m.text()}`));
    page.on('pageerror', (e) => console.log(`[browser error] ${e.message}`));
    return page;
  };
  return { browser, foreign, newPage };
}
