// The IM page's client (lib/im.mjs) end to end against the standalone
// server, how lib/im-render.mjs shows each media type, and the pages logic
// serves (chat.html and everything it loads).
//
//   cd web && npm ci && CHATROOM_BIN=../target/debug/chatroom node --test test/
//
// The server runs on free ports with its database and uploads in a
// temporary folder (nothing under ./data is touched).
// CHATROOM_BIN: the server binary (default ../target/debug/chatroom from web/).
// CHATROOM_TEST_LOG=1: copy the server's log to stderr.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { randomInt } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { Build, ChatSocket, Cmd, ImApi, ImError, LOGIN_NEEDED, Media, defaultWsUrl } from '../lib/im.mjs';
import { EMOJI_BUTTONS, formatTime, renderBody, safeUrl, yuan } from '../lib/im-render.mjs';
import { canConnect, delay, eventually, freePorts, watchChild, within } from './support.mjs';

const webDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.resolve(webDir, process.env.CHATROOM_BIN ?? '../target/debug/chatroom');
const LOG = process.env.CHATROOM_TEST_LOG === '1';

const STARTUP_MS = 15000;
const ANSWER_MS = 5000;

// A 1×1 PNG and a short WAV: uploads are checked by their first bytes.
const PNG = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==', 'base64');
function wav() {
  const b = Buffer.alloc(44 + 800);
  b.write('RIFF', 0);
  b.writeUInt32LE(b.length - 8, 4);
  b.write('WAVEfmt ', 8);
  b.writeUInt32LE(16, 16);
  b.writeUInt16LE(1, 20); // PCM
  b.writeUInt16LE(1, 22); // mono
  b.writeUInt32LE(8000, 24);
  b.writeUInt32LE(8000, 28);
  b.writeUInt16LE(1, 32);
  b.writeUInt16LE(8, 34);
  b.write('data', 36);
  b.writeUInt32LE(800, 40);
  return b;
}

// ---------------------------------------------------------------- helpers

/** Records a socket's events of `name` from now on; `until` waits (woken by each arrival) for a condition. */
function record(sock, name = 'message') {
  const items = [];
  const waiters = new Set();
  sock.on(name, (m) => {
    items.push(m);
    for (const w of waiters) w();
  });
  return {
    items,
    until(what, pred, ms = ANSWER_MS) {
      let wake;
      const met = new Promise((resolve) => {
        wake = () => {
          const hit = pred(items);
          if (hit) resolve(hit);
        };
        waiters.add(wake);
        wake();
      });
      return within(ms, `${what} (last: ${JSON.stringify(items.slice(-3))})`, met).finally(() => waiters.delete(wake));
    },
    /** The first recorded item with this id. */
    byId(id, what = `message ${id}`) {
      return this.until(what, (xs) => xs.find((m) => m.id === id));
    },
  };
}

// ------------------------------------------------------- server lifecycle

let server; // {child, ws, http, tail, exited, dir}
const sockets = new Set();

async function startServer() {
  const [ws, http] = await freePorts(2);
  const dir = await mkdtemp(path.join(tmpdir(), 'chatroom-im-test-'));
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
      // Cheap password hashes (argon2 is slow in a debug build); no rate
      // limits (this test is not about them, and probes offline state).
      CHATROOM__LOGIC__IM__PASSWORD_MEMORY_KIB: '256',
      CHATROOM__LOGIC__IM__PASSWORD_ITERATIONS: '1',
      CHATROOM__LOGIC__IM__CHAT_RATE_PER_SEC: '0',
      CHATROOM__LOGIC__IM__API_RATE_PER_SEC: '0',
      NO_COLOR: '1',
    },
  });
  const { tail, exited } = watchChild(child, BIN, LOG);
  const s = { child, ws, http, tail, exited, dir };
  let gone = null;
  exited.then((x) => { gone = x; });
  await eventually(`the server to listen on ${ws} and ${http}`, STARTUP_MS, async () => {
    if (gone) throw new Error(`server exited early: ${JSON.stringify(gone)}`);
    return (await canConnect(ws)) && (await canConnect(http)) ? true : undefined;
  }).catch(async (e) => {
    child.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
    throw new Error(`${e.message}\nserver output:\n${tail.join('\n')}`);
  });
  return s;
}

