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
// ... and the adapter the test imports from a URL (/adapters/, served from a temp folder).
const allowed = [/^\/www\//, /^\/pkg\//, /^\/node_modules\/uplot\//, new RegExp(`^${MODEL}/`), /^\/tests\/fixtures\/no-such-model\//, /^\/favicon\.ico$/, /^\/adapters\//];
const adapterDir = fs.mkdtempSync(path.join(out, 'served-adapters-'));

const server = await serve([{ prefix: '/adapters', dir: adapterDir }]);
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
const TEXT = ['Beautiful is better than ugly.', 'Explicit is better than implicit.', 'Simple is better than complex.', 'Complex is better than complicated.', 'Flat is better than nested.', 'Sparse is better than dense.'].join('\n');

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
  await check('the tiny model loads with per-file progress; the data preview shows the tokens and what is trained', async () => {
    await page.fill('#url', MODEL);
    await page.press('#url', 'Enter');
    await page.waitForSelector('#model-status[data-state=done]', { timeout: 120000 });
    const files = await page.$$eval('#progress li', (li) => li.map((l) => l.textContent));
    assert(files.length === 5 && files.some((f) => f.startsWith('chat_template.jinja')), JSON.stringify(files));
    const loaded = await page.textContent('#model-status');
    assert(/frozen weights in f32, \d+ MiB on the GPU/.test(loaded), loaded);
    // A chat example: only the assistant's turn is highlighted as trained.
    await page.fill('#data', '{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there"}]}');
    await page.click('#preview summary');
    await page.waitForFunction(() => /Say hi/.test(document.querySelector('#preview-text').textContent) && document.querySelector('#preview-text mark'), null, { timeout: 30000 });
    const marked = await page.$$eval('#preview-text mark', (m) => m.map((x) => x.textContent).join(''));
    const shown = await page.textContent('#preview-text');
    assert(marked.startsWith('Hi there') && shown.includes('Say hi') && !marked.includes('Say hi'), `${marked} / ${shown}`);
    await shot(page, '3-chat-preview');
    await page.fill('#data', TEXT);
    await page.waitForFunction(() => window.__app.examples === 6, null, { timeout: 30000 });
    const preview = await page.textContent('#preview-text');
    assert(/\d+ tokens, \d+ trained/.test(preview), preview);
    await page.waitForSelector('#estimate:text-matches("^Estimate: .* s per step")', { timeout: 120000 });
    const est = await page.textContent('#estimate');
    await shot(page, '3-loaded');
    return `${files.join('; ')}; chat preview trains ${JSON.stringify(marked)}; ${est}`;
  });
  let keptStep = null;
  await check('training from pasted text: a reload mid-run offers to resume, and the run continues from its checkpoint', async () => {
    await page.fill('#steps', '10');
    await page.fill('#every', '2');
    await page.fill('#lr', '1e-2');
    await page.fill('#seq', '32');
    // The estimate for these settings, before training (the time from a measured forward pass).
    await page.waitForSelector('#estimate:text-matches("× 32 tokens.* for 10 steps")', { timeout: 120000 });
    const est = (await app(page)).estimate;
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
    // The validation share (0.2 of 6 examples: 1 held out) is evaluated along the way.
    const val = [...before, ...after].filter((s) => s.valLoss !== undefined);
    assert(val.length >= 5 && val.every((s) => Number.isFinite(s.valLoss)) && val.at(-1).step === 10, `validation ${JSON.stringify(val)}`);
    const measured = after.reduce((a, s) => a + (s.seconds ?? 0), 0) / after.length;
    const points = await page.$$eval('#chart canvas', (c) => c.length);
    assert(points > 0, 'no chart');
    await shot(page, '6-trained');
    return `reloaded after step ${before.at(-1).step}; resumed from the step-${keptStep} checkpoint to 10; loss ${before[0].loss.toFixed(3)} → ${after.at(-1).loss.toFixed(3)}; validation ${val[0].valLoss.toFixed(3)} → ${val.at(-1).valLoss.toFixed(3)}; step time estimated ${est.stepSeconds.toFixed(3)} s, measured ${measured.toFixed(3)} s on average (steps ${after.map((x) => x.seconds.toFixed(2)).join(', ')} s: a new batch shape compiles kernels)`;
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
  /** Import with `act` and wait until the app lists one more adapter. */
  const imported = async (act) => {
    const n = (await app(page)).adapters.length;
    await act();
    await page.waitForFunction((k) => window.__app.adapters.length > k && window.__app.state === 'ready', n, { timeout: 60000 });
  };
  const sameOutputs = async (what) => {
    const picked = await page.inputValue('#adapter-pick');
    assert(picked.startsWith('imported-'), picked);
    await page.click('#gen');
    await page.waitForFunction((n) => window.__app.outputs[n] !== undefined && window.__app.state === 'ready', picked, { timeout: 120000 });
    const again = (await app(page)).outputs[picked];
    assert(again === tuned[1], `${what}: ${JSON.stringify(again)} vs ${JSON.stringify(tuned[1])}`);
    return `${picked} (${what}) generates the same ${JSON.stringify(again)}`;
  };
  const downloads = [];
  page.on('download', (d) => downloads.push(d));
  const take = async (n) => {
    const t0 = Date.now();
    while (downloads.length < n && Date.now() - t0 < 30000) await page.waitForTimeout(100);
    assert(downloads.length === n, `${downloads.length} downloads`);
    const dir = fs.mkdtempSync(path.join(out, 'adapter-'));
    const saved = [];
    for (const d of downloads.splice(0)) {
      const p = path.join(dir, d.suggestedFilename());
      await d.saveAs(p);
      saved.push(p);
    }
    return saved;
  };
  await check('the adapter exports as one .zip, re-imports from it, and gives the same outputs', async () => {
    await page.click('#export');
    const [zip] = await take(1);
    assert(zip.endsWith('.zip'), zip);
    const bytes = fs.readFileSync(zip);
    assert(bytes.subarray(0, 4).toString('latin1') === 'PK\x03\x04', 'not a zip');
    // The archive lists the PEFT folder's two files (names are stored in the clear).
    const listing = bytes.toString('latin1');
    assert(listing.includes('/adapter_config.json') && listing.includes('/adapter_model.safetensors'), 'zip entries');
    await imported(() => page.setInputFiles('#import', [zip]));
    return `${path.basename(zip)} ${bytes.length} B; ${await sameOutputs('from the .zip')}`;
  });
  await check('the adapter exports as the two PEFT files; they re-import from files and from a URL with the same outputs', async () => {
    await page.click('#export-files');
    const saved = await take(2);
    const config = JSON.parse(fs.readFileSync(saved.find((p) => p.endsWith('adapter_config.json')), 'utf8'));
    assert(config.peft_type === 'LORA', JSON.stringify(config));
    await imported(() => page.setInputFiles('#import', saved));
    const fromFiles = await sameOutputs('from the files');
    for (const p of saved) fs.copyFileSync(p, path.join(adapterDir, path.basename(p)));
    await page.fill('#import-url', '/adapters/');
    await imported(() => page.press('#import-url', 'Enter'));
    const fromUrl = await sameOutputs('from the URL');
    assert(server.served.includes('/adapters/adapter_model.safetensors'), 'the URL was not fetched');
    return `${saved.map((p) => `${path.basename(p)} ${fs.statSync(p).size} B`).join(', ')}; ${fromFiles}; ${fromUrl}`;
  });
  await check('with the storage quota full, the model still loads, uncached (the next load downloads it again)', async () => {
    const p = await newPage();
    const cdp = await p.context().newCDPSession(p);
    await cdp.send('Storage.overrideQuotaForOrigin', { origin: server.origin, quotaSize: 4096 });
    const weights = () => server.served.filter((x) => x === `${MODEL}/model.safetensors`).length;
    const n0 = weights();
    try {
      for (let i = 0; i < 2; i++) {
        await p.goto(`${server.origin}/www/?model=${MODEL}`);
        await p.waitForFunction(() => window.__app?.state === 'idle', null, { timeout: 120000 });
        if (i === 0) await p.evaluate(() => caches.delete('webpeft-models-v1'));
        await p.click('#load');
        await p.waitForSelector('#model-status[data-state=done]', { timeout: 120000 });
      }
    } finally {
      await cdp.send('Storage.overrideQuotaForOrigin', { origin: server.origin });
      await p.close();
    }
    assert(weights() - n0 === 2, `model.safetensors downloaded ${weights() - n0} times`);
    return 'quota 4 kB: both loads succeeded, each downloaded the weights';
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
