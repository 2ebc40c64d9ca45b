// The demo app (www/) in headless Chromium, driven like a user: it loads a tiny model, trains
// on pasted text with the loss falling on the chart, survives a reload mid-training by
// resuming from its checkpoint, compares generations, exports the adapter and imports it back
// with the same outputs, and shows errors. Every request is watched: nothing may go anywhere
// but the app's own files and the model. Screenshots of the main states go to
// target/browser-artifacts/ (or $ARTIFACTS).
import fs from 'node:fs';
import path from 'node:path';
import { serve, launch, root } from './serve.mjs';

const out = process.env.ARTIFACTS ?? path.join(root, 'target/browser-artifacts');
fs.mkdirSync(out, { recursive: true });
const MODEL = '/tests/fixtures/tiny-llama';
// What the app may fetch: its own files, the package, the chart library, and the model.
const allowed = [/^\/www\//, /^\/pkg\//, /^\/node_modules\/uplot\//, new RegExp(`^${MODEL}/`), /^\/tests\/fixtures\/no-such-model\//, /^\/favicon\.ico$/];

const server = await serve();
const { browser, foreign, newPage } = await launch(server.origin, { acceptDownloads: true });
const results = [];
async function check(name, fn) {
  const t0 = Date.now();
  try {
    const detail = await fn();
    results.push({ name, ok: true, detail, ms: Date.now() - t0 });
  } catch (e) {
    results.push({ name, ok: false, detail: e.message.split('\n')[0], ms: Date.now() - t0 });
  }
  const r = results.at(-1);
  console.log(`${r.ok ? 'ok  ' : 'FAIL'} ${name} (${(r.ms / 1000).toFixed(1)} s) ${r.detail ?? ''}`);
  return r.ok;
}
const assert = (c, msg) => { if (!c) throw new Error(msg); };
const shot = (page, name) => page.screenshot({ path: path.join(out, `app-${name}.png`), fullPage: true });
const app = (page) => page.evaluate(() => ({ ...window.__app, previewTimer: undefined }));
const TEXT = ['Beautiful is better than ugly.', 'Explicit is better than implicit.', 'Simple is better than complex.', 'Complex is better than complicated.'].join('\n');

let page;
try {
  page = await newPage();
  await page.setViewportSize({ width: 1000, height: 900 });
  await check('the app starts a worker with WebGPU', async () => {
    await page.goto(`${server.origin}/www/?model=${MODEL}`);
    await page.waitForFunction(() => window.__app?.state === 'idle', null, { timeout: 120000 });
    await shot(page, '1-start');
    return await page.textContent('#gpu');
  });
  await check('a model URL that does not exist shows a clear error', async () => {
    await page.fill('#url', '/tests/fixtures/no-such-model');
    await page.click('#load');
    await page.waitForSelector('#model-status[data-state=error]', { timeout: 60000 });
    await shot(page, '2-error');
    const text = await page.textContent('#model-status');
    assert(/404/.test(text) && /config\.json/.test(text), text);
    return text;
  });
  await check('the tiny model loads with per-file progress; the data preview shows tokens', async () => {
    await page.fill('#url', MODEL);
    await page.press('#url', 'Enter');
    await page.waitForSelector('#model-status[data-state=done]', { timeout: 120000 });
    await page.fill('#data', TEXT);
    await page.waitForFunction(() => window.__app.examples === 4, null, { timeout: 30000 });
    await page.click('#preview summary');
    const files = await page.$$eval('#progress li', (li) => li.map((l) => l.textContent));
    assert(files.length === 3, JSON.stringify(files));
    const preview = await page.textContent('#preview-text');
    assert(/tokens:/.test(preview), preview);
    await shot(page, '3-loaded');
    return `${files.join('; ')}; ${await page.textContent('#estimate')}`;
  });
  let keptStep = null;
  await check('training from pasted text: a reload mid-run offers to resume, and the run continues from its checkpoint', async () => {
    await page.fill('#steps', '10');
    await page.fill('#every', '2');
    await page.fill('#lr', '1e-2');
    await page.fill('#seq', '32');
    await page.press('#data', 'Control+Enter');
    await page.waitForFunction(() => window.__app.steps.length >= 3, null, { timeout: 300000, polling: 200 });
    await shot(page, '4-training');
    const before = (await app(page)).steps;
    await page.reload();
    await page.waitForSelector('#resume:not([hidden])', { timeout: 120000 });
    const offer = await page.textContent('#resume-text');
    keptStep = Number(/step (\d+) of 10/.exec(offer)?.[1]);
    assert(keptStep >= 2 && keptStep < 10, offer);
    await shot(page, '5-resume-offer');
    await page.click('#resume-go');
    await page.waitForSelector('#train-status[data-state=done]', { timeout: 600000 });
    const after = (await app(page)).steps;
    assert(after[0].step === keptStep + 1 && after.at(-1).step === 10, `resumed steps ${after.map((s) => s.step)}`);
    const losses = [...before.map((s) => s.loss), ...after.map((s) => s.loss)];
    assert(after.at(-1).loss < before[0].loss - 0.3, `losses ${losses.map((l) => l.toFixed(3))}`);
    const points = await page.$$eval('#chart canvas', (c) => c.length);
    assert(points > 0, 'no chart');
    await shot(page, '6-trained');
    return `reloaded after step ${before.at(-1).step}; resumed from the step-${keptStep} checkpoint to 10; loss ${before[0].loss.toFixed(3)} → ${after.at(-1).loss.toFixed(3)}`;
  });
  let tuned = null;
  await check('base and adapted generations side by side', async () => {
    await page.click('#gen');
    await page.waitForFunction(() => Object.keys(window.__app.outputs).length === 2 && window.__app.state === 'ready', null, { timeout: 120000 });
    const outputs = (await app(page)).outputs;
    tuned = Object.entries(outputs).find(([k]) => k !== 'base');
    assert(tuned && outputs.base !== tuned[1], JSON.stringify(outputs));
    await shot(page, '7-compare');
    return JSON.stringify(outputs);
  });
  await check('the adapter exports as PEFT files, re-imports, and gives the same outputs', async () => {
    const downloads = [];
    page.on('download', (d) => downloads.push(d));
    await page.click('#export');
    const t0 = Date.now();
    while (downloads.length < 2 && Date.now() - t0 < 30000) await page.waitForTimeout(100);
    assert(downloads.length === 2, `${downloads.length} downloads`);
    const dir = fs.mkdtempSync(path.join(out, 'adapter-'));
    const saved = [];
    for (const d of downloads) {
      const p = path.join(dir, d.suggestedFilename());
      await d.saveAs(p);
      saved.push(p);
    }
    const config = JSON.parse(fs.readFileSync(saved.find((p) => p.endsWith('adapter_config.json')), 'utf8'));
    assert(config.peft_type === 'LORA', JSON.stringify(config));
    await page.setInputFiles('#import', saved);
    await page.waitForSelector('#adapter-status[data-state=done]', { timeout: 60000 });
    const picked = await page.inputValue('#adapter-pick');
    assert(picked.startsWith('imported-'), picked);
    await page.click('#gen');
    await page.waitForFunction((n) => window.__app.outputs[n] !== undefined && window.__app.state === 'ready', picked, { timeout: 120000 });
    const again = (await app(page)).outputs[picked];
    assert(again === tuned[1], `${JSON.stringify(again)} vs ${JSON.stringify(tuned[1])}`);
    return `${saved.map((p) => `${path.basename(p)} ${fs.statSync(p).size} B`).join(', ')}; ${picked} generates the same ${JSON.stringify(again)}`;
  });
  await check('dark mode', async () => {
    await page.emulateMedia({ colorScheme: 'dark' });
    const bg = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    await shot(page, '8-dark');
    assert(bg !== 'rgb(251, 251, 253)', bg);
    return bg;
  });
  await check('without WebGPU the app says so and what to do', async () => {
    const p = await newPage();
    await p.addInitScript(() => { Object.defineProperty(Navigator.prototype, 'gpu', { get: () => undefined }); });
    await p.goto(`${server.origin}/www/`);
    await p.waitForFunction(() => window.__app?.state === 'no-webgpu', null, { timeout: 60000 });
    const text = await p.textContent('#nogpu');
    await p.screenshot({ path: path.join(out, 'app-9-no-webgpu.png') });
    await p.close();
    assert(/WebGPU is not available/.test(text), text);
    return text.trim().slice(0, 60);
  });
  await check('no request left the app except for its own files and the model', async () => {
    const odd = [...new Set(server.served.filter((p) => !allowed.some((r) => r.test(p))))];
    assert(!foreign.length && !odd.length, `outside: ${foreign.join(', ')}; unexpected: ${odd.join(', ')}`);
    return `${server.served.length} requests, all local: ${[...new Set(server.served.map((p) => p.split('/').slice(0, 3).join('/')))].join(', ')}`;
  });
} finally {
  await browser.close();
  server.close();
}
const failed = results.filter((r) => !r.ok).length;
console.log(`app: ${results.length - failed} passed, ${failed} failed; screenshots in ${path.relative(root, out) || out}`);
process.exit(failed ? 1 : 0);
