// What the browser tests share (node --test also loads this file; it
// defines no tests): Chromium through playwright-core, the standalone
// server on free ports (restartable on the same ports and data), a guard
// that fails a page on any page error, console error or HTTP answer >= 400
// it was not told to expect, and numbered screenshots.
//
// CHROMIUM: the browser binary (default /usr/bin/chromium, Debian's
// package; scripts/test.sh installs it). A missing browser is a failure,
// never a skip. CHATROOM_SCREENSHOTS: where screenshots go (default
// web/screenshots/, not in git); each suite writes its own subfolder and
// prints it.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { freePorts, watchChild, within } from './support.mjs';

export const webDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const BIN = path.resolve(webDir, process.env.CHATROOM_BIN ?? '../target/debug/chatroom');
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const LOG = process.env.CHATROOM_TEST_LOG === '1';
export const SHOTS = path.resolve(process.env.CHATROOM_SCREENSHOTS ?? path.join(webDir, 'screenshots'));

export const STARTUP_MS = 20000;
/** Deadline for what a page should show within moments (debug build, busy machine). */
export const UI_MS = 10000;

export const PHONE = { width: 375, height: 700 };
export const DESKTOP = { width: 1100, height: 800 };

// As root, Chromium needs --no-sandbox; the rest keeps it from reaching out.
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage', '--autoplay-policy=no-user-gesture-required'];

/** Chromium, headless; fails (does not skip) when it is not installed. */
export async function launchBrowser() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: install it (apt-get install chromium; scripts/test.sh does) or set CHROMIUM`);
  }
  const { chromium } = await import('playwright-core').catch((e) => {
    throw new Error(`playwright-core is not installed (cd web && npm ci): ${e.message}`);
  });
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: ARGS });
}

/**
 * The standalone server with its pages (`http.web_dir` = web/), database and
 * uploads in `dir`. `ports` {ws, http} to reuse (a restart); resolves once it
 * printed its start line, which must name the page to open.
 */
export async function startServer({ dir, ports, env = {} } = {}) {
  const [ws, http] = ports ? [ports.ws, ports.http] : await freePorts(2);
  const own = !dir;
  dir ??= await mkdtemp(path.join(tmpdir(), 'chatroom-browser-'));
  const child = spawn(BIN, [], {
    cwd: webDir,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: {
      ...process.env,
      CHATROOM__CONN__WS__ADDR: `127.0.0.1:${ws}`,
      CHATROOM__LOGIC__HTTP__ADDR: `127.0.0.1:${http}`,
      CHATROOM__LOG__DIR: '',
      CHATROOM__LOGIC__STORE__URL: `sqlite://${dir}/im.db?mode=rwc`,
      CHATROOM__LOGIC__IM__UPLOAD_DIR: `${dir}/uploads`,
      CHATROOM__LOGIC__HTTP__WEB_DIR: webDir,
      CHATROOM__LOGIC__IM__PASSWORD_MEMORY_KIB: '256',
      CHATROOM__LOGIC__IM__PASSWORD_ITERATIONS: '1',
      CHATROOM__LOGIC__IM__CHAT_RATE_PER_SEC: '0',
      CHATROOM__LOGIC__IM__API_RATE_PER_SEC: '0',
      CHATROOM__CONN__REPORT_ONLINE: '300ms',
      NO_COLOR: '1',
      ...env,
    },
  });
  const { tail, exited } = watchChild(child, BIN, LOG);
  const want = `open http://127.0.0.1:${http}/ `;
  const s = { child, ws, http, tail, exited, dir, own, base: `http://127.0.0.1:${http}`, wsBase: `ws://127.0.0.1:${ws}` };
  try {
    s.startLine = await within(STARTUP_MS, `the server's start line naming ${want.trim()}`, new Promise((resolve, reject) => {
      let out = '';
      const onData = (chunk) => {
        out += chunk;
        const line = out.split('\n').find((l) => l.includes(want));
        if (line) {
          child.stdout.off('data', onData);
          resolve(line);
        }
      };
      child.stdout.on('data', onData);
      exited.then((x) => reject(new Error(`server exited early: ${JSON.stringify(x)}`)));
    }));
  } catch (e) {
    child.kill('SIGKILL');
    if (own) await rm(dir, { recursive: true, force: true });
    throw new Error(`${e.message}\nserver output:\n${tail.join('\n')}`);
  }
  return s;
}