async function stopServer(s) {
  if (!s) return;
  if (s.child.pid !== undefined && s.child.exitCode === null && s.child.signalCode === null) {
    s.child.kill('SIGTERM');
    const stopped = await within(8000, 'server exit', s.exited).catch(() => null);
    if (!stopped) {
      s.child.kill('SIGKILL');
      await s.exited;
    }
  }
  await rm(s.dir, { recursive: true, force: true });
}

const base = () => `http://127.0.0.1:${server.http}`;
const wsUrl = () => `ws://127.0.0.1:${server.ws}/chat`;

// Mobile numbers unique per run.
const run = randomInt(1e6, 1e7 - 1);
let nextUser = 0;

/** A registered, logged-in user: {api, id, token, nickname}. */
async function user(nickname) {
  const api = new ImApi({ base: base() });
  const mobile = `13${run}${String(nextUser++).padStart(2, '0')}`;
  const u = await api.register({ mobile, passwd: 'secret-pw', nickname });
  assert.equal(u.nickname, nickname);
  assert.equal(u.passwd, undefined, 'no password (hash) in answers');
  const me = await api.login(mobile, 'secret-pw');
  assert.equal(me.id, u.id);
  assert.equal(typeof me.token, 'string');
  assert.equal(api.token, me.token, 'login keeps the token');
  return { api, id: me.id, token: me.token, nickname, mobile };
}

/** A connected socket for `u` (closed after the tests), recording messages and acks. */
async function online(u, opts = {}) {
  const sock = new ChatSocket({ url: wsUrl(), id: u.id, token: u.token, timeoutMs: ANSWER_MS, ...opts });
  sockets.add(sock);
  const inbox = record(sock, 'message');
  const welcome = await sock.connect();
  assert.equal(welcome.cmd, Cmd.WELCOME);
  assert.equal(welcome.userid, String(u.id));
  return { sock, inbox };
}

async function offline(sock) {
  sockets.delete(sock);
  await within(ANSWER_MS, 'a socket to close', sock.close());
}

// ---------------------------------------------------------------- tests

process.once('exit', () => server?.child.kill('SIGKILL'));

