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
//   const err = await client.signIn(token, 'lobby');   // {code: 0, msg: 'ok', epoch, offset, ...}
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
  /** A notice: messages this session lacks could not be recovered; reload. */
  GONE: 410,
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
/** Gaps in a stream a client remembers ([from, to) offsets), oldest first. */
const MAX_GAPS = 64;

function addGap(gaps, from, to) {
  gaps.push([from, to]);
  if (gaps.length > MAX_GAPS) gaps.shift();
}

/** Whether `offset` is in a remembered gap; if so it is taken out of it. */
function takeGap(gaps, offset) {
  const i = gaps.findIndex(([from, to]) => offset >= from && offset < to);
  if (i < 0) return false;
  const [from, to] = gaps[i];
  const parts = [];
  if (offset > from) parts.push([from, offset]);
  if (offset + 1 < to) parts.push([offset + 1, to]);
  gaps.splice(i, 1, ...parts);
  return true;
}

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
 * A protobuf uint64/int64 as a Number. protobuf.js hands out a Long when the
 * `long` package is around (Node) and a Number otherwise (the browser
 * build); offsets and ids stay below 2^53, so a Number is exact.
 */
export function toNumber(v) {
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return Number(v);
  if (v && typeof v.toNumber === 'function') return v.toNumber();
  if (v && typeof v.low === 'number' && typeof v.high === 'number') {
    return (v.unsigned ? v.high >>> 0 : v.high) * 2 ** 32 + (v.low >>> 0);
  }
  return Number(v ?? 0);
}

/** Reconnect timing: the first retry after about `baseMs`, doubling up to `maxMs`. */
export const BACKOFF = Object.freeze({ baseMs: 500, maxMs: 15000 });

/**
 * The wait before reconnect attempt `attempt` (0 for the first): the
 * exponential step `min(maxMs, baseMs * 2^attempt)`, of which a random half
 * is taken off ("equal jitter"), so that clients dropped together do not
 * come back together. Never more than `maxMs`, never less than half a step.
 */
export function backoffDelay(attempt, { baseMs = BACKOFF.baseMs, maxMs = BACKOFF.maxMs } = {}, random = Math.random) {
  const step = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(step / 2 + random() * (step / 2));
}

/**
 * One client of one room, over one WebSocket at a time.
 *
 * Replies carry no request id, so they are matched by kind and order: the
 * server answers a session's frames one at a time, in order. HEARTBEAT and
 * MEMBERS have their own reply types; the first `Reply{UNKNOWN, Err}` after
 * SIGN_IN answers it. A MESSAGE is answered only when it fails, so later Errs
 * cannot be tied to a request: they are emitted as 'err' events.
 *
 * Room stream position: pushed frames and the sign-in answer carry the
 * room's `epoch` and `offset` (README "Protocol"; 0 when the server keeps no
 * stream for the room). The client keeps the last offset seen per room and
 * epoch, drops pushed messages at or below it (a reconnect may bring some
 * twice), and signs in again with `since_offset` + `epoch` so that the
 * server can send what was missed.
 *
 * With `reconnect` on, a connection that drops after a successful sign-in
 * is opened again with backoff (`backoffDelay`; the count restarts after
 * each successful sign-in) — not after `close()`, and not once a sign-in
 * has been refused (a bad or expired token would be refused again). Without
 * it, one instance serves one connection.
 *
 * Events (`on(name, fn)` returns a function that unsubscribes):
 * - 'message' `{room, level, data, batch, batchSize, epoch, offset}`: one
 *   pushed message (`offset` null when the room has no stream);
 * - 'batch' `{room, level, messages, epoch, offset}`: one pushed frame,
 *   unpacked, without the messages dropped as already seen;
 * - 'err' `{code, msg, ...}`: an Err reply that answers no pending sign-in;
 * - 'state' `{state, attempt, delayMs?}`: 'connecting', 'open', 'signed-in',
 *   'reconnecting' (waiting `delayMs` before attempt `attempt`), 'closed';
 * - 'reconnecting' `{attempt, delayMs, code, reason}`: the connection dropped
 *   and will be opened again;
 * - 'reconnected' `{attempt, answer}`: signed in again after a drop;
 * - 'unrecovered' `{room, reason, code?, msg?, epoch, offset}`: messages this
 *   client lacks could not be recovered (the sign-in answer said
 *   `recovered: false`, or an Err 410 notice came): show that, reload;
 * - 'refused' `{code, msg}`: a reconnect's sign-in was refused; the client
 *   stops (then 'close');
 * - 'close' `{code, reason}`: the client is done (no reconnect follows);
 * - 'error' `Error`: transport or decoding problems.
 */
