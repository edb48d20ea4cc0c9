// Client for the chatroom IM layer: the HTTP routes of logic (accounts,
// friends, communities, history, uploads) and the JSON WebSocket of conn
// (`ws://host:8080/chat?id=<uid>&token=<jwt>`), in the IM seed's message
// format `{id, userid, dstid, cmd, media, content, pic, url, memo, amount}`.
//
// The same file runs in browsers and in Node 20+: it uses the global
// `fetch`, `FormData` and `Blob`, and the global `WebSocket` or, where there
// is none (Node 20), the `ws` package.
//
//   const api = new ImApi({ base: 'http://127.0.0.1:8081' });   // '' in a page served by logic
//   const me = await api.login('13800000001', 'secret-pw');      // {id, nickname, ..., token}
//   const sock = new ChatSocket({ url: 'ws://127.0.0.1:8080/chat', id: me.id, token: me.token });
//   sock.on('message', (m) => console.log(m.userid, m.content));
//   await sock.connect();                                        // the server's welcome
//   const ack = await sock.send({ cmd: Cmd.SINGLE, dstid: 10002, ...Build.text('hi') });
//   ack.status;                                                  // 'delivered' | 'stored'

/** `cmd` of a JSON frame. 0, 10 and 11 are the seed's; 12 and up the server's. */
export const Cmd = Object.freeze({
  HEARTBEAT: 0,
  SINGLE: 10,
  COMMUNITY: 11,
  /** An operator broadcast (server -> client only). */
  BROADCAST: 12,
  /** The answer to a message this socket sent. */
  ACK: 20,
  /** An error; `cid` names the message it is about, if any. */
  ERROR: 21,
  /** Signed in. */
  WELCOME: 22,
});

/** `media` of a message: how it is shown. */
export const Media = Object.freeze({
  TEXT: 1,
  NEWS: 2,
  VOICE: 3,
  IMAGE: 4,
  RED_PACKET: 5,
  EMOJI: 6,
  LINK: 7,
  VIDEO: 8,
  CONTACT: 9,
  USER_DEFINED: 100,
});

/** The fields of each kind of message, to spread into `send`. */
export const Build = Object.freeze({
  text: (content) => ({ media: Media.TEXT, content }),
  emoji: (content) => ({ media: Media.EMOJI, content }),
  image: (url) => ({ media: Media.IMAGE, url }),
  /** `seconds` is rounded up, at least 1 (the server wants amount > 0). */
  voice: (url, seconds) => ({ media: Media.VOICE, url, amount: Math.max(1, Math.ceil(Number(seconds) || 0)) }),
  video: (url, pic = '') => ({ media: Media.VIDEO, url, ...(pic ? { pic } : {}) }),
  link: (url, content = '') => ({ media: Media.LINK, url, ...(content ? { content } : {}) }),
  news: (title, url, { pic = '', memo = '' } = {}) => ({ media: Media.NEWS, content: title, url, pic, memo }),
  /** `cents`: the amount in fen (1/100 yuan). */
  redPacket: (cents, memo = '') => ({ media: Media.RED_PACKET, amount: cents, memo }),
  contact: (id, name = '', avatar = '') => ({ media: Media.CONTACT, content: String(id), memo: name, pic: avatar }),
  custom: (value) => ({ media: Media.USER_DEFINED, content: typeof value === 'string' ? value : JSON.stringify(value) }),
});

/**
 * A refusal: `code` is the server's (HTTP routes: the IM `code`; socket:
 * the `cmd 21` code), or -1 when the server could not be reached or did
 * not answer in JSON.
 */
export class ImError extends Error {
  constructor(code, msg, { status, body, cid } = {}) {
    super(msg);
    this.name = 'ImError';
    this.code = code;
    /** HTTP status, for HTTP routes. */
    this.status = status;
    /** The whole JSON reply, if there was one. */
    this.body = body;
    /** The client id of the refused message (socket). */
    this.cid = cid;
  }
}

/** Codes that mean "log in again". */
export const LOGIN_NEEDED = 100;