describe('im-render', () => {
  // A stand-in document: elements record attributes and children; text
  // nodes are plain strings. Rendering may only use these calls.
  class Elem {
    constructor(tag) {
      this.tagName = tag;
      this.attributes = {};
      this.childNodes = [];
      this.className = '';
    }
    setAttribute(k, v) { this.attributes[k] = String(v); }
    append(...nodes) { this.childNodes.push(...nodes); }
    get textContent() { return this.childNodes.map((c) => c.textContent).join(''); }
  }
  const doc = { createElement: (t) => new Elem(t), createTextNode: (t) => ({ text: true, textContent: String(t) }) };
  const page = 'http://chat.example:8081/web/chat.html';
  const all = (e) => (e.text ? [] : [e, ...e.childNodes.flatMap(all)]);
  const tags = (e) => all(e).map((x) => x.tagName);
  const find = (e, tag) => all(e).find((x) => x.tagName === tag);
  const EVIL = '<img src=x onerror=alert(1)><script>alert(2)</script>';

  test('every media type has its own rendering', () => {
    const up = '/attach/files/0123456789abcdef0123456789abcdef.png';
    let e = renderBody(doc, { media: Media.TEXT, content: 'hi\nthere' }, page);
    assert.equal(e.tagName, 'p');
    assert.equal(e.textContent, 'hi\nthere');

    e = renderBody(doc, { media: Media.NEWS, content: 'Title', url: 'https://n.example/a', pic: 'https://n.example/p.jpg', memo: 'about' }, page);
    assert.equal(e.tagName, 'a');
    assert.equal(e.attributes.href, 'https://n.example/a');
    assert.equal(e.attributes.rel, 'noopener noreferrer');
    assert.equal(find(e, 'img').attributes.src, 'https://n.example/p.jpg');
    assert.match(e.textContent, /Title.*about/);

    e = renderBody(doc, { media: Media.VOICE, url: '/attach/files/0123456789abcdef0123456789abcdef.webm', amount: 7 }, page);
    assert.equal(find(e, 'audio').attributes.src, 'http://chat.example:8081/attach/files/0123456789abcdef0123456789abcdef.webm');
    assert.equal(find(e, 'audio').attributes.controls, '');
    assert.match(e.textContent, /7″/);

    e = renderBody(doc, { media: Media.IMAGE, url: up }, page);
    assert.deepEqual(tags(e), ['a', 'img']);
    assert.equal(find(e, 'img').attributes.src, `http://chat.example:8081${up}`);

    e = renderBody(doc, { media: Media.RED_PACKET, amount: 300, memo: '恭喜发财' }, page);
    assert.match(e.textContent, /¥3\.00/);
    assert.match(e.textContent, /恭喜发财/);

    e = renderBody(doc, { media: Media.EMOJI, content: 'cry' }, page);
    assert.equal(e.textContent, '😢', 'the seed sends emoji by name');
    assert.equal(renderBody(doc, { media: Media.EMOJI, content: '🎉' }, page).textContent, '🎉');

    e = renderBody(doc, { media: Media.LINK, url: 'http://a.example/x.html' }, page);
    assert.equal(find(e, 'a').attributes.href, 'http://a.example/x.html');
    assert.equal(e.textContent, 'http://a.example/x.html');

    e = renderBody(doc, { media: Media.VIDEO, url: 'https://v.example/a.mp4', pic: 'https://v.example/p.jpg' }, page);
    assert.equal(e.tagName, 'video');
    assert.equal(e.attributes.src, 'https://v.example/a.mp4');
    assert.equal(e.attributes.poster, 'https://v.example/p.jpg');

    e = renderBody(doc, { media: Media.CONTACT, content: '10086', memo: '胡大力', pic: 'https://a.example/avatar.jpg' }, page);
    assert.match(e.textContent, /胡大力.*10086/);

    e = renderBody(doc, { media: Media.USER_DEFINED, content: '{"type":"poll","q":"lunch?"}' }, page);
    assert.equal(find(e, 'pre').textContent, JSON.stringify({ type: 'poll', q: 'lunch?' }, null, 2));
    assert.equal(renderBody(doc, { media: Media.USER_DEFINED, content: 'plain' }, page).textContent, 'plain');

    e = renderBody(doc, { media: 77, content: 'x' }, page);
    assert.match(e.textContent, /\[media 77\]/);
  });

  test('user content stays text and unsafe links are not linked', () => {
    for (const media of [1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 55]) {
      const m = { media, content: EVIL, memo: EVIL, url: 'javascript:alert(1)', pic: 'data:text/html,<b>x</b>', amount: 1 };
      const e = renderBody(doc, m, page);
      for (const x of all(e)) {
        for (const [k, v] of Object.entries(x.attributes)) {
          assert.doesNotMatch(v, /^\s*(javascript|data|vbscript):/i, `media ${media}: ${x.tagName} ${k}=${v}`);
          assert.ok(!k.startsWith('on'), `media ${media}: no event handler attributes`);
        }
        assert.ok(['p', 'div', 'span', 'strong', 'a', 'img', 'audio', 'video', 'pre'].includes(x.tagName), x.tagName);
      }
    }
    assert.equal(safeUrl('javascript:alert(1)', page), null);
    assert.equal(safeUrl(' JAVASCRIPT:alert(1)', page), null);
    assert.equal(safeUrl('data:image/png;base64,xx', page), null);
    assert.equal(safeUrl('//evil.example/x.png', page), 'http://evil.example/x.png');
    assert.equal(safeUrl('/attach/files/a.png', page), 'http://chat.example:8081/attach/files/a.png');
    assert.equal(safeUrl('', page), null);
    assert.equal(safeUrl(undefined, page), null);
  });

  test('amounts, times, emoji buttons, default socket address', () => {
    assert.equal(yuan(300), '¥3.00');
    assert.equal(yuan(5), '¥0.05');
    assert.equal(yuan(123456), '¥1234.56');
    const now = new Date(2024, 4, 1, 14, 5).getTime();
    assert.equal(formatTime(now, now), '14:05');
    assert.equal(formatTime(now, now + 2 * 86400000), '2024-05-01 14:05');
    assert.equal(formatTime(0), '');
    assert.ok(EMOJI_BUTTONS.length >= 4);
    assert.equal(defaultWsUrl({ protocol: 'http:', hostname: 'chat.example' }), 'ws://chat.example:8080/chat');
    assert.equal(defaultWsUrl({ protocol: 'https:', hostname: 'chat.example' }), 'wss://chat.example:8080/chat');
    assert.deepEqual(Build.voice('/x', 2.2), { media: Media.VOICE, url: '/x', amount: 3 });
    assert.deepEqual(Build.voice('/x', 0), { media: Media.VOICE, url: '/x', amount: 1 });
  });

  test('the page code never writes HTML', async () => {
    for (const f of ['chat.mjs', 'lib/im-render.mjs', 'lib/im.mjs']) {
      const src = await readFile(path.join(webDir, f), 'utf8');
      assert.doesNotMatch(src, /innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function/, f);
    }
  });
});