export class RoomClient {
  /**
   * @param {Awaited<ReturnType<typeof loadProtocol>>} proto
   * @param {object} [opts]
   * @param {Function} [opts.WebSocket] WebSocket class; default the global
   *   one, else the `ws` package.
   * @param {number} [opts.timeoutMs=10000] default answer timeout for
   *   signIn / heartbeat / members (0: none).
   * @param {boolean|{baseMs?: number, maxMs?: number}} [opts.reconnect=false]
   *   reconnect after an unexpected drop (true: `BACKOFF` timing).
   * @param {() => number} [opts.random] jitter source (tests), default Math.random.
   */
  constructor(proto, opts = {}) {
    this.proto = proto;
    this.WebSocket = opts.WebSocket;
    this.timeoutMs = opts.timeoutMs ?? 10000;
    this.reconnect = opts.reconnect ? { ...BACKOFF, ...(opts.reconnect === true ? {} : opts.reconnect) } : null;
    this.random = opts.random ?? Math.random;
    this.ws = null;
    this.url = null;
    this.closed = null; // {code, reason} once done for good
    this.state = 'idle';
    this.batches = 0;
    /** Pushed messages dropped because their offset was already seen. */
    this.duplicates = 0;
    this.listeners = new Map();
    this.pendingSignIn = null;
    this.pendingHeartbeats = [];
    this.pendingMembers = [];
    /** room -> {epoch, offset}: the last message seen of the room's stream. */
    this.streams = new Map();
    this.session = null; // {token, room} after a successful sign-in
    this.refused = null; // the Err of a refused sign-in
    this.userClosed = false;
    this.attempt = 0;
    this.retryTimer = null;
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

  setState(state, extra = {}) {
    this.state = state;
    this.emit('state', { state, attempt: this.attempt, ...extra });
  }

  /** Opens the WebSocket; resolves once open. */
  async connect(url) {
    if (this.ws || this.closed) throw new Error('already connected');
    this.url = url;
    await this.open(url);
  }

  async open(url) {
    const WS = this.WebSocket ?? globalThis.WebSocket ?? (await import('ws')).default;
    this.setState('connecting');
    const ws = new WS(url);
    this.ws = ws;
    // Browsers default to Blob, which needs an asynchronous read per frame;
    // ws defaults to Buffer, already a Uint8Array: keep that.
    if (ws.binaryType === 'blob') ws.binaryType = 'arraybuffer';
    // Events of a socket that has been replaced (after a reconnect) are ignored.
    ws.addEventListener('message', (ev) => { if (this.ws === ws) this.onFrame(ev.data); });
    ws.addEventListener('error', (ev) => { if (this.ws === ws) this.emit('error', ev.error ?? new Error(`websocket error (${url})`)); });
    ws.addEventListener('close', (ev) => { if (this.ws === ws) this.onClose(ev.code, ev.reason); });
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
    if (this.ws === ws) this.setState('open');
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

  /** The last position seen in `room`'s stream, `{epoch, offset}`, or null. */
  position(room) {
    const s = this.streams.get(room);
    return s ? { epoch: s.epoch, offset: s.offset } : null;
  }

  /**
   * Signs in to `room`; resolves with the server's Err `{code, msg, epoch,
   * offset, recovered}` (code 0 on success, otherwise the server closes the
   * connection). When this client has seen the room's stream before (an
   * earlier connection), it asks for what came after (`since_offset`,
   * `epoch`).
   */
  signIn(token, room, { timeoutMs = this.timeoutMs } = {}) {
    if (this.pendingSignIn) return Promise.reject(new Error('a sign-in is already pending'));
    const { SignIn } = this.proto;
    const since = this.streams.get(room);
    const fields = { token, roomID: room };
    if (since?.epoch) Object.assign(fields, { sinceOffset: since.offset, epoch: since.epoch });
    return new Promise((resolve, reject) => {
      const p = new Pending(resolve, reject, timeoutMs, 'sign-in');
      this.pendingSignIn = p;
      try {
        this.sendReq(PackageType.SIGN_IN, SignIn.encode(SignIn.create(fields)).finish());
      } catch (e) {
        this.pendingSignIn = null;
        p.reject(e);
      }
    }).then((answer) => {
      if (answer.code === ErrCode.OK) this.signedIn(token, room, answer, since);
      else this.refused = answer;
      return answer;
    }).finally(() => {
      // After a timeout or a send failure; the answer path clears it itself.
      if (this.pendingSignIn?.done) this.pendingSignIn = null;
    });
  }

  signedIn(token, room, answer, since) {
    this.session = { token, room };
    this.refused = null;
    this.attempt = 0;
    if (since?.epoch) {
      if (answer.recovered && answer.epoch === since.epoch) {
        // What came after since.offset is on its way: keep the position so
        // that it is shown, and anything seen twice is dropped.
      } else {
        this.emit('unrecovered', {
          room,
          reason: answer.epoch ? 'the server could not send the messages missed' : 'the server keeps no history of this room',
          epoch: answer.epoch,
          offset: answer.offset,
          since: { epoch: since.epoch, offset: since.offset },
        });
        this.setPosition(room, answer.epoch, answer.offset);
      }
    } else {
      this.setPosition(room, answer.epoch, answer.offset);
    }
    this.setState('signed-in');
  }

  setPosition(room, epoch, offset) {
    if (epoch) this.streams.set(room, { epoch, offset, gaps: [] });
    else this.streams.delete(room);
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
   * Throws 'not connected' while reconnecting.
   */
  send(room, level, data) {
    const { BroadcastRoomReq } = this.proto;
    const m = BroadcastRoomReq.create({ roomID: room, msgLv: level, data: bytes(data) });
    this.sendReq(PackageType.MESSAGE, BroadcastRoomReq.encode(m).finish());
  }

  /**
   * Pushed messages as an async iterator, from the moment this is called
   * (call it before the messages can arrive, e.g. before signIn). It ends
   * when the client closes for good; `break` out of the loop to stop listening.
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

  /**
   * Closes the connection and stops reconnecting; resolves with
   * `{code, reason}` once closed.
   */
  close(code = 1000, reason = '') {
    this.userClosed = true;
    if (this.closed) return Promise.resolve(this.closed);
    if (this.retryTimer !== null) {
      // Between two connections: nothing open to close.
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      this.finish({ code, reason: reason || 'closed by the client' });
      return Promise.resolve(this.closed);
    }
    if (!this.ws) return Promise.resolve(null);
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
        const err = {
          code: e.code,
          msg: e.msg,
          epoch: toNumber(e.epoch),
          offset: toNumber(e.offset),
          recovered: Boolean(e.recovered),
        };
        const refId = toNumber(e.refId);
        if (refId) err.refId = refId;
        const signIn = this.pendingSignIn;
        if (signIn) {
          // Cleared now, not in signIn's finally (a microtask later): the next
          // frame may be handled before that runs and must not be taken for
          // the sign-in answer.
          this.pendingSignIn = null;
          signIn.resolve(err);
        } else {
          this.emit('err', err);
          if (err.code === ErrCode.GONE) this.onGone(err);
        }
        break;
      }
      case PackageType.HEARTBEAT:
        this.answer(this.pendingHeartbeats, text(reply.data), 'HEARTBEAT');
        break;
      case PackageType.MEMBERS:
        this.answer(this.pendingMembers, text(reply.data), 'MEMBERS');
        break;
      case PackageType.MESSAGE:
        this.onPush(this.proto.BroadcastRoomReq.decode(reply.data));
        break;
      default:
        this.emit('error', new Error(`reply of unknown type ${reply.type}`));
    }
  }

  onPush(m) {
    // Unpack before emitting anything: a broken batch is dropped whole.
    const all = unpack(m.data);
    const room = m.roomID;
    const epoch = toNumber(m.epoch);
    const last = toNumber(m.offset);
    const batch = ++this.batches;
    let messages = all;
    let offsets = all.map(() => null);
    if (epoch) {
      const first = last - (all.length - 1);
      offsets = all.map((_, i) => first + i);
      const seen = this.streams.get(room);
      if (seen && seen.epoch === epoch) {
        // New past the last offset seen, or filling a gap left earlier (the
        // server delivers a message late, after giving up waiting for it).
        const keep = offsets.map((o) => o > seen.offset || takeGap(seen.gaps, o));
        this.duplicates += keep.filter((k) => !k).length;
        messages = all.filter((_, i) => keep[i]);
        offsets = offsets.filter((_, i) => keep[i]);
        for (const o of offsets) {
          if (o > seen.offset + 1) addGap(seen.gaps, seen.offset + 1, o);
          seen.offset = Math.max(seen.offset, o);
        }
      } else {
        // A stream not seen before, or a new epoch of it: everything is new.
        this.streams.set(room, { epoch, offset: last, gaps: [] });
      }
      if (!messages.length) return;
    }
    this.emit('batch', { room, level: m.msgLv, messages, epoch, offset: epoch ? last : null });
    messages.forEach((data, i) => {
      this.emit('message', { room, level: m.msgLv, data, batch, batchSize: all.length, epoch, offset: offsets[i] });
    });
  }

  /** An Err 410 notice: what this session lacks is gone; live from `offset` on. */
  onGone(err) {
    const room = this.session?.room ?? '';
    this.setPosition(room, err.epoch, err.offset);
    this.emit('unrecovered', { room, reason: err.msg || 'messages could not be recovered', code: err.code, msg: err.msg, epoch: err.epoch, offset: err.offset });
  }

  answer(queue, value, what) {
    const p = queue.shift();
    if (p) p.resolve(value); // a no-op if it already timed out
    else this.emit('error', new Error(`unrequested ${what} reply`));
  }

  onClose(code, reason) {
    const why = { code, reason: typeof reason === 'string' ? reason : text(reason ?? EMPTY) };
    const gone = new Error(`connection closed (code ${code}${why.reason ? `: ${why.reason}` : ''})`);
    this.pendingSignIn?.reject(gone);
    this.pendingSignIn = null;
    for (const p of this.pendingHeartbeats.splice(0)) p.reject(gone);
    for (const p of this.pendingMembers.splice(0)) p.reject(gone);
    if (this.reconnect && this.session && !this.userClosed && !this.refused) {
      const delayMs = backoffDelay(this.attempt, this.reconnect, this.random);
      this.attempt += 1;
      this.emit('reconnecting', { attempt: this.attempt, delayMs, ...why });
      this.setState('reconnecting', { delayMs, ...why });
      this.retryTimer = setTimeout(() => this.retry(), delayMs);
      return;
    }
    if (this.refused && this.session) this.emit('refused', { code: this.refused.code, msg: this.refused.msg });
    this.finish(why);
  }

  async retry() {
    this.retryTimer = null;
    if (this.userClosed) return;
    const attempt = this.attempt;
    const { token, room } = this.session;
    try {
      await this.open(this.url);
    } catch {
      // The socket's close event has scheduled the next attempt (or ended).
      return;
    }
    let answer;
    try {
      answer = await this.signIn(token, room);
    } catch (e) {
      // Closed before the answer (scheduled again), or no answer in time.
      if (this.ws?.readyState === 1) this.ws.close(1000, 'no sign-in answer');
      return;
    }
    if (answer.code === ErrCode.OK) this.emit('reconnected', { attempt, answer });
    // A refusal: the server closes the socket, and onClose ends the client.
  }

  finish(why) {
    if (this.closed) return;
    this.closed = why;
    this.setState('closed', why);
    this.emit('close', why);
  }
}