/** The default socket address for a page: the standalone conn port of the page's host. */
export function defaultWsUrl(loc = globalThis.location) {
  const secure = loc?.protocol === 'https:';
  const host = loc?.hostname || '127.0.0.1';
  return `${secure ? 'wss' : 'ws'}://${host.includes(':') ? `[${host}]` : host}:8080/chat`;
}

/** Reads a reply whatever its HTTP status: the JSON body, or an ImError. */
async function readReply(res) {
  const text = await res.text().catch(() => '');
  let body = null;
  try {
    body = JSON.parse(text);
  } catch { /* not JSON */ }
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    const shown = text.trim().slice(0, 200) || res.statusText || 'empty answer';
    throw new ImError(-1, `HTTP ${res.status}: ${shown}`, { status: res.status });
  }
  // Logic's generic 404/405 (outside the IM routes) say `code: 0` with an
  // error status: the status decides too.
  if (body.code !== 0 || !res.ok) {
    const code = typeof body.code === 'number' && body.code !== 0 ? body.code : res.status;
    throw new ImError(code, String(body.msg ?? `HTTP ${res.status}`), { status: res.status, body });
  }
  return body;
}

/** The IM HTTP routes of logic. */
export class ImApi {
  /**
   * @param {object} [opts]
   * @param {string} [opts.base] logic's address, e.g. `http://127.0.0.1:8081`;
   *   default '' (the page's own origin).
   * @param {string} [opts.token] a token from an earlier login.
   * @param {Function} [opts.fetch] default the global fetch.
   */
  constructor({ base = '', token = '', fetch: f } = {}) {
    this.base = String(base).replace(/\/+$/, '');
    this.token = token;
    this.fetch = f ?? ((...a) => globalThis.fetch(...a));
  }

  async #send(path, init) {
    const headers = { ...(init.headers ?? {}) };
    if (this.token) headers.authorization = this.token;
    let res;
    try {
      res = await this.fetch(this.base + path, { ...init, headers });
    } catch (e) {
      throw new ImError(-1, `server unreachable: ${e?.cause?.message ?? e?.message ?? e}`);
    }
    return readReply(res);
  }

  /** `POST path` with a JSON body; the whole reply (`code` 0) or an ImError. */
  call(path, fields = {}) {
    const body = {};
    for (const [k, v] of Object.entries(fields)) if (v !== undefined && v !== null) body[k] = v;
    return this.#send(path, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
  }

  /** Creates an account; answers the user (`{id, mobile, nickname, ...}`). */
  async register({ mobile, passwd, nickname, avatar, memo }) {
    return (await this.call('/user/register', { mobile, passwd, nickname, avatar, memo })).data;
  }

  /** Logs in and keeps the token for later calls; answers `{id, nickname, ..., token}`. */
  async login(mobile, passwd) {
    const { data } = await this.call('/user/login', { mobile, passwd });
    this.token = data.token;
    return data;
  }

  /** A user by id (or `{mobile}`). */
  async find(query) {
    const q = typeof query === 'object' ? query : { id: query };
    return (await this.call('/user/find', q)).data;
  }

  /** Befriends `dstid` (both ways, as in the seed); answers the friend. */
  async addFriend(dstid) {
    return (await this.call('/contact/addfriend', { dstid })).data;
  }

  async friends() {
    return (await this.call('/contact/friend')).rows ?? [];
  }

  /** Answers the new community (`{id, name, owner, icon, memo, ...}`). */
  async createCommunity({ name, memo, icon }) {
    return (await this.call('/contact/createcommunity', { name, memo, icon })).data;
  }

  async communities() {
    return (await this.call('/contact/community')).rows ?? [];
  }

  async joinCommunity(dstid) {
    return (await this.call('/contact/joincommunity', { dstid })).data;
  }

  /**
   * A page of a conversation, newest first: with user `dstid` (cmd 10) or
   * in community `dstid` (cmd 11); `before` a message id for older pages.
   */
  async history(dstid, cmd = Cmd.SINGLE, { before, limit = 20 } = {}) {
    return (await this.call('/chat/history', { dstid, cmd, before, limit })).rows ?? [];
  }

  /**
   * Uploads a file (Blob/File); answers its URL (`/attach/files/<name>`).
   * `filetype` (".png", ".webm") or a file name with an extension says what it is.
   */
  async upload(file, { filename, filetype } = {}) {
    const form = new FormData();
    if (filetype) form.append('filetype', filetype);
    form.append('file', file, filename ?? file?.name ?? 'blob');
    return (await this.#send('/attach/upload', { method: 'POST', body: form })).data;
  }
}

