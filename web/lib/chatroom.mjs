// Client for the chatroom room protocol (README "Protocol"): protobuf `Req` /
// `Reply` frames over a binary WebSocket at ws://host:port/room, and the
// merged-batch format `|len|data|len|data|...` of pushed room messages.
//
// The same file runs in Node and in browsers, so it touches no Node API
// except behind a check, and takes protobuf.js and the WebSocket class from
// the caller when given (browsers: the global `protobuf` of
// protobuf.min.js and `WebSocket`; Node: the `protobufjs` and `ws` packages).
//
//   const proto = await loadProtocol();
//   const client = new RoomClient(proto);
//   await client.connect('ws://127.0.0.1:8080/room');
//   const err = await client.signIn(token, 'lobby');   // {code: 0, msg: 'ok'}
//   client.on('message', (m) => console.log(m.room, m.level, text(m.data)));
//   client.send('lobby', MsgLevel.NORMAL, 'hello');

/** Package types of `Req.type` / `Reply.type` (api/protocol.proto). */
export const PackageType = Object.freeze({ UNKNOWN: 0, SIGN_IN: 1, HEARTBEAT: 2, MESSAGE: 3, MEMBERS: 4 });

/** `BroadcastRoomReq.msgLv`. */
export const MsgLevel = Object.freeze({ NORMAL: 0, IMPORTANT: 1 });

/** `Err.code` values the server answers with (README "Protocol"). */
export const ErrCode = Object.freeze({
  OK: 0,
  LOGIN_NEEDED: 100,
  BAD_REQUEST: 400,
  FORBIDDEN: 403,
  UNKNOWN_TYPE: 404,
  CONFLICT: 409,
  TOO_LARGE: 413,
  UNAVAILABLE: 503,
});

/** Bytes of each length prefix in a merged batch. */
export const HEAD_LEN = 4;

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const EMPTY = new Uint8Array(0);

