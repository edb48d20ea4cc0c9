// The room page (web/room.html) in headless Chromium, served by the
// standalone binary itself (logic's /web/, protobuf.js compiled in): two
// browser contexts in one room, NORMAL and IMPORTANT messages both ways, the
// online count as the second joins and leaves, a merged batch shown as
// separate messages, the server's refusals (bad token, oversized message),
// reconnection after the server restarts, and a phone-sized viewport; and,
// against a scripted room server (the standalone one sends no offsets
// yet), the stream position kept across a reconnect by protobuf.js's
// browser build, duplicates dropped, and lost messages reported.
//
//   cd web && npm ci && CHATROOM_BIN=../target/debug/chatroom node --test test/browser-room.test.mjs
//
// Screenshots: web/screenshots/room/ (printed at the start).

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';

import { ErrCode, MsgLevel, PackageType, RoomClient, loadProtocol } from '../lib/chatroom.mjs';
import { answer, push, reply, scriptedServer } from './scripted-server.mjs';
import { DESKTOP, PHONE, UI_MS, assertNoHorizontalScroll, guard, launchBrowser, screenshots, startServer, stopServer } from './browser.mjs';

const ROOM = `lobby-${randomUUID().slice(0, 8)}`;
let server;
let browser;
let shots;

before(async () => {
  shots = await screenshots('room');
  // A batching window long enough that a burst is certainly merged.
  server = await startServer({ env: { CHATROOM__JOB__BATCH__WINDOW: '100ms' } });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await stopServer(server);
});

/** A page of its own browser context (own storage), guarded. */
async function open(label, viewport = DESKTOP) {
  const ctx = await browser.newContext({ viewport });
  const page = await ctx.newPage();
  page.setDefaultTimeout(UI_MS);
  const g = guard(page, label);
  return { ctx, page, g, label };
}

function roomUrl(uid, extra = '') {
  return `${server.base}/web/room.html?ws=${encodeURIComponent(`${server.wsBase}/room`)}&room=${ROOM}&uid=${uid}${extra}`;
}

/** Waits for a log line containing `text` (optionally with a class). */
function logLine(page, text, cls = 'p') {
  return page.locator(`#log ${cls}`, { hasText: text }).first().waitFor({ timeout: UI_MS });
}

async function status(page, state, text) {
  await page.waitForFunction(([s, t]) => {
    const el = document.getElementById('status');
    return el.dataset.state === s && (!t || el.textContent.includes(t));
  }, [state, text], { timeout: UI_MS * 2 });
}

async function members(page, n) {
  await page.waitForFunction((want) => document.getElementById('members').textContent === String(want), n, { timeout: UI_MS });
}

async function join(u) {
  try {
    await u.page.waitForFunction(() => !document.getElementById('connect').disabled, null, { timeout: UI_MS });
    await u.page.click('#connect');
    await status(u.page, 'open', `in ${ROOM}`);
  } catch (e) {
    // Say why: what the page logged and what went wrong in it.
    const log = await u.page.textContent('#log').catch(() => '?');
    throw new Error(`${u.label} could not join: ${e.message}\npage log: ${log}\nproblems: ${JSON.stringify(u.g.problems)}`);
  }
}

async function say(page, content, { important = false } = {}) {
  await page.fill('#text', content);
  await page.setChecked('#important', important);
  await page.click('#send');
}

test('the start line names the page to open', () => {
  assert.match(server.startLine, new RegExp(`open http://127\\.0\\.0\\.1:${server.http}/ `));
});

