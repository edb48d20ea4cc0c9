// RoomClient's reconnection and room stream positions, against a scripted
// server (the `ws` package with the real protobuf.js schema), which can
// stage what the real one rarely does (offsets past 2^32, duplicates, a
// 410 notice; protocol.test.mjs recovers against the real one): backoff with
// jitter, since_offset + epoch on the next sign-in, duplicates dropped by
// offset, 'unrecovered' on recovered:false and on an Err 410 notice, no
// reconnect after close() or after a refused sign-in, uint64 offsets above
// 2^32 read exactly.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ErrCode, PackageType, RoomClient, backoffDelay, loadProtocol, text, toNumber } from '../lib/chatroom.mjs';
import { answer, push, reply, scriptedServer } from './scripted-server.mjs';
import { within } from './support.mjs';

const WAIT_MS = 5000;
const FAST = { baseMs: 20, maxMs: 160 };
let proto;

before(async () => { proto = await loadProtocol(); });

/** The next `name` event of `c` (with a deadline). */
function next(c, name) {
  return within(WAIT_MS, `'${name}'`, new Promise((resolve) => {
    const off = c.on(name, (v) => { off(); resolve(v); });
  }));
}

/** The next `n` messages of `c`, as `[text, offset]`. */
function received(c, n) {
  return within(WAIT_MS, `${n} message(s)`, new Promise((resolve) => {
    const got = [];
    const off = c.on('message', (m) => {
      got.push([text(m.data), m.offset]);
      if (got.length === n) { off(); resolve(got); }
    });
  }));
}

describe('backoff', () => {
  test('grows exponentially, is capped, and keeps its jitter within half a step', () => {
    const low = () => 0;
    const high = () => 1;
    assert.deepEqual([0, 1, 2, 3, 4, 5].map((a) => backoffDelay(a, FAST, high)), [20, 40, 80, 160, 160, 160]);
    assert.deepEqual([0, 1, 2, 3, 4].map((a) => backoffDelay(a, FAST, low)), [10, 20, 40, 80, 80]);
    assert.equal(backoffDelay(1000, {}, high), 15000, 'no overflow for large attempts');
    for (let i = 0; i < 200; i++) {
      const d = backoffDelay(3, FAST);
      assert.ok(d >= 80 && d <= 160, `${d}`);
    }
    const spread = new Set(Array.from({ length: 50 }, () => backoffDelay(2, { baseMs: 1000, maxMs: 60000 })));
    assert.ok(spread.size > 10, 'jittered, not one value for everybody');
  });

  test('uint64 as Long or Number reads exactly below 2^53', async () => {
    const Long = (await import('long')).default;
    assert.equal(toNumber(Long.fromString('1099511627781', true)), 2 ** 40 + 5);
    assert.equal(toNumber({ low: 5, high: 256, unsigned: true }), 2 ** 40 + 5);
    assert.equal(toNumber(7), 7);
    assert.equal(toNumber(null), 0);
  });
});

