// A scripted room server for tests (node --test also loads this file; it
// defines no tests): the `ws` package speaking the real protobuf schema,
// its connections handed to the test in order, so that a test can send
// what the standalone server does not send yet (epochs, offsets, recovery
// answers, Err 410 notices) or drop a connection at an exact point.

import assert from 'node:assert/strict';
import { WebSocketServer } from 'ws';

import { MsgLevel, PackageType, pack, toNumber } from '../lib/chatroom.mjs';
import { within } from './support.mjs';

const WAIT_MS = 10000;
let proto = null; // the schema of the last scriptedServer(), for reply/answer/push

/**
 * A server whose connections are handed to the test in order: `next()`
 * resolves with `{ws, signIn}` once a client has sent its SIGN_IN.
 */
export async function scriptedServer(schema) {
  proto = schema;
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((resolve) => wss.once('listening', resolve));
  const arrived = [];
  const waiting = [];
  let count = 0;
  wss.on('connection', (ws) => {
    count += 1;
    ws.once('message', (data) => {
      const req = proto.Req.decode(new Uint8Array(data));
      assert.equal(req.type, PackageType.SIGN_IN);
      const s = proto.SignIn.decode(req.data);
      const conn = {
        ws,
        signIn: { token: s.token, room: s.roomID, sinceOffset: toNumber(s.sinceOffset), epoch: toNumber(s.epoch) },
      };
      if (waiting.length) waiting.shift()(conn);
      else arrived.push(conn);
    });
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}/room`,
    connections: () => count,
    next: () => within(WAIT_MS, 'the client to connect and sign in', new Promise((resolve) => {
      if (arrived.length) resolve(arrived.shift());
      else waiting.push(resolve);
    })),
    close: () => new Promise((resolve) => {
      for (const c of wss.clients) c.terminate();
      wss.close(resolve);
    }),
  };
}

export function reply(ws, type, data) {
  ws.send(proto.Reply.encode(proto.Reply.create({ type, data })).finish());
}

export function answer(ws, fields) {
  reply(ws, PackageType.UNKNOWN, proto.Err.encode(proto.Err.create({ code: 0, msg: 'ok', ...fields })).finish());
}

export function push(ws, room, { epoch, offset }, messages, level = MsgLevel.NORMAL) {
  const m = proto.BroadcastRoomReq.create({ roomID: room, msgLv: level, data: pack(messages), epoch, offset });
  reply(ws, PackageType.MESSAGE, proto.BroadcastRoomReq.encode(m).finish());
}

