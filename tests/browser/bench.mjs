// Run tests/browser/bench.html in headless Chromium (WebGPU; SwiftShader without a GPU) and
// print its JSON, as `webpeft bench` prints its own (scripts/bench --device browser).
//   node tests/browser/bench.mjs --model URL_PATH [--base F] [--method lora-qv|lora-all|prompt|ia3] [--batch B] [--seq T] [--steps N] [--gen N] [--peak 512,1024] [--matmul ours|burn] [--attention blocked|reference|fused] [--profile] [--out FILE]
// (the page's log goes to stdout; the JSON to FILE when given)
import fs from 'node:fs';
import { serve, launch } from './serve.mjs';

const argv = process.argv.slice(2);
const arg = (k, d) => { const i = argv.indexOf(`--${k}`); return i >= 0 && argv[i + 1] ? argv[i + 1] : d; };
const q = new URLSearchParams({ model: arg('model', '/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), batch: arg('batch', '4'), seq: arg('seq', '128'), steps: arg('steps', '3'), gen: arg('gen', '16') });
if (arg('base')) q.set('base', arg('base'));
if (arg('method')) q.set('method', arg('method'));
if (arg('peak')) q.set('peak', arg('peak'));
if (arg('matmul')) q.set('matmul', arg('matmul'));
if (arg('attention')) q.set('attention', arg('attention'));
if (process.argv.includes('--profile')) q.set('profile', '1');
const server = await serve();
const { browser, foreign, newPage } = await launch(server.origin);
let result;
try {
  const page = await newPage();
  await page.goto(`${server.origin}/tests/browser/bench.html?${q}`);
  await page.waitForFunction(() => window.__bench, null, { timeout: 3 * 60 * 60 * 1000, polling: 1000 });
  result = await page.evaluate(() => window.__bench);
} finally {
  await browser.close();
  server.close();
}
if (foreign.length) result.error = `requests outside the local server: ${foreign.join(', ')}`;
const json = JSON.stringify(result, null, 2);
if (arg('out')) fs.writeFileSync(arg('out'), `${json}\n`); else console.log(json);
process.exit(result.error ? 1 : 0);
