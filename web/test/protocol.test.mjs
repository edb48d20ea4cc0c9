// The room protocol end to end with protobuf.js: starts the standalone
// server (conn + logic + job in one process) on free ports, talks to it with
// lib/chatroom.mjs, stops it at the end.
//
//   cd web && npm ci && CHATROOM_BIN=../target/debug/chatroom node --test test/
//
// CHATROOM_BIN: the server binary (default ../target/debug/chatroom from web/).
// CHATROOM_TEST_LOG=1: copy the server's log to stderr.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import WebSocket from 'ws';

import { ErrCode, MsgLevel, PackageType, RoomClient, loadProtocol, pack, text, unpack } from '../lib/chatroom.mjs';
import { canConnect, delay, eventually, freePorts, watchChild, within } from './support.mjs';

const webDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.resolve(webDir, process.env.CHATROOM_BIN ?? '../target/debug/chatroom');
const LOG = process.env.CHATROOM_TEST_LOG === '1';

// Deadlines for things that should take milliseconds; generous because the
// machine may be busy (a debug build, two shared cores).
const STARTUP_MS = 15000;
const ANSWER_MS = 5000;
// conn's online-count report period for the test server (default 3000 ms).
const REPORT_MS = 300;

// Rooms are unique per run and per test, so tests never see each other's
// traffic (and reruns against a long-lived server would not either).
const run = randomUUID().slice(0, 8);
const room = (name) => `${name}-${run}`;

let server; // {child, ws, http, tail, exited}: see startServer
let proto;
const clients = new Set();

// ---------------------------------------------------------------- helpers

/** The first `name` event of `client` that satisfies `pred`. */
function nextEvent(client, name, pred = () => true, ms = ANSWER_MS) {
  let off;
  const got = new Promise((resolve) => {
    off = client.on(name, (v) => { if (pred(v)) resolve(v); });
  });
  return within(ms, `a '${name}' event`, got).finally(() => off());
}

/**
 * Records every pushed message of `client` (from now on) and waits for
 * conditions on them, woken by each arrival rather than by polling.
 */
function inbox(client) {
  const items = [];
  const waiters = new Set();
  client.on('message', (m) => {
    items.push({ ...m, text: text(m.data) });
    for (const w of waiters) w();
  });
  return {
    items,
    texts: () => items.map((m) => m.text),
    until(what, pred, ms = ANSWER_MS) {
      let wake;
      const met = new Promise((resolve) => {
        wake = () => { if (pred(items)) resolve(items); };
        waiters.add(wake);
        wake();
      });
      return within(ms, `${what} (got ${JSON.stringify(items.map((m) => m.text).slice(-5))}…)`, met).finally(() => waiters.delete(wake));
    },
  };
}