// ---------------------------------------------------------------- socket

const decoder = new TextDecoder();

function frameText(data) {
  if (typeof data === 'string') return data;
  if (data instanceof ArrayBuffer) return decoder.decode(new Uint8Array(data));
  if (ArrayBuffer.isView(data)) return decoder.decode(data);
  return String(data);
}

/** Never-ending timers must not keep Node alive. */
function unref(t) {
  t?.unref?.();
  return t;
}

/**
 * The JSON WebSocket of conn, with acks matched to sent messages, a
 * heartbeat, and reconnection with exponential backoff after the socket
 * drops (not after `close()`, nor after a refused sign-in).
 *
 * Events (`on(name, fn)` answers a function that removes the listener):
 * - `welcome` `{cmd: 22, userid, ...}`: signed in (again, after a reconnect).
 * - `message`: a pushed message (cmd 10, 11 or 12), including this user's own.
 * - `ack`: `{cmd: 20, id, cid, dstid, status, content, createat}`.
 * - `refused`: `{cmd: 21, code, msg, cid}` for any error frame.
 * - `pong`, `close` `{code, reason}`, `error` (socket errors),
 * - `state` `{state: 'connecting'|'open'|'waiting'|'closed', attempt, delayMs, reason}`.
 */
export class ChatSocket {
  /**
   * @param {object} opts
   * @param {string} opts.url `ws://host:8080/chat` (id and token are added).
   * @param {number|string} opts.id the user id.
   * @param {string} opts.token the login token.
   * @param {Function} [opts.WebSocket] default the global one, else `ws`.
   * @param {number} [opts.heartbeatMs] default 20000 (the server closes after 3 silent 30 s periods).
   * @param {number} [opts.timeoutMs] for the welcome and for each ack, default 10000.
   * @param {boolean} [opts.reconnect] default true.
   * @param {number} [opts.minBackoffMs] default 500; doubles per failed attempt.
   * @param {number} [opts.maxBackoffMs] default 15000.
   */
  constructor({ url, id, token, WebSocket, heartbeatMs = 20000, timeoutMs = 10000, reconnect = true, minBackoffMs = 500, maxBackoffMs = 15000 }) {
    this.url = url;
    this.id = String(id);
    this.token = token;
    this.WebSocket = WebSocket;
    this.heartbeatMs = heartbeatMs;
    this.timeoutMs = timeoutMs;
    this.reconnect = reconnect;
    this.minBackoffMs = minBackoffMs;
    this.maxBackoffMs = maxBackoffMs;
    /** 'idle' | 'connecting' | 'open' | 'waiting' | 'closed' */
    this.state = 'idle';
    /** The server's welcome of the current connection. */
    this.welcome = null;
    this.ws = null;
    this.listeners = new Map();
    this.pending = new Map(); // cid -> {resolve, reject, timer}
    this.pongs = [];
    this.nextCid = 1;
    this.attempt = 0;
    this.wanted = false;
    this.retryTimer = null;
    this.beatTimer = null;
  }

  on(name, fn) {
    if (!this.listeners.has(name)) this.listeners.set(name, new Set());
    this.listeners.get(name).add(fn);
    return () => this.listeners.get(name)?.delete(fn);
  }

  emit(name, value) {
    for (const fn of [...(this.listeners.get(name) ?? [])]) {
      try {
        fn(value);
      } catch (e) {
        queueMicrotask(() => { throw e; });
      }
    }
  }

