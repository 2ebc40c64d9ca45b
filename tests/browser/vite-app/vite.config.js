// A fresh Vite app using the packed webpeft tarball as any user would (scripts/test-browser
// installs it with `npm install webpeft-*.tgz vite`, builds, and tests/browser/run.mjs opens it).
// Vite's defaults otherwise: the worker and the wasm file are found in the package as they are.
export default { base: '/vite/' };