async function postJson(pathname, body, headers = {}) {
  const res = await fetch(`http://127.0.0.1:${server.http}${pathname}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify(body),
  });
  return res.json();
}

async function token(uid) {
  const r = await postJson('/tk', { uid });
  assert.equal(r.code, 1, `POST /tk for ${uid}: ${JSON.stringify(r)}`);
  assert.equal(typeof r.data, 'string');
  return r.data;
}

async function connect(opts = {}) {
  const c = new RoomClient(proto, { timeoutMs: ANSWER_MS, ...opts });
  clients.add(c);
  await c.connect(`ws://127.0.0.1:${server.ws}/room`);
  return c;
}

/** A client signed in to `roomId` as `uid`, its inbox recording from before the sign-in answer. */
async function signedIn(uid, roomId, opts) {
  const c = await connect(opts);
  const box = inbox(c);
  const err = await c.signIn(await token(uid), roomId);
  assert.deepEqual({ code: err.code, msg: err.msg }, { code: ErrCode.OK, msg: 'ok' }, `sign-in of ${uid} to ${roomId}`);
  return { c, box };
}

async function closeAll(list) {
  await Promise.all(list.map(async (c) => {
    clients.delete(c);
    await within(ANSWER_MS, 'a client to close', c.close());
  }));
}

// ------------------------------------------------------- server lifecycle

function startServer() {
  return Promise.all([freePorts(2), mkdtemp(path.join(tmpdir(), 'chatroom-web-'))]).then(([[ws, http], dataDir]) => {
    const child = spawn(BIN, [], {
      cwd: webDir,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: {
        ...process.env,
        CHATROOM__CONN__WS__ADDR: `127.0.0.1:${ws}`,
        CHATROOM__LOGIC__HTTP__ADDR: `127.0.0.1:${http}`,
        CHATROOM__LOG__DIR: '', // stdout only: no log/ folder in web/
        // IM data in a temporary folder, not ./data under web/.
        CHATROOM__LOGIC__STORE__URL: `sqlite://${dataDir}/im.db?mode=rwc`,
        CHATROOM__LOGIC__IM__UPLOAD_DIR: `${dataDir}/uploads`,
        // Online counts are reported every 3 s by default; faster here so the
        // MEMBERS test waits for refreshes in well under a second each.
        CHATROOM__CONN__REPORT_ONLINE: `${REPORT_MS}ms`,
        NO_COLOR: '1',
      },
    });
    const { tail, exited } = watchChild(child, BIN, LOG);
    return { child, ws, http, tail, exited };
  });
}

async function waitReady(s) {
  let gone = null;
  s.exited.then((x) => { gone = x; });
  await eventually(`the server to listen on ${s.ws} and ${s.http}`, STARTUP_MS, async () => {
    if (gone) throw new Error(`server exited early: ${JSON.stringify(gone)}`);
    return (await canConnect(s.ws)) && (await canConnect(s.http)) ? true : undefined;
  }).catch((e) => {
    throw new Error(`${e.message}\nserver output:\n${s.tail.join('\n')}`);
  });
}

async function stopServer(s) {
  if (!s || s.child.pid === undefined || s.child.exitCode !== null || s.child.signalCode !== null) return;
  s.child.kill('SIGTERM');
  // It drains for up to shutdown_grace; do not let a hang keep the test run alive.
  const stopped = await within(8000, 'server exit', s.exited).catch(() => null);
  if (!stopped) {
    s.child.kill('SIGKILL');
    await s.exited;
  }
}

// ------------------------------------------------------------------ tests

// Last resort if the runner dies between spawn and after().
process.once('exit', () => server?.child.kill('SIGKILL'));

describe('merged batch codec', () => {
  test("pack matches the seed's worked example", () => {
    const pack1 = pack(['pack1']);
    assert.deepEqual([...pack1], [5, 0, 0, 0, 112, 97, 99, 107, 49]);
    const pack2 = pack(['i am pack2']);
    assert.deepEqual([...pack2], [10, 0, 0, 0, 105, 32, 97, 109, 32, 112, 97, 99, 107, 50]);
    const merged = pack(['pack1', 'i am pack2']);
    assert.deepEqual([...merged], [...pack1, ...pack2]);
    assert.deepEqual(unpack(merged).map(text), ['pack1', 'i am pack2']);
  });

  test('round trips bytes, UTF-8, empty messages and lengths past one byte', () => {
    const big = new Uint8Array(70000).map((_, i) => i % 251);
    const msgs = ['', 'héllo ✓', new Uint8Array([0, 255, 1]), 'x'.repeat(300), big];
    // 300 = 0x012c and 70000 = 0x011170: lengths the seed's getUint8 misread.
    assert.deepEqual([...pack(['x'.repeat(300)]).subarray(0, 4)], [0x2c, 0x01, 0, 0]);
    assert.deepEqual([...pack([big]).subarray(0, 4)], [0x70, 0x11, 0x01, 0]);
    const packed = pack(msgs);
    const out = unpack(packed);
    assert.equal(out.length, msgs.length);
    assert.equal(text(out[0]), '');
    assert.equal(text(out[1]), 'héllo ✓');
    assert.equal(out[1].byteLength, 10, 'lengths count UTF-8 bytes, not characters');
    assert.deepEqual([...out[2]], [0, 255, 1]);
    assert.equal(text(out[3]), 'x'.repeat(300));
    assert.deepEqual(out[4], big);
    assert.deepEqual(unpack(new Uint8Array(0)), []);
    assert.deepEqual([...pack([])], []);
  });

  test('reads a Buffer that is a slice of a larger ArrayBuffer', () => {
    // ws and protobuf.js hand out such slices: the offset must be honoured.
    const packed = pack(['ab', 'cde']);
    const backing = Buffer.alloc(packed.length + 10, 0xee);
    backing.set(packed, 7);
    const slice = backing.subarray(7, 7 + packed.length);
    assert.deepEqual(unpack(slice).map(text), ['ab', 'cde']);
    assert.deepEqual(unpack(packed.buffer).map(text), ['ab', 'cde']);
  });

  test('refuses truncated batches', () => {
    const packed = pack(['hello', 'world']);
    assert.throws(() => unpack(packed.subarray(0, packed.length - 1)), RangeError, 'short body');
    assert.throws(() => unpack(packed.subarray(0, 9 + 2)), /truncated length prefix/, 'short head');
    assert.throws(() => unpack(new Uint8Array([0xff, 0xff, 0xff, 0xff, 1])), /claims 4294967295 bytes/);
  });
});

describe('standalone server', () => {
  // The server is only needed here: the codec tests run without it.
  before(async () => {
    proto = await loadProtocol();
    server = await startServer();
    await waitReady(server);
  });

  after(async () => {
    try {
      await Promise.allSettled([...clients].map((c) => within(2000, 'close', c.close())));
    } finally {
      await stopServer(server);
    }
  });

  test('sign-in with a /tk token succeeds and heartbeat answers pong', async () => {
    const c = await connect();
    // Watch the raw Reply too: heartbeat() only proves a HEARTBEAT-typed reply came.
    const raw = [];
    c.ws.addEventListener('message', (ev) => raw.push(proto.Reply.decode(new Uint8Array(ev.data))));
    const err = await c.signIn(await token('alice'), room('lobby'));
    assert.deepEqual({ code: err.code, msg: err.msg }, { code: 0, msg: 'ok' });
    // The stream position fields are there, as Numbers (uint64 on the wire).
    for (const k of ['epoch', 'offset']) assert.equal(typeof err[k], 'number', k);
    assert.equal(typeof err.recovered, 'boolean');
    assert.equal(await c.heartbeat(), 'pong');
    assert.equal(raw.length, 2);
    assert.equal(raw[0].type, PackageType.UNKNOWN, 'sign-in answer is Reply{UNKNOWN, Err}');
    const first = proto.Err.decode(raw[0].data);
    assert.deepEqual({ code: first.code, msg: first.msg }, { code: 0, msg: 'ok' });
    assert.equal(raw[1].type, PackageType.HEARTBEAT);
    assert.equal(text(raw[1].data), 'pong');
    // Answers stay matched to requests when several are in flight.
    assert.deepEqual(await Promise.all([c.heartbeat(), c.heartbeat(), c.heartbeat()]), ['pong', 'pong', 'pong']);
    await closeAll([c]);
  });

  test('a room message reaches every session of the room and no other room', async () => {
    const r1 = room('fanout');
    const r2 = room('elsewhere');
    const a = await signedIn('ann', r1);
    const b = await signedIn('ben', r1);
    const c = await signedIn('cat', r2);

    a.c.send(r1, MsgLevel.NORMAL, `hello ${r1}`);
    const [atA, atB] = await Promise.all([
      a.box.until('the message at A (the sender gets its own)', (xs) => xs.length >= 1),
      b.box.until('the message at B', (xs) => xs.length >= 1),
    ]);
    for (const got of [atA, atB]) {
      assert.equal(got.length, 1);
      assert.equal(got[0].text, `hello ${r1}`);
      assert.equal(got[0].room, r1);
      assert.equal(got[0].level, MsgLevel.NORMAL);
    }

    // C's room gets a marker only after A and B had theirs: had the r1
    // message leaked to C, it would have come before the marker.
    c.c.send('', MsgLevel.NORMAL, 'marker'); // empty room id: the session's room
    await c.box.until('the marker at C', (xs) => xs.length >= 1);
    assert.deepEqual(c.box.texts(), ['marker']);
    assert.equal(c.box.items[0].room, r2);
    assert.equal(a.box.items.length, 1, 'the marker stays out of room r1');
    await closeAll([a.c, b.c, c.c]);
  });

  test('a quick burst arrives complete, in order, merged into multi-message batches', async (t) => {
    const r = room('burst');
    const a = await signedIn('amy', r);
    const b = await signedIn('bob', r);
    const stream = b.c.messages();
    const batches = [];
    b.c.on('batch', (x) => batches.push(x));

    const N = 50;
    const sent = Array.from({ length: N }, (_, i) => `burst ${i} ${'·'.repeat(i % 7)}`);
    // No awaiting between sends: the server gets them back to back; job
    // merges up to 32 per room within a window, and a writer that is behind
    // takes everything its session lacks in one frame (up to 64 KiB).
    for (const s of sent) a.c.send(r, MsgLevel.NORMAL, s);

    const received = [];
    await within(ANSWER_MS, `${N} messages at B`, (async () => {
      for await (const m of stream) {
        received.push(m);
        if (received.length === N) break;
      }
    })());
    assert.deepEqual(received.map((m) => text(m.data)), sent, 'all, in order, intact');
    assert.ok(received.every((m) => m.room === r && m.level === MsgLevel.NORMAL));

    // The per-message view and the per-frame view agree.
    assert.equal(batches.reduce((n, x) => n + x.messages.length, 0), N);
    assert.deepEqual(batches.flatMap((x) => x.messages.map(text)), sent);
    const sizes = batches.map((x) => x.messages.length);
    t.diagnostic(`messages per pushed frame: ${sizes.join(' ')}`);
    assert.ok(Math.max(...sizes) > 1, `expected a merged Reply carrying several messages, got frame sizes ${sizes}`);
    for (const m of received) {
      assert.equal(m.batchSize, batches[m.batch - 1].messages.length);
    }
    await closeAll([a.c, b.c]);
  });

  test('works with ArrayBuffer frames, as browsers deliver them', async () => {
    // Browsers hand binary frames over as ArrayBuffer (binaryType
    // 'arraybuffer'), ws as Buffer; the client must read both.
    class BrowserLike extends WebSocket {
      constructor(url) {
        super(url);
        this.binaryType = 'arraybuffer';
      }
    }
    const r = room('arraybuffer');
    const a = await signedIn('abe', r, { WebSocket: BrowserLike });
    const frames = [];
    a.c.ws.addEventListener('message', (ev) => frames.push(ev.data));
    assert.equal(await a.c.heartbeat(), 'pong');
    a.c.send(r, MsgLevel.NORMAL, 'über');
    const [m] = await a.box.until('the message', (xs) => xs.length >= 1);
    assert.equal(m.text, 'über');
    assert.ok(frames.length >= 2 && frames.every((f) => f instanceof ArrayBuffer), 'frames really were ArrayBuffers');
    await closeAll([a.c]);
  });

  test('MEMBERS counts the sessions of the room', async () => {
    const r = room('members');
    const other = room('members-other');
    const m1 = await signedIn('m1', r);
    const m2 = await signedIn('m2', r);
    const o = await signedIn('o1', other);
    // Counts come from a periodic report, so ask until the expected number
    // shows (or the deadline passes).
    const expect = (c, n, what) =>
      eventually(`MEMBERS = ${n} (${what})`, ANSWER_MS, async (seen) => {
        const got = await c.members();
        seen(got);
        return got === n ? got : undefined;
      }, 100);

    await expect(m1.c, 2, 'two sessions');
    const m3 = await signedIn('m1', r); // same uid twice: a session counts, not a user
    await expect(m2.c, 3, 'a third session joined');
    // Until logic has answered a report for the room, conn answers its own
    // count; after, the cached cluster total. Keep asking across a few
    // report periods so the cached path is checked too.
    const until = Date.now() + 4 * REPORT_MS;
    while (Date.now() < until) assert.equal(await m3.c.members(), 3, 'stable across reports');
    await expect(o.c, 1, 'the other room is counted apart');
    await closeAll([m2.c]);
    await expect(m3.c, 2, 'one session left');
    assert.equal(await m1.c.members(), 2);
    await closeAll([m1.c, m3.c, o.c]);
  });

  test('POST /msg pushes to the room as IMPORTANT', async () => {
    const r = room('http');
    const a = await signedIn('ivy', r);
    const body = JSON.stringify({ type: 1, content: 'red packet' });
    const reply = await postJson('/msg', { room_id: r, msg: body }, { Authorization: await token('ops') });
    assert.equal(reply.code, 1, JSON.stringify(reply));
    const [m] = await a.box.until('the HTTP message', (xs) => xs.length >= 1);
    assert.equal(m.text, body);
    assert.equal(m.room, r);
    assert.equal(m.level, MsgLevel.IMPORTANT);

    const refused = await postJson('/msg', { room_id: r, msg: 'x' }, { Authorization: 'not-a-token' });
    assert.equal(refused.code, 1001, JSON.stringify(refused));
    await closeAll([a.c]);
  });

  test('the client recovers by offset after the server side drops its socket', async () => {
    // A TCP proxy between client and server stands in for a network drop:
    // the test cuts the connection, refuses new ones while messages are
    // published, then lets the client back in.
    const r = room('recover');
    let accepting = true;
    const live = new Set();
    const proxy = net.createServer((downstream) => {
      if (!accepting) { downstream.destroy(); return; }
      const upstream = net.connect(server.ws, '127.0.0.1');
      live.add(downstream);
      live.add(upstream);
      downstream.pipe(upstream);
      upstream.pipe(downstream);
      const done = () => { downstream.destroy(); upstream.destroy(); live.delete(downstream); live.delete(upstream); };
      downstream.on('error', done).on('close', done);
      upstream.on('error', done).on('close', done);
    });
    proxy.listen(0, '127.0.0.1');
    await once(proxy, 'listening');
    const c = new RoomClient(proto, { timeoutMs: ANSWER_MS, reconnect: { baseMs: 50, maxMs: 200 } });
    clients.add(c);
    const box = inbox(c);
    await c.connect(`ws://127.0.0.1:${proxy.address().port}/room`);
    const first = await c.signIn(await token('rita'), r);
    assert.equal(first.code, ErrCode.OK);
    const ops = await token('ops');
    const say = async (msg) => {
      const reply = await postJson('/msg', { room_id: r, msg }, { Authorization: ops });
      assert.equal(reply.code, 1, JSON.stringify(reply));
    };
    await say('before');
    await box.until('the first message', (xs) => xs.length === 1);
    const before = c.position(r);
    assert.ok(before?.epoch > 0 && before.offset > 0, `a stream position: ${JSON.stringify(before)}`);

    accepting = false;
    const dropped = nextEvent(c, 'reconnecting');
    for (const sock of live) sock.destroy();
    await dropped;
    // A second session, connected directly, sees these arrive: they are in
    // the room's stream while the first is away.
    const watcher = await signedIn('walt', r);
    for (let i = 0; i < 5; i++) await say(`missed-${i}`);
    await watcher.box.until('the five messages', (xs) => xs.length === 5);

    const back = nextEvent(c, 'reconnected', () => true, 10000);
    accepting = true;
    const { answer } = await back;
    assert.equal(answer.recovered, true, `sign-in answer: ${JSON.stringify(answer)}`);
    const got = await box.until('the missed messages', (xs) => xs.length >= 6);
    assert.deepEqual(got.map((m) => m.text), ['before', 'missed-0', 'missed-1', 'missed-2', 'missed-3', 'missed-4']);
    assert.deepEqual(got.map((m) => m.offset), [0, 1, 2, 3, 4, 5].map((i) => before.offset + i), 'consecutive offsets, none twice');
    await say('after');
    const all = await box.until('a live message after recovery', (xs) => xs.length >= 7);
    assert.equal(all[6].text, 'after');
    assert.equal(all.length, 7, 'nothing more');
    await closeAll([c, watcher.c]);
    proxy.close();
  });

  test('a bad token is refused with Err 100 and the socket closes', async () => {
    const c = await connect();
    const closed = nextEvent(c, 'close');
    const err = await c.signIn('not.a.token', room('refused'));
    assert.equal(err.code, ErrCode.LOGIN_NEEDED, JSON.stringify(err));
    assert.equal((await closed).code, 1008);
    clients.delete(c);
  });

  test('bad frames after sign-in get an Err and the session keeps working', async () => {
    const r = room('errors');
    const a = await signedIn('eve', r);
    const errs = [];
    a.c.on('err', (e) => errs.push(e));
    const nextErr = () => nextEvent(a.c, 'err');

    // A Req whose bytes field claims 16 bytes but has 2: not decodable.
    let got = nextErr();
    a.c.sendRaw(new Uint8Array([0x12, 0x10, 0x01, 0x02]));
    assert.equal((await got).code, ErrCode.BAD_REQUEST);
    assert.equal(await a.c.heartbeat(), 'pong', 'still served after a malformed frame');

    got = nextErr();
    a.c.sendReq(42);
    assert.equal((await got).code, ErrCode.UNKNOWN_TYPE, 'a type outside the enum');
    got = nextErr();
    a.c.sendReq(PackageType.UNKNOWN);
    assert.equal((await got).code, ErrCode.UNKNOWN_TYPE, 'UNKNOWN is for answers only');

    got = nextErr();
    a.c.send(room('not-mine'), MsgLevel.NORMAL, 'x');
    assert.equal((await got).code, ErrCode.FORBIDDEN, 'a room the session is not in');

    got = nextErr();
    a.c.ws.send('a text frame');
    assert.equal((await got).code, ErrCode.BAD_REQUEST, 'text frames are refused');

    got = nextErr();
    a.c.sendReq(PackageType.SIGN_IN, proto.SignIn.encode({ token: await token('eve'), roomID: r }).finish());
    assert.equal((await got).code, ErrCode.CONFLICT, 'a second sign-in');

    // Still a member of its room: its own message comes back.
    a.c.send(r, MsgLevel.NORMAL, 'still here');
    await a.box.until('the message after the errors', (xs) => xs.some((m) => m.text === 'still here'));
    assert.equal(await a.c.heartbeat(), 'pong');
    assert.equal(a.c.closed, null);
    assert.deepEqual(errs.map((e) => e.code), [400, 404, 404, 403, 400, 409]);
    await closeAll([a.c]);
  });

  test('room.html: its script parses, and serve.mjs serves what it loads and forwards /tk', async () => {
    const html = await readFile(path.join(webDir, 'room.html'), 'utf8');
    const script = html.match(/<script type="module">([\s\S]*?)<\/script>/)?.[1];
    assert.ok(script, 'room.html has an inline module script');
    // Syntax only (node --check does not resolve imports or run anything).
    const dir = await mkdtemp(path.join(tmpdir(), 'room-html-'));
    try {
      await writeFile(path.join(dir, 'room.mjs'), script);
      await promisify(execFile)(process.execPath, ['--check', path.join(dir, 'room.mjs')]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }

    const dev = spawn(process.execPath, [path.join(webDir, 'serve.mjs')], {
      env: { ...process.env, PORT: '0', CHATROOM_HTTP: `http://127.0.0.1:${server.http}` },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    try {
      // It prints its address once listening: wait for that line, not a while.
      const base = await within(ANSWER_MS, 'serve.mjs to listen', (async () => {
        let out = '';
        for await (const chunk of dev.stdout) {
          out += chunk;
          const m = out.match(/serving (http:\/\/[\d.]+:\d+)/);
          if (m) return m[1];
        }
        throw new Error(`serve.mjs ended: ${out}`);
      })());
      const page = new URL('/web/room.html', base);
      const get = (rel, from = page) => fetch(new URL(rel, from));
      // What the page loads, resolved as a browser would.
      for (const rel of ['room.html', ...Array.from(html.matchAll(/src="([^"]+)"/g), (m) => m[1]), './lib/chatroom.mjs']) {
        const res = await get(rel);
        assert.equal(res.status, 200, `${rel} from the page`);
        await res.arrayBuffer();
      }
      // lib/chatroom.mjs's default .proto location, relative to itself.
      const proto = await get('../../api/protocol.proto', new URL('lib/chatroom.mjs', page));
      assert.match(await proto.text(), /message BroadcastRoomReq/);
      // %2F keeps fetch from resolving the '..' itself: the server must.
      assert.equal((await get('/web/..%2F..%2FCargo.toml')).status, 404, 'nothing outside web/ and api/');
      assert.equal((await get('/crates/conn/src/lib.rs')).status, 404);

      const tk = await fetch(new URL('/tk', base), {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ uid: 'page' }),
      }).then((res) => res.json());
      assert.equal(tk.code, 1, JSON.stringify(tk));
    } finally {
      dev.kill();
      if (dev.exitCode === null && dev.signalCode === null) await once(dev, 'exit');
    }
  });
});