test('two users chat in a room, see the online count, merged batches, refusals and a server restart', async () => {
  const alice = await open('alice');
  const bob = await open('bob');
  await alice.page.goto(roomUrl('alice'));
  await shots.shot(alice.page, 'alice-page-loaded');
  await join(alice);
  await members(alice.page, 1);
  await logLine(alice.page, `joined ${ROOM}`);

  await bob.page.goto(roomUrl('bob'));
  await join(bob);
  await members(alice.page, 2);
  await members(bob.page, 2);
  await shots.shot(alice.page, 'alice-sees-two-online');

  // NORMAL one way, IMPORTANT the other.
  await say(alice.page, 'hello from alice');
  await logLine(bob.page, 'alice: hello from alice', 'p.msg');
  assert.equal(await bob.page.locator('#log p.msg', { hasText: 'hello from alice' }).getAttribute('class'), 'msg');
  await say(bob.page, 'urgent from bob', { important: true });
  await logLine(alice.page, 'bob: urgent from bob', 'p.msg.important');
  await logLine(bob.page, 'bob: urgent from bob', 'p.msg.important');
  await shots.shot(alice.page, 'alice-normal-and-important');
  await shots.shot(bob.page, 'bob-normal-and-important');

  // Another client sends a burst: it arrives merged, and each message is
  // its own line, in order.
  const proto = await loadProtocol();
  const bot = new RoomClient(proto);
  await bot.connect(`${server.wsBase}/room`);
  const tk = await fetch(`${server.base}/tk`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ uid: 'bot' }) }).then((r) => r.json());
  assert.equal((await bot.signIn(tk.data, ROOM)).code, 0);
  const burst = Array.from({ length: 12 }, (_, i) => `burst-${String(i + 1).padStart(2, '0')}`);
  for (const b of burst) bot.send(ROOM, MsgLevel.NORMAL, JSON.stringify({ uid: 'bot', content: b }));
  await logLine(alice.page, 'bot: burst-12', 'p.msg');
  const lines = await alice.page.$$eval('#log p.msg', (ps) => ps
    .filter((p) => p.textContent.startsWith('bot: '))
    .map((p) => ({ text: p.textContent, size: Number(p.dataset.batchSize), batch: p.dataset.batch })));
  assert.deepEqual(lines.map((l) => l.text), burst.map((b) => `bot: ${b}`), 'every message of the burst, once, in order');
  assert.ok(lines.some((l) => l.size > 1), `a merged frame shown as separate lines: ${JSON.stringify(lines)}`);
  assert.ok(new Set(lines.map((l) => l.batch)).size < lines.length, 'fewer frames than messages');
  await members(alice.page, 3);
  await shots.shot(alice.page, 'merged-batch-as-lines');
  await bot.close();
  await members(alice.page, 2);

  // Bob leaves: alice sees the count drop.
  await bob.page.click('#leave');
  await status(bob.page, 'closed');
  await members(alice.page, 1);
  await shots.shot(alice.page, 'bob-left-one-online');

  // A bad token: the refusal is shown, and the page is not connected.
  await bob.page.fill('#token', 'not.a.token');
  await bob.page.click('#connect');
  await logLine(bob.page, 'sign-in refused (100)', 'p.err');
  await status(bob.page, 'closed');
  assert.equal(await bob.page.isDisabled('#text'), true);
  await shots.shot(bob.page, 'bad-token-refused');
  await bob.page.fill('#token', '');
  await join(bob);
  await members(alice.page, 2);

  // An oversized message: the server's 413 is shown; the page comes back.
  await say(alice.page, 'x'.repeat(70 * 1024));
  await logLine(alice.page, 'error 413', 'p.err');
  await status(alice.page, 'open', `in ${ROOM}`);
  await logLine(alice.page, `reconnected to ${ROOM}`);
  await shots.shot(alice.page, 'oversized-refused');
  await say(alice.page, 'still here');
  await logLine(bob.page, 'alice: still here', 'p.msg');

  // The server restarts (same ports and data): both pages reconnect.
  const refused = /WebSocket connection to .* failed|ERR_CONNECTION_REFUSED/;
  await alice.g.tolerate(refused, () => bob.g.tolerate(refused, async () => {
    await stopServer(server, { keep: true });
    await status(alice.page, 'reconnecting');
    await status(bob.page, 'reconnecting');
    assert.equal(await alice.page.isDisabled('#text'), true, 'no typing into a dead connection');
    await shots.shot(alice.page, 'server-down-reconnecting');
    server = await startServer({ dir: server.dir, ports: server, env: { CHATROOM__JOB__BATCH__WINDOW: '100ms' } });
    server.own = true; // the first start made the folder: remove it at the end
    await status(alice.page, 'open', `in ${ROOM}`);
    await status(bob.page, 'open', `in ${ROOM}`);
  }));
  await logLine(alice.page, `reconnected to ${ROOM}`);
  await members(alice.page, 2);
  await say(bob.page, 'after the restart');
  await logLine(alice.page, 'bob: after the restart', 'p.msg');
  await say(alice.page, 'welcome back');
  await logLine(bob.page, 'alice: welcome back', 'p.msg');
  await shots.shot(alice.page, 'after-restart');
  await shots.shot(bob.page, 'after-restart');

  alice.g.check();
  bob.g.check();
  await alice.ctx.close();
  await bob.ctx.close();
});

