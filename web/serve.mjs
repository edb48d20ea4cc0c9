// Development server for room.html and chat.html:
//
//   node serve.mjs            # then open http://127.0.0.1:8000/web/room.html
//
// Serves web/ and api/ of the repository (the page loads ../api/protocol.proto
// and vendor/protobuf.min.js) and forwards POST /tk, POST /msg, the IM
// routes (/user/*, /contact/*, /chat/history, /attach/upload) and
// GET /attach/files/* to the logic HTTP API. (Logic serves both pages itself
// too, from `http.web_dir`: http://127.0.0.1:8081/web/chat.html.) The forwarding is why this exists: logic sends no CORS
// headers, so a page from another origin cannot read its answers.
//
// Environment: PORT (default 8000; 0 picks a free one), HOST (127.0.0.1),
// CHATROOM_HTTP (logic's HTTP API, default http://127.0.0.1:8081).
// It prints "serving http://host:port" once listening.

import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const HOST = process.env.HOST ?? '127.0.0.1';
const PORT = Number(process.env.PORT ?? 8000);
const LOGIC = (process.env.CHATROOM_HTTP ?? 'http://127.0.0.1:8081').replace(/\/$/, '');

// Only these top-level folders are served: not the rest of the repository.
const SERVED = new Set(['web', 'api']);
const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.map': 'application/json',
  '.proto': 'text/plain; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
};

function fail(res, status, msg) {
  res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8' });
  res.end(`${msg}\n`);
}

async function forward(req, res) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const headers = {};
  for (const h of ['content-type', 'authorization']) if (req.headers[h]) headers[h] = req.headers[h];
  try {
    const body = req.method === 'POST' ? Buffer.concat(chunks) : undefined;
    const r = await fetch(LOGIC + req.url, { method: req.method, headers, body });
    const out = { 'content-type': r.headers.get('content-type') ?? 'application/json' };
    for (const h of ['x-content-type-options', 'content-security-policy', 'cache-control']) {
      if (r.headers.has(h)) out[h] = r.headers.get(h);
    }
    res.writeHead(r.status, out);
    res.end(Buffer.from(await r.arrayBuffer()));
  } catch (e) {
    fail(res, 502, `logic at ${LOGIC} unreachable: ${e.cause?.message ?? e.message}`);
  }
}

async function file(req, res) {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/') {
    res.writeHead(302, { location: '/web/room.html' });
    res.end();
    return;
  }
  // Normalised first, so "/web/../../etc" cannot climb out of the repository.
  const rel = path.posix.normalize(decodeURIComponent(url.pathname)).replace(/^\/+/, '');
  if (!SERVED.has(rel.split('/')[0])) return fail(res, 404, 'not found');
  const full = path.join(repo, rel);
  const info = await stat(full).catch(() => null);
  if (!info?.isFile()) return fail(res, 404, 'not found');
  res.writeHead(200, {
    'content-type': TYPES[path.extname(full)] ?? 'application/octet-stream',
    'content-length': info.size,
    'cache-control': 'no-cache',
  });
  createReadStream(full).pipe(res);
}

// Logic's routes: the room API, the IM API (chat.html) and uploaded files.
const FORWARDED = /^\/(tk|msg|user\/[a-z]+|contact\/[a-z]+|chat\/history|attach\/upload)$/;

const server = http.createServer((req, res) => {
  const route = new URL(req.url, 'http://x').pathname;
  const handled = (req.method === 'POST' && FORWARDED.test(route)) || (req.method === 'GET' && route.startsWith('/attach/files/'))
    ? forward(req, res)
    : req.method === 'GET' || req.method === 'HEAD'
      ? file(req, res)
      : Promise.resolve(fail(res, 405, 'method not allowed'));
  handled.catch((e) => {
    if (!res.headersSent) fail(res, 500, e.message);
    else res.destroy(e);
  });
});

server.listen(PORT, HOST, () => {
  const { address, port } = server.address();
  console.log(`serving http://${address}:${port} (room page: /web/room.html, API forwarded to ${LOGIC})`);
});

for (const sig of ['SIGINT', 'SIGTERM']) process.once(sig, () => server.close(() => process.exit(0)));