  #setState(state, extra = {}) {
    this.state = state;
    this.emit('state', { state, attempt: this.attempt, ...extra });
  }

  /** The socket address with `id` and `token`. */
  socketUrl() {
    const u = new URL(this.url);
    u.searchParams.set('id', this.id);
    u.searchParams.set('token', this.token);
    return u.toString();
  }

  /**
   * Connects; resolves with the server's welcome, rejects with an ImError
   * when the sign-in is refused or the socket cannot be opened. From then on
   * (and after a failed first attempt that may succeed later) the socket
   * reconnects by itself until `close()`.
   */
  connect() {
    this.wanted = true;
    clearTimeout(this.retryTimer);
    return this.#open();
  }

  async #open() {
    const WS = this.WebSocket ?? globalThis.WebSocket ?? (await import('ws')).default;
    if (!this.wanted) throw new ImError(-1, 'closed');
    this.#setState('connecting');
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WS(this.socketUrl());
      } catch (e) {
        this.#setState('closed', { reason: e.message });
        reject(new ImError(-1, `cannot open ${this.url}: ${e.message}`));
        return;
      }
      this.ws = ws;
      let welcomed = false;
      let refusal = null;
      const timer = setTimeout(() => {
        if (welcomed) return;
        refusal ??= new ImError(-1, `no answer from ${this.url} within ${this.timeoutMs} ms`);
        ws.close();
      }, this.timeoutMs);

      ws.addEventListener('message', (ev) => {
        let m;
        try {
          m = JSON.parse(frameText(ev.data));
        } catch {
          this.emit('error', new Error(`not JSON: ${frameText(ev.data).slice(0, 100)}`));
          return;
        }
        if (!m || typeof m !== 'object') return;
        if (!welcomed) {
          if (m.cmd === Cmd.WELCOME && m.code === 0) {
            welcomed = true;
            clearTimeout(timer);
            this.welcome = m;
            this.attempt = 0;
            this.#setState('open');
            this.#startHeartbeat();
            this.emit('welcome', m);
            resolve(m);
            return;
          }
          if (m.cmd === Cmd.ERROR) {
            refusal = new ImError(m.code, `sign-in refused: ${m.msg}`);
            this.emit('refused', m);
            return;
          }
        }
        this.#dispatch(m);
      });
      ws.addEventListener('error', (ev) => {
        this.emit('error', ev?.error ?? new Error(ev?.message ?? 'websocket error'));
      });
      ws.addEventListener('close', (ev) => {
        clearTimeout(timer);
        this.#stopHeartbeat();
        if (this.ws === ws) this.ws = null;
        const info = { code: ev.code, reason: ev.reason ?? '' };
        this.emit('close', info);
        for (const [cid, p] of this.pending) {
          clearTimeout(p.timer);
          p.reject(new ImError(-1, 'connection lost before the answer: the message may or may not have been sent', { cid }));
        }
        this.pending.clear();
        for (const p of this.pongs.splice(0)) p.reject(new ImError(-1, 'connection lost'));
        if (!welcomed) {
          reject(refusal ?? new ImError(-1, `cannot connect to ${this.url} (close ${ev.code}${ev.reason ? `: ${ev.reason}` : ''})`));
        }
        // A refused sign-in (bad or expired token) will not get better by retrying.
        const fatal = refusal && refusal.code !== -1 && refusal.code !== 503;
        if (this.wanted && this.reconnect && !fatal) {
          this.#scheduleRetry(refusal?.message ?? `closed (${ev.code})`);
        } else {
          this.wanted = false;
          this.#setState('closed', { reason: refusal?.message ?? `closed (${ev.code})`, code: refusal?.code });
        }
      });
    });
  }

  #scheduleRetry(reason) {
    const base = Math.min(this.maxBackoffMs, this.minBackoffMs * 2 ** this.attempt);
    const delayMs = Math.round(base / 2 + Math.random() * base / 2);
    this.attempt += 1;
    this.#setState('waiting', { delayMs, reason });
    this.retryTimer = setTimeout(() => {
      if (!this.wanted) return;
      this.#open().catch(() => { /* the close handler schedules the next try */ });
    }, delayMs);
  }

  #dispatch(m) {
    switch (m.cmd) {
      case Cmd.ACK: {
        const p = this.pending.get(m.cid);
        if (p) {
          this.pending.delete(m.cid);
          clearTimeout(p.timer);
          p.resolve(m);
        }
        this.emit('ack', m);
        return;
      }
      case Cmd.ERROR: {
        const p = m.cid ? this.pending.get(m.cid) : undefined;
        if (p) {
          this.pending.delete(m.cid);
          clearTimeout(p.timer);
          p.reject(new ImError(m.code, String(m.msg ?? 'refused'), { cid: m.cid, body: m }));
        }
        this.emit('refused', m);
        return;
      }
      case Cmd.HEARTBEAT:
        this.pongs.shift()?.resolve(m.content);
        this.emit('pong', m);
        return;
      default:
        this.emit('message', m);
    }
  }

  #startHeartbeat() {
    this.#stopHeartbeat();
    if (this.heartbeatMs > 0) {
      this.beatTimer = unref(setInterval(() => {
        this.heartbeat().catch(() => { /* a dead socket shows as a close */ });
      }, this.heartbeatMs));
    }
  }

  #stopHeartbeat() {
    clearInterval(this.beatTimer);
    this.beatTimer = null;
  }

  get open() {
    return this.state === 'open' && this.ws !== null;
  }

  /** Sends `{cmd: 0}`; resolves with the server's "pong". */
  heartbeat() {
    if (!this.open) return Promise.reject(new ImError(-1, 'not connected'));
    return new Promise((resolve, reject) => {
      const entry = { resolve, reject };
      this.pongs.push(entry);
      const timer = unref(setTimeout(() => {
        const i = this.pongs.indexOf(entry);
        if (i >= 0) this.pongs.splice(i, 1);
        reject(new ImError(-1, `no pong within ${this.timeoutMs} ms`));
      }, this.timeoutMs));
      entry.resolve = (v) => { clearTimeout(timer); resolve(v); };
      entry.reject = (e) => { clearTimeout(timer); reject(e); };
      this.ws.send(JSON.stringify({ cmd: Cmd.HEARTBEAT }));
    });
  }

  /** The client id the next `send` will use. */
  peekCid() {
    return this.nextCid;
  }

  /**
   * Sends a message (`{cmd, dstid, media, content, url, pic, memo, amount}`);
   * resolves with its ack (`status` 'delivered' or 'stored'), rejects with an
   * ImError carrying the server's code (403 not a friend, 413 too large,
   * 429 slow down, ...) or -1 when not connected / no answer.
   * `onCid(cid)` is called with the client id first, to match later events.
   */
  send(fields, onCid) {
    const cid = this.nextCid++;
    onCid?.(cid);
    if (!this.open) return Promise.reject(new ImError(-1, 'not connected', { cid }));
    const msg = { ...fields, id: cid, userid: Number(this.id) };
    for (const k of Object.keys(msg)) if (msg[k] === undefined || msg[k] === null || msg[k] === '') delete msg[k];
    return new Promise((resolve, reject) => {
      const timer = unref(setTimeout(() => {
        this.pending.delete(cid);
        reject(new ImError(-1, `no answer within ${this.timeoutMs} ms`, { cid }));
      }, this.timeoutMs));
      this.pending.set(cid, { resolve, reject, timer });
      try {
        this.ws.send(JSON.stringify(msg));
      } catch (e) {
        this.pending.delete(cid);
        clearTimeout(timer);
        reject(new ImError(-1, `not sent: ${e.message}`, { cid }));
      }
    });
  }

  /** Stops reconnecting and closes; resolves once closed. */
  close() {
    this.wanted = false;
    clearTimeout(this.retryTimer);
    const ws = this.ws;
    if (!ws) {
      this.#setState('closed', { reason: 'closed by the client' });
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      ws.addEventListener('close', () => resolve());
      ws.close(1000);
    });
  }
}