describe('reconnecting RoomClient', () => {
  let server;
  before(async () => { server = await scriptedServer(proto); });
  after(async () => { await server.close(); });

  test('resumes from its offset, drops what it saw, reports what is lost, stops on refusal', async () => {
    const big = 2 ** 40; // above 2^32: offsets are uint64 on the wire
    const c = new RoomClient(proto, { reconnect: FAST, timeoutMs: WAIT_MS, random: () => 1 });
    const states = [];
    c.on('state', (s) => states.push(s.state));
    const reconnecting = [];
    c.on('reconnecting', (r) => reconnecting.push(r));
    c.on('error', () => {}); // the dropped sockets

    await c.connect(server.url);
    const signingIn = c.signIn('tok', 'r1');
    let s = await server.next();
    assert.deepEqual(s.signIn, { token: 'tok', room: 'r1', sinceOffset: 0, epoch: 0 }, 'first sign-in asks for no recovery');
    answer(s.ws, { epoch: 7, offset: big });
    const first = await signingIn;
    assert.equal(first.code, ErrCode.OK);
    assert.equal(first.offset, big);
    assert.equal(first.epoch, 7);
    assert.deepEqual(c.position('r1'), { epoch: 7, offset: big });

    // A merged frame: message i of n has offset - (n - 1 - i).
    let got = received(c, 3);
    push(s.ws, 'r1', { epoch: 7, offset: big + 3 }, ['a', 'b', 'c']);
    assert.deepEqual(await got, [['a', big + 1], ['b', big + 2], ['c', big + 3]]);

    // The connection drops: the client comes back with since_offset + epoch.
    let back = next(c, 'reconnected');
    s.ws.terminate();
    s = await server.next();
    assert.deepEqual(s.signIn, { token: 'tok', room: 'r1', sinceOffset: big + 3, epoch: 7 });
    answer(s.ws, { epoch: 7, offset: big + 4, recovered: true });
    assert.equal((await back).answer.recovered, true);
    assert.equal(reconnecting.length, 1);
    assert.equal(reconnecting[0].delayMs, FAST.baseMs);

    // The recovered frame overlaps what was seen: only 'd' is new.
    got = received(c, 2);
    push(s.ws, 'r1', { epoch: 7, offset: big + 4 }, ['b', 'c', 'd']);
    push(s.ws, 'r1', { epoch: 7, offset: big + 5 }, ['e']);
    assert.deepEqual(await got, [['d', big + 4], ['e', big + 5]]);
    assert.equal(c.duplicates, 2);

    // A gap (f missing), then f late — the server gave up waiting for it
    // and delivers it after all — then f again: kept once.
    got = received(c, 2);
    push(s.ws, 'r1', { epoch: 7, offset: big + 7 }, ['g']);
    push(s.ws, 'r1', { epoch: 7, offset: big + 6 }, ['f']);
    push(s.ws, 'r1', { epoch: 7, offset: big + 6 }, ['f']);
    assert.deepEqual(await got, [['g', big + 7], ['f', big + 6]]);
    assert.deepEqual(c.position('r1'), { epoch: 7, offset: big + 7 });

    // A 410 notice: messages are gone; the position moves to the notice's.
    let lost = next(c, 'unrecovered');
    const err = next(c, 'err');
    reply(s.ws, PackageType.UNKNOWN, proto.Err.encode(proto.Err.create({ code: 410, msg: 'messages lost, reload', epoch: 7, offset: big + 50 })).finish());
    assert.equal((await err).code, ErrCode.GONE);
    const notice = await lost;
    assert.equal(notice.code, 410);
    assert.equal(notice.room, 'r1');
    assert.equal(notice.offset, big + 50);
    assert.deepEqual(c.position('r1'), { epoch: 7, offset: big + 50 });

    // Drop again: the backoff started over after the successful sign-in.
    back = next(c, 'reconnected');
    lost = next(c, 'unrecovered');
    s.ws.close(1001, 'going away');
    s = await server.next();
    assert.deepEqual(s.signIn, { token: 'tok', room: 'r1', sinceOffset: big + 50, epoch: 7 });
    assert.equal(reconnecting[1].delayMs, FAST.baseMs, 'attempts count from 0 after a successful sign-in');
    // A new epoch (the server lost the stream): not recovered.
    answer(s.ws, { epoch: 8, offset: 3, recovered: false });
    await back;
    const gap = await lost;
    assert.equal(gap.epoch, 8);
    assert.deepEqual(gap.since, { epoch: 7, offset: big + 50 });
    assert.deepEqual(c.position('r1'), { epoch: 8, offset: 3 });
    got = received(c, 1);
    push(s.ws, 'r1', { epoch: 8, offset: 4 }, ['fresh']);
    assert.deepEqual(await got, [['fresh', 4]]);

    // Connections that fail before the answer: the wait grows, capped.
    s.ws.terminate();
    for (let i = 0; i < 4; i++) (await server.next()).ws.terminate();
    s = await server.next();
    assert.deepEqual(reconnecting.slice(2).map((r) => r.delayMs), [20, 40, 80, 160, 160]);

    // A refused sign-in ends it: no further attempt.
    const refused = next(c, 'refused');
    const closed = next(c, 'close');
    answer(s.ws, { code: ErrCode.LOGIN_NEEDED, msg: 'token expired' });
    s.ws.close(1008, 'sign-in failed');
    assert.deepEqual(await refused, { code: ErrCode.LOGIN_NEEDED, msg: 'token expired' });
    assert.equal((await closed).code, 1008);
    assert.equal(c.state, 'closed');
    assert.equal(c.retryTimer, null, 'no reconnect scheduled');
    assert.ok(states.includes('reconnecting') && states.includes('signed-in'));
  });

  test('close() and a refused first sign-in do not reconnect', async () => {
    const before = server.connections();
    const a = new RoomClient(proto, { reconnect: FAST, timeoutMs: WAIT_MS });
    await a.connect(server.url);
    const signingIn = a.signIn('tok', 'r2');
    const s = await server.next();
    answer(s.ws, { epoch: 0, offset: 0 });
    await signingIn;
    assert.equal(a.position('r2'), null, 'epoch 0: the room has no stream');
    // No stream: nothing is dropped as a duplicate.
    const got = received(a, 2);
    push(s.ws, 'r2', { epoch: 0, offset: 0 }, ['same']);
    push(s.ws, 'r2', { epoch: 0, offset: 0 }, ['same']);
    assert.deepEqual(await got, [['same', null], ['same', null]]);
    const closed = await a.close();
    assert.equal(closed.code, 1000);
    assert.equal(a.state, 'closed');
    assert.equal(a.retryTimer, null);

    const b = new RoomClient(proto, { reconnect: FAST, timeoutMs: WAIT_MS });
    await b.connect(server.url);
    const refusedIn = b.signIn('bad', 'r2');
    const t = await server.next();
    const ended = next(b, 'close');
    answer(t.ws, { code: ErrCode.LOGIN_NEEDED, msg: 'bad token' });
    assert.equal((await refusedIn).code, ErrCode.LOGIN_NEEDED);
    t.ws.close(1008, 'sign-in failed');
    await ended;
    assert.equal(b.retryTimer, null, 'a refused sign-in is not retried');
    assert.equal(server.connections(), before + 2);
  });

  test('close() while waiting to reconnect ends at once', async () => {
    const c = new RoomClient(proto, { reconnect: { baseMs: 60000, maxMs: 60000 }, timeoutMs: WAIT_MS });
    c.on('error', () => {});
    await c.connect(server.url);
    const signingIn = c.signIn('tok', 'r3');
    const s = await server.next();
    answer(s.ws, {});
    await signingIn;
    const waiting = next(c, 'reconnecting');
    s.ws.terminate();
    assert.ok((await waiting).delayMs >= 30000);
    const closed = await c.close();
    assert.equal(closed.reason, 'closed by the client');
    assert.equal(c.state, 'closed');
  });
});