/** Stops the server (SIGTERM, then SIGKILL); `keep`: leave its data folder for a restart. */
export async function stopServer(s, { keep = false } = {}) {
  if (!s) return;
  if (s.child.pid !== undefined && s.child.exitCode === null && s.child.signalCode === null) {
    s.child.kill('SIGTERM');
    const stopped = await within(10000, 'server exit', s.exited).catch(() => null);
    if (!stopped) {
      s.child.kill('SIGKILL');
      await s.exited;
    }
  }
  if (!keep && s.own) await rm(s.dir, { recursive: true, force: true });
}

/**
 * Watches a page for problems: uncaught errors, console errors, failed
 * requests and HTTP answers >= 400. `expect(re, fn)` runs `fn` with
 * problems matching `re` (URL or message) allowed, and fails if none of them
 * happened; `check()` fails on anything unexpected so far.
 */
export function guard(page, label) {
  const problems = [];
  let allowed = [];
  const note = (kind, text, url = '') => {
    const p = { kind, text, url };
    if (allowed.some((a) => a.re.test(text) || (url && a.re.test(url)))) {
      for (const a of allowed) if (a.re.test(text) || (url && a.re.test(url))) a.seen += 1;
      return;
    }
    problems.push(p);
  };
  page.on('pageerror', (e) => note('pageerror', e.stack || e.message));
  page.on('console', (m) => {
    if (m.type() === 'error') note('console', m.text(), m.location()?.url ?? '');
  });
  page.on('requestfailed', (r) => {
    // A page navigating away cancels what it was loading (media with preload=none never starts).
    if (r.failure()?.errorText === 'net::ERR_ABORTED') return;
    note('requestfailed', `${r.failure()?.errorText} ${r.url()}`, r.url());
  });
  page.on('response', (r) => {
    if (r.status() >= 400) note('response', `HTTP ${r.status()} ${r.request().method()} ${r.url()}`, r.url());
  });
  return {
    problems,
    async expect(re, fn) {
      const a = { re, seen: 0 };
      allowed = [...allowed, a];
      try {
        return await fn();
      } finally {
        allowed = allowed.filter((x) => x !== a);
        assert.ok(a.seen > 0, `${label}: expected a failure matching ${re} and none came`);
      }
    },
    /** Like expect, for failures that may or may not happen (a racing reconnect). */
    async tolerate(re, fn) {
      const a = { re, seen: 0 };
      allowed = [...allowed, a];
      try {
        return await fn();
      } finally {
        allowed = allowed.filter((x) => x !== a);
      }
    },
    check() {
      assert.deepEqual(problems, [], `${label}: page errors, console errors or failed requests`);
    },
  };
}

/** Numbered screenshots in SHOTS/<suite>/, the folder cleared and printed first. */
export async function screenshots(suite) {
  const dir = path.join(SHOTS, suite);
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  console.log(`screenshots of ${suite}: ${dir}`);
  let n = 0;
  return {
    dir,
    async shot(page, name) {
      n += 1;
      const file = path.join(dir, `${String(n).padStart(2, '0')}-${name}.png`);
      await page.screenshot({ path: file, fullPage: true });
      return file;
    },
  };
}

/** Fails unless the page has no horizontal scrolling at its viewport. */
export async function assertNoHorizontalScroll(page, what) {
  const m = await page.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    body: document.body.scrollWidth,
    view: window.innerWidth,
  }));
  assert.ok(m.scroll <= m.view && m.body <= m.view, `${what}: page is ${Math.max(m.scroll, m.body)} px wide in a ${m.view} px viewport`);
}