test('the room page on a phone-sized viewport', async () => {
  const phone = await open('phone', PHONE);
  await phone.page.goto(roomUrl('phone'));
  await assertNoHorizontalScroll(phone.page, 'room page before joining');
  await join(phone);
  await say(phone.page, 'from a phone');
  await logLine(phone.page, 'phone: from a phone', 'p.msg');
  await assertNoHorizontalScroll(phone.page, 'room page in a session');
  for (const id of ['#text', '#send', '#leave']) assert.ok(await phone.page.isVisible(id), `${id} visible`);
  await shots.shot(phone.page, 'phone');
  phone.g.check();
  await phone.ctx.close();
});

test('the page resumes from its offset, drops duplicates and reports lost messages (scripted server)', async () => {
  const proto = await loadProtocol();
  const fake = await scriptedServer(proto);
  const u = await open('recovery');
  const room = `stream-${ROOM}`;
  try {
    await u.page.goto(`${server.base}/web/room.html?ws=${encodeURIComponent(fake.url)}&room=${room}&uid=carol`);
    await u.page.waitForFunction(() => !document.getElementById('connect').disabled, null, { timeout: UI_MS });
    await u.page.click('#connect');
    let s = await fake.next();
    assert.deepEqual([s.signIn.room, s.signIn.sinceOffset, s.signIn.epoch], [room, 0, 0], 'no recovery asked at first');
    const big = 2 ** 40; // uint64 above 2^32: the browser build reads Numbers, not Longs
    answer(s.ws, { epoch: 7, offset: big });
    await status(u.page, 'open', `in ${room}`);
    push(s.ws, room, { epoch: 7, offset: big + 3 }, ['m1', 'm2', 'm3']);
    await logLine(u.page, 'm3', 'p.msg');

    // Dropped: the page signs in again from where it was.
    s.ws.terminate();
    s = await fake.next();
    assert.deepEqual([s.signIn.sinceOffset, s.signIn.epoch], [big + 3, 7]);
    answer(s.ws, { epoch: 7, offset: big + 4, recovered: true });
    await status(u.page, 'open', `in ${room}`);
    push(s.ws, room, { epoch: 7, offset: big + 4 }, ['m2', 'm3', 'm4']);
    await logLine(u.page, 'm4', 'p.msg');
    const lines = await u.page.$$eval('#log p.msg', (ps) => ps.map((p) => [p.textContent, Number(p.dataset.offset)]));
    assert.deepEqual(lines, [['m1', big + 1], ['m2', big + 2], ['m3', big + 3], ['m4', big + 4]], 'each message once, with its offset');
    assert.equal(await u.page.isVisible('#notice'), false);

    // A 410 notice: the page says messages are missing.
    reply(s.ws, PackageType.UNKNOWN, proto.Err.encode(proto.Err.create({ code: ErrCode.GONE, msg: 'messages lost', epoch: 7, offset: big + 9 })).finish());
    await u.page.locator('#notice', { hasText: 'Some messages could not be recovered' }).waitFor({ timeout: UI_MS });
    await shots.shot(u.page, 'messages-not-recovered');
    u.g.check();
  } finally {
    await fake.close();
    await u.ctx.close();
  }
});