describe('standalone server: IM', () => {
  before(async () => {
    server = await startServer();
  });

  after(async () => {
    try {
      await Promise.allSettled([...sockets].map((s) => within(2000, 'close', s.close())));
    } finally {
      await stopServer(server);
    }
  });

  test('logic serves the pages, and what they load', async () => {
    const home = await fetch(`${base()}/`, { redirect: 'manual' });
    assert.ok(home.status >= 300 && home.status < 400, `GET / -> ${home.status}`);
    assert.equal(home.headers.get('location'), '/web/chat.html');

    const pageUrl = new URL('/web/chat.html', base());
    const res = await fetch(pageUrl);
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-type'), 'text/html; charset=utf-8');
    const html = await res.text();
    assert.equal(html, await readFile(path.join(webDir, 'chat.html'), 'utf8'));

    // Scripts: inline module scripts and module files must parse.
    const dir = await mkdtemp(path.join(tmpdir(), 'chat-html-'));
    try {
      const inline = [...html.matchAll(/<script\b[^>]*>([\s\S]*?)<\/script>/g)].map((m) => m[1]).filter((s) => s.trim());
      for (const [i, code] of inline.entries()) {
        const f = path.join(dir, `inline${i}.mjs`);
        await writeFile(f, code);
        await promisify(execFile)(process.execPath, ['--check', f]);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }

    // Everything the page links, and the modules they import, as a browser resolves them.
    const wanted = [...html.matchAll(/\b(?:src|href)="([^"]+)"/g)].map((m) => new URL(m[1], pageUrl));
    assert.ok(wanted.some((u) => u.pathname === '/web/chat.mjs'), 'the page script');
    assert.ok(wanted.some((u) => u.pathname === '/web/chat.css'), 'the style sheet');
    const seen = new Set();
    while (wanted.length) {
      const u = wanted.shift();
      if (seen.has(u.href)) continue;
      seen.add(u.href);
      const r = await fetch(u);
      assert.equal(r.status, 200, u.pathname);
      const body = await r.text();
      if (u.pathname.endsWith('.mjs')) {
        assert.equal(r.headers.get('content-type'), 'text/javascript; charset=utf-8', u.pathname);
        const file = path.join(webDir, u.pathname.replace(/^\/web\//, ''));
        await promisify(execFile)(process.execPath, ['--check', file]);
        for (const m of body.matchAll(/^import\s[^'"]*['"](\.[^'"]+)['"]/gm)) wanted.push(new URL(m[1], u));
      } else if (u.pathname.endsWith('.css')) {
        assert.equal(r.headers.get('content-type'), 'text/css; charset=utf-8');
      }
    }
    assert.ok(seen.has(new URL('/web/lib/im.mjs', base()).href), `imports followed: ${[...seen]}`);

    // The room page works from logic too: protobuf.js and the .proto.
    const room = new URL('/web/room.html', base());
    assert.equal((await fetch(room)).status, 200);
    const pb = await fetch(new URL('vendor/protobuf.min.js', room));
    assert.equal(pb.status, 200);
    assert.equal(pb.headers.get('content-type'), 'text/javascript; charset=utf-8');
    assert.match(await pb.text(), /protobuf\.js v7/);
    const proto = await fetch(new URL('../../api/protocol.proto', new URL('lib/chatroom.mjs', room)));
    assert.equal(proto.status, 200);
    assert.match(await proto.text(), /message BroadcastRoomReq/);
    // And nothing else.
    for (const p of ['/web/..%2F..%2FCargo.toml', '/web/%2e%2e/Cargo.toml', '/web/package.json', '/web/node_modules/ws/index.js', '/web/node_modules/protobufjs/dist/protobuf.min.js', '/api/..%2fCargo.toml']) {
      const r = await fetch(`${base()}${p}`);
      assert.equal(r.status, 404, p);
      assert.equal((await r.json()).msg, 'not found', p);
    }
  });

  test('accounts, friends, 1:1 text, image and voice both ways, history', async () => {
    const [ann, bob] = await Promise.all([user('Ann'), user('Bob')]);

    // Failures come back as ImError with the server's code and status.
    const wrong = await new ImApi({ base: base() }).login(ann.mobile, 'not-the-pw').catch((e) => e);
    assert.ok(wrong instanceof ImError);
    assert.equal(wrong.code, 401);
    assert.equal(wrong.status, 401);
    const anon = await new ImApi({ base: base() }).friends().catch((e) => e);
    assert.equal(anon.code, LOGIN_NEEDED);
    const nowhere = await ann.api.call('/no/such/route').catch((e) => e);
    assert.equal(nowhere.status, 404, 'an error status is an error whatever the code');

    assert.equal((await ann.api.find(bob.id)).nickname, 'Bob');
    const friend = await ann.api.addFriend(bob.id);
    assert.equal(friend.id, bob.id);
    assert.deepEqual((await ann.api.friends()).map((f) => f.id), [bob.id]);
    assert.deepEqual((await bob.api.friends()).map((f) => f.id), [ann.id], 'friends both ways, as in the seed');
    assert.equal((await ann.api.addFriend(bob.id).catch((e) => e)).code, 409);

    const a = await online(ann);
    const b = await online(bob);
    assert.equal(await a.sock.heartbeat(), 'pong');

    // Text, A -> B: acked as delivered, pushed to B and back to A.
    const ack1 = await a.sock.send({ cmd: Cmd.SINGLE, dstid: bob.id, ...Build.text('你好 <b>Bob</b>') });
    assert.equal(ack1.cmd, Cmd.ACK);
    assert.equal(ack1.status, 'delivered');
    assert.equal(ack1.content, 'success send');
    assert.equal(ack1.dstid, bob.id);
    assert.ok(Number.isSafeInteger(ack1.id) && ack1.id > 0);
    const got1 = await b.inbox.byId(ack1.id);
    assert.deepEqual(
      { userid: got1.userid, dstid: got1.dstid, cmd: got1.cmd, media: got1.media, content: got1.content },
      { userid: ann.id, dstid: bob.id, cmd: Cmd.SINGLE, media: Media.TEXT, content: '你好 <b>Bob</b>' },
    );
    assert.ok(got1.createat > 0);
    await a.inbox.byId(ack1.id, 'the sender\'s own copy');

    // Image, A -> B, after an upload.
    const imgUrl = await ann.api.upload(new Blob([PNG]), { filename: 'dot.png' });
    assert.match(imgUrl, /^\/attach\/files\/[0-9a-f]{32}\.png$/);
    const img = await fetch(`${base()}${imgUrl}`);
    assert.equal(img.headers.get('content-type'), 'image/png');
    assert.deepEqual(Buffer.from(await img.arrayBuffer()), PNG);
    const ack2 = await a.sock.send({ cmd: Cmd.SINGLE, dstid: bob.id, ...Build.image(imgUrl) });
    assert.equal(ack2.status, 'delivered');
    const got2 = await b.inbox.byId(ack2.id);
    assert.deepEqual([got2.media, got2.url], [Media.IMAGE, imgUrl]);

    // B -> A: text, image (its own upload) and a voice message.
    const ack3 = await b.sock.send({ cmd: Cmd.SINGLE, dstid: ann.id, ...Build.text('hi Ann') });
    assert.equal(ack3.status, 'delivered');
    assert.equal((await a.inbox.byId(ack3.id)).content, 'hi Ann');
    const bobImg = await bob.api.upload(new Blob([PNG], { type: 'image/png' }), { filetype: '.png' });
    const ack4 = await b.sock.send({ cmd: Cmd.SINGLE, dstid: ann.id, ...Build.image(bobImg) });
    assert.equal(ack4.status, 'delivered');
    assert.equal((await a.inbox.byId(ack4.id)).url, bobImg);
    const voiceUrl = await bob.api.upload(new Blob([wav()]), { filename: 'v.wav' });
    assert.match(voiceUrl, /\.wav$/);
    const ack5 = await b.sock.send({ cmd: Cmd.SINGLE, dstid: ann.id, ...Build.voice(voiceUrl, 2.2) });
    const got5 = await a.inbox.byId(ack5.id);
    assert.deepEqual([got5.media, got5.url, got5.amount], [Media.VOICE, voiceUrl, 3]);
    const ack6 = await b.sock.send({ cmd: Cmd.SINGLE, dstid: ann.id, ...Build.emoji('🎉') });
    assert.equal((await a.inbox.byId(ack6.id)).media, Media.EMOJI);
    // The other media types go through too.
    for (const fields of [
      Build.redPacket(888, '恭喜发财'),
      Build.link('https://example.com/x'),
      Build.news('Title', 'https://example.com/n', { memo: 'desc' }),
      Build.video('https://example.com/v.mp4'),
      Build.contact(ann.id, 'Ann'),
      Build.custom({ kind: 'poll' }),
    ]) {
      const ack = await a.sock.send({ cmd: Cmd.SINGLE, dstid: bob.id, ...fields });
      const got = await b.inbox.byId(ack.id);
      assert.equal(got.media, fields.media);
    }

    // History: newest first, paged with `before`.
    const ids = [ack1.id, ack2.id, ack3.id, ack4.id, ack5.id, ack6.id];
    const page1 = await ann.api.history(bob.id, Cmd.SINGLE, { limit: 100 });
    assert.deepEqual(page1.map((m) => m.id).filter((id) => ids.includes(id)), [...ids].reverse());
    assert.equal(page1.length, 12);
    const newest = await bob.api.history(ann.id, Cmd.SINGLE, { limit: 4 });
    const older = await bob.api.history(ann.id, Cmd.SINGLE, { limit: 4, before: newest.at(-1).id });
    assert.deepEqual([...newest, ...older].map((m) => m.id), page1.slice(0, 8).map((m) => m.id), 'same conversation from both sides');
    assert.ok(older.every((m) => m.id < newest.at(-1).id));

    await offline(a.sock);
    await offline(b.sock);
  });

  test('refusals: a non-friend, a bad message, a community not joined, a bad token', async () => {
    const [cat, dan] = await Promise.all([user('Cat'), user('Dan')]);
    const c = await online(cat);
    const refused = record(c.sock, 'refused');

    const notFriend = await c.sock.send({ cmd: Cmd.SINGLE, dstid: dan.id, ...Build.text('hello?') }).catch((e) => e);
    assert.ok(notFriend instanceof ImError, String(notFriend));
    assert.equal(notFriend.code, 403);
    assert.match(notFriend.message, /friends/);
    const frame = await refused.until('the cmd 21 frame', (xs) => xs.find((m) => m.cid === notFriend.cid));
    assert.deepEqual([frame.cmd, frame.code], [Cmd.ERROR, 403]);

    const empty = await c.sock.send({ cmd: Cmd.SINGLE, dstid: dan.id, media: Media.TEXT }).catch((e) => e);
    assert.equal(empty.code, 400);
    const group = await c.sock.send({ cmd: Cmd.COMMUNITY, dstid: 424242, ...Build.text('x') }).catch((e) => e);
    assert.equal(group.code, 403);
    const script = await c.sock.send({ cmd: Cmd.SINGLE, dstid: dan.id, ...Build.image('javascript:alert(1)') }).catch((e) => e);
    assert.equal(script.code, 400, 'links must be http(s) or uploads');
    assert.equal(await c.sock.heartbeat(), 'pong', 'refusals leave the socket working');

    // A bad token: refused, and not retried.
    const bad = new ChatSocket({ url: wsUrl(), id: dan.id, token: 'not.a.token', timeoutMs: ANSWER_MS });
    sockets.add(bad);
    const states = record(bad, 'state');
    const err = await bad.connect().catch((e) => e);
    assert.ok(err instanceof ImError);
    assert.equal(err.code, LOGIN_NEEDED);
    await states.until('the closed state', (xs) => xs.find((s) => s.state === 'closed'));
    assert.equal(bad.wanted, false, 'no reconnecting with a refused token');
    sockets.delete(bad);

    // Not connected: refused at once.
    const closed = new ChatSocket({ url: wsUrl(), id: cat.id, token: cat.token });
    assert.equal((await closed.send({ cmd: Cmd.SINGLE, dstid: 1, ...Build.text('x') }).catch((e) => e)).code, -1);
    await offline(c.sock);
  });

  test('communities: create, join, message both ways', async () => {
    const [eve, fay] = await Promise.all([user('Eve'), user('Fay')]);
    const e = await online(eve);
    const f = await online(fay);
    const com = await eve.api.createCommunity({ name: `room ${run}`, memo: 'test' });
    assert.ok(com.id > 0);
    assert.equal(com.owner, eve.id);
    assert.deepEqual((await eve.api.communities()).map((x) => x.id), [com.id]);
    assert.deepEqual(await fay.api.communities(), []);
    const joined = await fay.api.joinCommunity(com.id);
    assert.equal(joined.id, com.id);
    assert.deepEqual((await fay.api.communities()).map((x) => x.id), [com.id]);

    // Joined while online: the live session is in the room without reconnecting.
    const ack1 = await e.sock.send({ cmd: Cmd.COMMUNITY, dstid: com.id, ...Build.text('welcome Fay') });
    assert.equal(ack1.status, 'delivered');
    const got1 = await f.inbox.byId(ack1.id);
    assert.deepEqual([got1.cmd, got1.dstid, got1.userid, got1.content], [Cmd.COMMUNITY, com.id, eve.id, 'welcome Fay']);
    const pic = await fay.api.upload(new Blob([PNG]), { filename: 'p.png' });
    const ack2 = await f.sock.send({ cmd: Cmd.COMMUNITY, dstid: com.id, ...Build.image(pic) });
    const got2 = await e.inbox.byId(ack2.id);
    assert.deepEqual([got2.cmd, got2.media, got2.url], [Cmd.COMMUNITY, Media.IMAGE, pic]);
    const hist = await fay.api.history(com.id, Cmd.COMMUNITY);
    assert.deepEqual(hist.map((m) => m.id), [ack2.id, ack1.id]);
    await offline(e.sock);
    await offline(f.sock);
  });

  test('messages to an offline user are delivered when they reconnect', async () => {
    const [gus, hal] = await Promise.all([user('Gus'), user('Hal')]);
    await gus.api.addFriend(hal.id);
    const g = await online(gus);
    let h = await online(hal);
    await offline(h.sock);

    // Hal's sign-out reaches logic shortly after the socket closes: until
    // then messages count as delivered. Send until one is stored.
    const stored = [];
    await eventually('a message to Hal to be stored', ANSWER_MS, async (seen) => {
      const ack = await g.sock.send({ cmd: Cmd.SINGLE, dstid: hal.id, ...Build.text(`probe ${stored.length}`) });
      seen(ack);
      if (ack.status !== 'stored') return undefined;
      assert.equal(ack.content, 'not online');
      stored.push(ack.id);
      return true;
    });
    const img = await gus.api.upload(new Blob([PNG]), { filename: 'x.png' });
    for (const fields of [Build.text('while you were out'), Build.image(img)]) {
      const ack = await g.sock.send({ cmd: Cmd.SINGLE, dstid: hal.id, ...fields });
      assert.equal(ack.status, 'stored');
      stored.push(ack.id);
    }

    h = await online(hal);
    const got = await h.inbox.until('the stored messages', (xs) => (stored.every((id) => xs.some((m) => m.id === id)) ? xs : undefined));
    const order = got.map((m) => m.id).filter((id) => stored.includes(id));
    assert.deepEqual(order, stored, 'in order, each once');
    assert.equal(got.find((m) => m.id === stored.at(-1)).url, img);

    // Delivered once: a new connection gets nothing again.
    await offline(h.sock);
    h = await online(hal);
    const marker = await g.sock.send({ cmd: Cmd.SINGLE, dstid: hal.id, ...Build.text('marker') });
    assert.equal(marker.status, 'delivered');
    await h.inbox.byId(marker.id);
    assert.deepEqual(h.inbox.items.map((m) => m.id), [marker.id], 'stored messages are not delivered twice');
    await offline(g.sock);
    await offline(h.sock);
  });

  test('the socket reconnects with backoff after it drops', async () => {
    const [ida, jon] = await Promise.all([user('Ida'), user('Jon')]);
    await ida.api.addFriend(jon.id);
    const i = await online(ida, { minBackoffMs: 50, maxBackoffMs: 200 });
    const j = await online(jon);
    const states = record(i.sock, 'state');
    const welcomes = record(i.sock, 'welcome');

    i.sock.ws.close(); // dropped underneath, not close(): it must come back by itself
    const waiting = await states.until('a reconnect to be scheduled', (xs) => xs.find((s) => s.state === 'waiting'));
    assert.ok(waiting.delayMs >= 25 && waiting.delayMs <= 50, JSON.stringify(waiting));
    await welcomes.until('the welcome of the new connection', (xs) => xs.length >= 1);
    assert.equal(i.sock.state, 'open');
    assert.equal(i.sock.attempt, 0, 'backoff resets once connected');

    // It works as before: both ways.
    const ack = await i.sock.send({ cmd: Cmd.SINGLE, dstid: jon.id, ...Build.text('back') });
    await j.inbox.byId(ack.id);
    const back = await j.sock.send({ cmd: Cmd.SINGLE, dstid: ida.id, ...Build.text('welcome back') });
    // The new session signed in (welcome) before this: it is pushed there.
    await i.inbox.byId(back.id);
    await offline(i.sock);
    await offline(j.sock);
  });
});