/** A string (UTF-8 encoded), ArrayBuffer or any ArrayBufferView as bytes, without copying. */
export function bytes(v) {
  if (typeof v === 'string') return encoder.encode(v);
  if (v instanceof Uint8Array) return v;
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  if (ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  throw new TypeError(`expected a string, ArrayBuffer or ArrayBufferView, got ${Object.prototype.toString.call(v)}`);
}

/** UTF-8 bytes as a string. */
export function text(b) {
  return decoder.decode(bytes(b));
}

/**
 * Merges messages into one `|len1|data1|len2|data2|...` buffer, each length a
 * 4-byte little-endian unsigned integer. Strings are sent as UTF-8.
 * @param {Iterable<string|ArrayBuffer|ArrayBufferView>} messages
 * @returns {Uint8Array}
 */
export function pack(messages) {
  const parts = Array.from(messages, bytes);
  let total = 0;
  for (const p of parts) {
    if (p.byteLength > 0xffffffff) throw new RangeError(`message of ${p.byteLength} bytes does not fit a 4-byte length`);
    total += HEAD_LEN + p.byteLength;
  }
  const out = new Uint8Array(total);
  const dv = new DataView(out.buffer);
  let off = 0;
  for (const p of parts) {
    dv.setUint32(off, p.byteLength, true);
    out.set(p, off + HEAD_LEN);
    off += HEAD_LEN + p.byteLength;
  }
  return out;
}

/**
 * Splits a merged batch into its messages (views into `data`, not copies).
 * Unlike the seed's sample, which read only the low byte of each length, the
 * whole 32-bit length is read, and a truncated head or body throws instead
 * of yielding garbage.
 * @param {ArrayBuffer|ArrayBufferView} data
 * @returns {Uint8Array[]}
 */
export function unpack(data) {
  const u8 = bytes(data);
  // byteOffset matters: a Node Buffer (from ws or protobuf.js) is often a
  // slice of a larger pooled ArrayBuffer.
  const dv = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  const out = [];
  let off = 0;
  while (off < u8.byteLength) {
    if (u8.byteLength - off < HEAD_LEN) {
      throw new RangeError(`truncated length prefix at offset ${off}: ${u8.byteLength - off} byte(s) left`);
    }
    const len = dv.getUint32(off, true);
    off += HEAD_LEN;
    if (len > u8.byteLength - off) {
      throw new RangeError(`message at offset ${off} claims ${len} bytes but ${u8.byteLength - off} remain`);
    }
    out.push(u8.subarray(off, off + len));
    off += len;
  }
  return out;
}

/**
 * Loads api/protocol.proto with protobuf.js and returns its message types.
 *
 * The schema text is read here (fetch in browsers, the file system in Node)
 * and given to `protobuf.parse`: `protobuf.load` resolves names as file
 * paths, and turns `http://host/api/protocol.proto` into a request for
 * `/host/api/protocol.proto` on the page's own origin.
 * @param {object} [opts]
 * @param {object} [opts.protobuf] protobuf.js (full build, it parses .proto);
 *   default: the global `protobuf` (browser script tag), else the `protobufjs` package.
 * @param {string|URL} [opts.protoUrl] where the .proto is; default
 *   `../../api/protocol.proto` relative to this file.
 */
export async function loadProtocol(opts = {}) {
  const protobuf = opts.protobuf ?? globalThis.protobuf ?? (await import('protobufjs')).default;
  if (typeof protobuf?.parse !== 'function') {
    throw new Error('protobuf.js full build needed (protobuf.parse is missing): load protobuf.min.js, not the light or minimal build');
  }
  const url = new URL(opts.protoUrl ?? '../../api/protocol.proto', import.meta.url);
  let source;
  if (url.protocol === 'file:') {
    const { readFile } = await import('node:fs/promises');
    source = await readFile(url, 'utf8');
  } else {
    const res = await fetch(url);
    if (!res.ok) throw new Error(`cannot load the protocol schema ${url.href}: HTTP ${res.status}`);
    source = await res.text();
  }
  const { root } = protobuf.parse(source);
  const type = (name) => root.lookupType(`chatroom.protocol.${name}`);
  return {
    root,
    Req: type('Req'),
    Reply: type('Reply'),
    Err: type('Err'),
    SignIn: type('SignIn'),
    BroadcastRoomReq: type('BroadcastRoomReq'),
  };
}

/**
 * An outstanding request. After a timeout it stays in its queue, settled,
 * so that the late reply is matched to it and not to the next request.
 */
class Pending {
  constructor(resolve, reject, timeoutMs, what) {
    this.done = false;
    this.resolve = (v) => this.settle(() => resolve(v));
    this.reject = (e) => this.settle(() => reject(e));
    this.timer = timeoutMs > 0 ? setTimeout(() => this.reject(new Error(`${what}: no answer within ${timeoutMs} ms`)), timeoutMs) : null;
  }

  settle(f) {
    if (this.done) return;
    this.done = true;
    if (this.timer !== null) clearTimeout(this.timer);
    f();
  }
}

/**
 * One WebSocket session in one room.
 *
 * Replies carry no request id, so they are matched by kind and order: the
 * server answers a session's frames one at a time, in order. HEARTBEAT and
 * MEMBERS have their own reply types; the first `Reply{UNKNOWN, Err}` after
 * SIGN_IN answers it. A MESSAGE is answered only when it fails, so later Errs
 * cannot be tied to a request: they are emitted as 'err' events.
 *
 * One instance serves one connection: to reconnect, make a new one.
 *
 * Events (`on(name, fn)` returns a function that unsubscribes):
 * - 'message' `{room, level, data, batch, batchSize}`: one pushed message;
 *   `batch` numbers the Reply frames this client received, `batchSize` is how
 *   many messages that frame carried;
 * - 'batch' `{room, level, messages}`: one pushed frame, unpacked;
 * - 'err' `{code, msg}`: an Err reply that answers no pending sign-in;
 * - 'close' `{code, reason}`; 'error' `Error`: transport or decoding problems.
 */
export class RoomClient {
  /**
   * @param {Awaited<ReturnType<typeof loadProtocol>>} proto
   * @param {object} [opts]
   * @param {Function} [opts.WebSocket] WebSocket class; default the global
   *   one, else the `ws` package.
   * @param {number} [opts.timeoutMs=10000] default answer timeout for
   *   signIn / heartbeat / members (0: none).
   */
  constructor(proto, opts = {}) {
    this.proto = proto;
    this.WebSocket = opts.WebSocket;
    this.timeoutMs = opts.timeoutMs ?? 10000;
    this.ws = null;
    this.closed = null; // {code, reason} once closed
    this.batches = 0;
    this.listeners = new Map();
    this.pendingSignIn = null;
    this.pendingHeartbeats = [];
    this.pendingMembers = [];
  }

  on(name, fn) {
    if (!this.listeners.has(name)) this.listeners.set(name, new Set());
    this.listeners.get(name).add(fn);
    return () => this.listeners.get(name)?.delete(fn);
  }

  emit(name, value) {
    if (name === 'error' && !this.listeners.get('error')?.size) {
      console.warn('chatroom client:', value); // not silently lost
      return;
    }
    for (const fn of [...(this.listeners.get(name) ?? [])]) {
      try {
        fn(value);
      } catch (e) {
        // One faulty listener must not break frame handling for the others.
        if (name !== 'error') this.emit('error', e);
        else queueMicrotask(() => { throw e; });
      }
    }
  }

  /** Opens the WebSocket; resolves once open. */
  async connect(url) {
    if (this.ws) throw new Error('already connected');
    const WS = this.WebSocket ?? globalThis.WebSocket ?? (await import('ws')).default;
    const ws = new WS(url);
    this.ws = ws;
    // Browsers default to Blob, which needs an asynchronous read per frame;
    // ws defaults to Buffer, already a Uint8Array: keep that.
    if (ws.binaryType === 'blob') ws.binaryType = 'arraybuffer';
    ws.addEventListener('message', (ev) => this.onFrame(ev.data));
    ws.addEventListener('error', (ev) => this.emit('error', ev.error ?? new Error('websocket error')));
    ws.addEventListener('close', (ev) => this.onClose(ev.code, ev.reason));
    await new Promise((resolve, reject) => {
      const opened = () => { done(); resolve(); };
      const failed = (ev) => { done(); reject(ev.error ?? new Error(`cannot connect to ${url} (close code ${ev.code ?? '?'})`)); };
      const done = () => {
        ws.removeEventListener('open', opened);
        ws.removeEventListener('error', failed);
        ws.removeEventListener('close', failed);
      };
      ws.addEventListener('open', opened);
      ws.addEventListener('error', failed);
      ws.addEventListener('close', failed);
    });
  }

  /** Sends raw bytes as one binary frame (for diagnostics and tests). */
  sendRaw(data) {
    if (!this.ws || this.ws.readyState !== 1 /* OPEN */) throw new Error('not connected');
    this.ws.send(bytes(data));
  }

  /** Sends `Req{type, data}`. */
  sendReq(type, data = EMPTY) {
    const { Req } = this.proto;
    this.sendRaw(Req.encode(Req.create({ type, data: bytes(data) })).finish());
  }

  /**
   * Signs in to `room`; resolves with the server's Err `{code, msg}` (code 0
   * on success, otherwise the server closes the connection).
   */
  signIn(token, room, { timeoutMs = this.timeoutMs } = {}) {
    if (this.pendingSignIn) return Promise.reject(new Error('a sign-in is already pending'));
    const { SignIn } = this.proto;
    return new Promise((resolve, reject) => {
      const p = new Pending(resolve, reject, timeoutMs, 'sign-in');
      this.pendingSignIn = p;
      try {
        this.sendReq(PackageType.SIGN_IN, SignIn.encode(SignIn.create({ token, roomID: room })).finish());
      } catch (e) {
        this.pendingSignIn = null;
        p.reject(e);
      }
    }).finally(() => {
      // After a timeout or a send failure; the answer path clears it itself.
      if (this.pendingSignIn?.done) this.pendingSignIn = null;
    });
  }

  /** Sends a heartbeat; resolves with the reply text ("pong"). */
  heartbeat({ timeoutMs = this.timeoutMs } = {}) {
    return this.request(PackageType.HEARTBEAT, this.pendingHeartbeats, timeoutMs, 'heartbeat');
  }

  /** Asks for the room's online count (cluster-wide, refreshed every few seconds); resolves with a number. */
  async members({ timeoutMs = this.timeoutMs } = {}) {
    const s = await this.request(PackageType.MEMBERS, this.pendingMembers, timeoutMs, 'members');
    const n = Number(s);
    if (!Number.isInteger(n) || n < 0) throw new Error(`MEMBERS reply is not a count: ${JSON.stringify(s)}`);
    return n;
  }

  /**
   * Sends a room message. Success is not acknowledged: the message comes
   * back pushed to every session of the room, this one included; a failure
   * arrives as an 'err' event. An empty `room` means the session's room.
   */
  send(room, level, data) {
    const { BroadcastRoomReq } = this.proto;
    const m = BroadcastRoomReq.create({ roomID: room, msgLv: level, data: bytes(data) });
    this.sendReq(PackageType.MESSAGE, BroadcastRoomReq.encode(m).finish());
  }

  /**
   * Pushed messages as an async iterator, from the moment this is called
   * (call it before the messages can arrive, e.g. before signIn). It ends
   * when the connection closes; `break` out of the loop to stop listening.
   */
  messages() {
    const queue = [];
    const waiting = [];
    let ended = false;
    const offMsg = this.on('message', (m) => {
      if (waiting.length) waiting.shift()({ value: m, done: false });
      else queue.push(m);
    });
    const stop = () => {
      if (ended) return;
      ended = true;
      offMsg();
      offClose();
      while (waiting.length) waiting.shift()({ value: undefined, done: true });
    };
    const offClose = this.on('close', stop);
    if (this.closed) stop();
    return {
      next: () => {
        if (queue.length) return Promise.resolve({ value: queue.shift(), done: false });
        if (ended) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => waiting.push(resolve));
      },
      return: () => {
        stop();
        queue.length = 0;
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() { return this; },
    };
  }

  /** Closes the connection; resolves with `{code, reason}` once closed. */
  close(code = 1000, reason = '') {
    if (!this.ws || this.closed) return Promise.resolve(this.closed);
    return new Promise((resolve) => {
      const off = this.on('close', (c) => { off(); resolve(c); });
      this.ws.close(code, reason);
    });
  }

  request(type, queue, timeoutMs, what) {
    return new Promise((resolve, reject) => {
      const p = new Pending(resolve, reject, timeoutMs, what);
      try {
        this.sendReq(type);
        queue.push(p);
      } catch (e) {
        p.reject(e);
      }
    });
  }

  onFrame(data) {
    if (typeof data === 'string') {
      this.emit('error', new Error('unexpected text frame from the server'));
      return;
    }
    let reply;
    try {
      reply = this.proto.Reply.decode(bytes(data));
    } catch (e) {
      this.emit('error', new Error(`malformed Reply frame: ${e.message}`));
      return;
    }
    try {
      this.onReply(reply);
    } catch (e) {
      this.emit('error', new Error(`malformed ${reply.type} reply: ${e.message}`));
    }
  }

  onReply(reply) {
    switch (reply.type) {
      case PackageType.UNKNOWN: {
        const e = this.proto.Err.decode(reply.data);
        const err = { code: e.code, msg: e.msg };
        const signIn = this.pendingSignIn;
        if (signIn) {
          // Cleared now, not in signIn's finally (a microtask later): the next
          // frame may be handled before that runs and must not be taken for
          // the sign-in answer.
          this.pendingSignIn = null;
          signIn.resolve(err);
        } else {
          this.emit('err', err);
        }
        break;
      }
      case PackageType.HEARTBEAT:
        this.answer(this.pendingHeartbeats, text(reply.data), 'HEARTBEAT');
        break;
      case PackageType.MEMBERS:
        this.answer(this.pendingMembers, text(reply.data), 'MEMBERS');
        break;
      case PackageType.MESSAGE: {
        const m = this.proto.BroadcastRoomReq.decode(reply.data);
        // Unpack before emitting anything: a broken batch is dropped whole.
        const messages = unpack(m.data);
        const batch = ++this.batches;
        this.emit('batch', { room: m.roomID, level: m.msgLv, messages });
        for (const data of messages) {
          this.emit('message', { room: m.roomID, level: m.msgLv, data, batch, batchSize: messages.length });
        }
        break;
      }
      default:
        this.emit('error', new Error(`reply of unknown type ${reply.type}`));
    }
  }

  answer(queue, value, what) {
    const p = queue.shift();
    if (p) p.resolve(value); // a no-op if it already timed out
    else this.emit('error', new Error(`unrequested ${what} reply`));
  }

  onClose(code, reason) {
    this.closed = { code, reason: typeof reason === 'string' ? reason : text(reason ?? EMPTY) };
    const gone = new Error(`connection closed (code ${code}${this.closed.reason ? `: ${this.closed.reason}` : ''})`);
    this.pendingSignIn?.reject(gone);
    for (const p of this.pendingHeartbeats.splice(0)) p.reject(gone);
    for (const p of this.pendingMembers.splice(0)) p.reject(gone);
    this.emit('close', this.closed);
  }
}
