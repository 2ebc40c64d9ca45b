// What the browser test pages share: checks with timings, a fixture reader, and the strict
// Content-Security-Policy watch. Results land in window.__result for tests/browser/run.mjs.

export const results = [];
// The pages are served with a strict Content-Security-Policy (tests/browser/run.mjs): any
// eval, foreign script or connection elsewhere would be refused and reported here.
const cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
// Control: the policy is really enforced (eval is refused, and reported as blocked 'eval').
let evalRefused = false;
try { (0, eval)('1'); } catch { evalRefused = true; }

export const log = (s) => { document.getElementById('log').textContent += s + '\n'; console.log(s); };

export async function check(name, fn) {
  const t0 = performance.now();
  try {
    const detail = await fn();
    results.push({ name, ok: true, detail, ms: performance.now() - t0 });
    log(`ok   ${name} ${detail ?? ''}`);
  } catch (e) {
    results.push({ name, ok: false, detail: `${e.code ?? ''} ${e.message}`, ms: performance.now() - t0 });
    log(`FAIL ${name}: ${e.code ?? ''} ${e.message}`);
  }
}

export function assert(c, msg) { if (!c) throw new Error(msg); }

/** Minimal safetensors reader for the fixtures (f32 / i64). */
export async function safetensors(url) {
  const buf = await (await fetch(url)).arrayBuffer();
  const n = Number(new DataView(buf).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 8, n)));
  const out = {};
  for (const [k, v] of Object.entries(header)) {
    if (k === '__metadata__') continue;
    const [a, b] = v.data_offsets;
    const bytes = buf.slice(8 + n + a, 8 + n + b);
    out[k] = { shape: v.shape, data: v.dtype === 'I64' ? Array.from(new BigInt64Array(bytes), Number) : new Float32Array(bytes) };
  }
  return out;
}

export const maxAbsDiff = (a, b) => { let m = 0; for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i])); return m; };

/** Add the CSP check and hand the results to the runner. */
export function finish() {
  const others = cspViolations.filter((v) => !v.endsWith(' eval'));
  const ok = evalRefused && cspViolations.length > others.length && others.length === 0;
  results.push({ name: 'strict Content-Security-Policy: eval refused (control), nothing else violated it', ok, detail: `eval refused: ${evalRefused}; violations: ${cspViolations.join(', ')}`, ms: 0 });
  window.__result = results;
}
