// The IM chat page (chat.html): the seed's chat app on lib/im.mjs.
//
// State lives in plain objects; the DOM is updated in place (messages are
// inserted by id, never re-rendered wholesale) and only through text nodes
// and checked attributes (lib/im-render.mjs): nothing a user sent is ever
// parsed as HTML.

import { Build, ChatSocket, Cmd, ImApi, ImError, LOGIN_NEEDED, defaultWsUrl } from './lib/im.mjs';
import { EMOJI_BUTTONS, el, formatTime, renderBody } from './lib/im-render.mjs';

const PAGE = 20; // history page size
const SESSION_KEY = 'chatroom.im.session';
const WS_KEY = 'chatroom.im.ws';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const api = new ImApi();

/** The logged-in user: {id, nickname, mobile, token, ...}. */
let me = null;
let sock = null;
let everConnected = false;
const friends = new Map(); // id -> user
const communities = new Map(); // id -> community
const names = new Map(); // uid -> nickname, friends and looked-up users
const lookups = new Set(); // uids being looked up
const convs = new Map(); // "cmd:peer" -> conversation
let current = null;

// ---------------------------------------------------------------- notices

let noticeTimer = null;
function notify(text, kind = 'error') {
  $('notice-text').textContent = text;
  $('notice').className = `notice ${kind}`;
  $('notice').hidden = false;
  clearTimeout(noticeTimer);
  if (kind !== 'error') noticeTimer = setTimeout(() => { $('notice').hidden = true; }, 6000);
}

function describe(e) {
  if (e instanceof ImError) return e.code > 0 ? `${e.message} (code ${e.code})` : e.message;
  return String(e?.message ?? e);
}

/** Shows an API failure; a lost login goes back to the log-in screen. */
function failed(what, e) {
  if (e instanceof ImError && e.code === LOGIN_NEEDED) {
    logout('Your session has ended: log in again.');
    return;
  }
  notify(`${what}: ${describe(e)}`);
}

function busy(text) {
  $('busy').textContent = text;
}

// ---------------------------------------------------------------- session

function wsUrl() {
  return params.get('ws') || localStorage.getItem(WS_KEY) || defaultWsUrl(location);
}

function saveSession() {
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(me));
}

async function loggedIn(user) {
  me = { ...user, id: Number(user.id) };
  api.token = me.token;
  saveSession();
  // An earlier failure (a mistyped password) is no longer news.
  $('notice').hidden = true;
  names.set(me.id, me.nickname || `#${me.id}`);
  $('auth').hidden = true;
  $('app').hidden = false;
  $('logout').hidden = false;
  $('me').textContent = `${me.nickname || me.mobile} · id ${me.id}`;
  selectConv(null);
  await loadContacts();
  if (me) openSocket();
}

function logout(reason) {
  const s = sock;
  sock = null;
  s?.close();
  me = null;
  api.token = '';
  everConnected = false;
  sessionStorage.removeItem(SESSION_KEY);
  friends.clear();
  communities.clear();
  convs.clear();
  names.clear();
  current = null;
  $('friends').replaceChildren();
  $('communities').replaceChildren();
  $('msg-list').replaceChildren();
  $('app').hidden = true;
  $('logout').hidden = true;
  $('auth').hidden = false;
  $('me').textContent = '';
  setConn('closed', 'offline');
  if (reason) notify(reason, 'info');
}

function formFields(form) {
  return Object.fromEntries(new FormData(form).entries());
}

async function onLogin(ev) {
  ev.preventDefault();
  const { mobile, passwd } = formFields(ev.target);
  try {
    await loggedIn(await api.login(mobile.trim(), passwd));
    ev.target.reset();
  } catch (e) {
    failed('Log-in failed', e);
  }
}

async function onRegister(ev) {
  ev.preventDefault();
  const { mobile, passwd, nickname } = formFields(ev.target);
  try {
    await api.register({ mobile: mobile.trim(), passwd, nickname: nickname.trim() || undefined });
    await loggedIn(await api.login(mobile.trim(), passwd));
    ev.target.reset();
    notify('Welcome! Add a friend by id, or create a community.', 'info');
  } catch (e) {
    failed('Registration failed', e);
  }
}

// ---------------------------------------------------------------- socket

function setConn(state, text) {
  $('conn').dataset.state = state;
  $('conn').textContent = text;
}

function openSocket() {
  const s = new ChatSocket({ url: wsUrl(), id: me.id, token: me.token });
  sock = s;
  s.on('state', (st) => {
    if (sock !== s) return;
    if (st.state === 'open') setConn('open', 'online');
    else if (st.state === 'connecting') setConn('connecting', 'connecting…');
    else if (st.state === 'waiting') setConn('waiting', `reconnecting in ${Math.ceil(st.delayMs / 1000)} s (${st.reason})`);
    else if (st.state === 'closed') {
      setConn('closed', 'offline');
      if (st.code === LOGIN_NEEDED) logout('Your session has ended: log in again.');
      else if (st.reason && me) notify(`Chat connection closed: ${st.reason}`);
    }
  });
  s.on('welcome', () => {
    if (sock !== s) return;
    // After a reconnect, catch up with what the open conversation missed.
    if (everConnected && current) refreshNewest(current);
    everConnected = true;
  });
  s.on('message', (m) => { if (sock === s) onPush(m); });
  s.on('refused', (m) => {
    // Errors about a sent message are shown on that message.
    if (sock === s && !m.cid && me) notify(`Server: ${m.msg} (code ${m.code})`);
  });
  s.connect().catch((e) => {
    if (sock !== s) return;
    if (e.code === LOGIN_NEEDED) logout('Your session has ended: log in again.');
    else notify(`Chat connection to ${s.url}: ${describe(e)} — retrying`, 'info');
  });
}

// ---------------------------------------------------------------- contacts

function nameOf(uid) {
  if (uid === me?.id) return 'me';
  const n = names.get(uid);
  if (n) return n;
  if (Number.isSafeInteger(uid) && uid > 0 && !lookups.has(uid)) {
    lookups.add(uid);
    api.find(uid).then((u) => {
      names.set(uid, u.nickname || `#${uid}`);
      refreshNames();
    }, () => { /* stays "#id" */ });
  }
  return `#${uid}`;
}

/** Sender labels again, in every conversation (shown or not), once names are known. */
function refreshNames() {
  for (const c of convs.values()) {
    for (const item of c.items) {
      const who = item.el.querySelector('.who');
      if (who) who.textContent = nameOf(item.msg.userid);
    }
  }
}

async function loadContacts() {
  try {
    const [fs, cs] = await Promise.all([api.friends(), api.communities()]);
    friends.clear();
    for (const f of fs) {
      friends.set(f.id, f);
      names.set(f.id, f.nickname || `#${f.id}`);
    }
    communities.clear();
    for (const c of cs) communities.set(c.id, c);
    renderLists();
    refreshNames();
  } catch (e) {
    failed('Loading contacts failed', e);
  }
}

function listItem(c, label, id) {
  const b = el(document, 'button', { className: c === current ? 'active' : '', attrs: { type: 'button' } },
    el(document, 'span', { text: label }),
    el(document, 'span', {}, c.unread ? el(document, 'span', { className: 'badge', text: c.unread }) : null,
      el(document, 'span', { className: 'id', text: ` #${id}` })));
  b.addEventListener('click', () => selectConv(c));
  return el(document, 'li', {}, b);
}

function renderLists() {
  $('friends').replaceChildren(...[...friends.values()].map((f) =>
    listItem(conv(Cmd.SINGLE, f.id), f.nickname || `#${f.id}`, f.id)));
  $('communities').replaceChildren(...[...communities.values()].map((c) =>
    listItem(conv(Cmd.COMMUNITY, c.id), c.name, c.id)));
}

async function onAddFriend(ev) {
  ev.preventDefault();
  const id = Number(formFields(ev.target).id);
  try {
    const f = await api.addFriend(id);
    ev.target.reset();
    await loadContacts();
    selectConv(conv(Cmd.SINGLE, f.id));
  } catch (e) {
    failed(`Adding friend ${id} failed`, e);
  }
}

async function onCreateCommunity(ev) {
  ev.preventDefault();
  const { name } = formFields(ev.target);
  try {
    const c = await api.createCommunity({ name: name.trim() });
    ev.target.reset();
    await loadContacts();
    selectConv(conv(Cmd.COMMUNITY, c.id));
    notify(`Community "${c.name}" created: its id is ${c.id}.`, 'info');
  } catch (e) {
    failed('Creating the community failed', e);
  }
}

async function onJoinCommunity(ev) {
  ev.preventDefault();
  const id = Number(formFields(ev.target).id);
  try {
    const c = await api.joinCommunity(id);
    ev.target.reset();
    await loadContacts();
    selectConv(conv(Cmd.COMMUNITY, c.id));
  } catch (e) {
    failed(`Joining community ${id} failed`, e);
  }
}

// ---------------------------------------------------------------- conversations

/** A conversation with user `peer` (cmd 10) or in community `peer` (cmd 11). */
function conv(cmd, peer) {
  const key = `${cmd}:${peer}`;
  let c = convs.get(key);
  if (!c) {
    // items: sorted by id; unsent ones (id null) last.
    c = { key, cmd, peer, items: [], byId: new Map(), loaded: false, hasMore: true, loading: false, unread: 0 };
    convs.set(key, c);
  }
  return c;
}

function title(c) {
  if (c.cmd === Cmd.SINGLE) return `${friends.get(c.peer)?.nickname ?? `#${c.peer}`} (user ${c.peer})`;
  return `${communities.get(c.peer)?.name ?? 'community'} (community ${c.peer})`;
}

function selectConv(c) {
  current = c;
  $('composer').setAttribute('aria-disabled', c ? 'false' : 'true');
  $('chat-title').textContent = c ? title(c) : 'Pick a friend or a community';
  $('msg-list').replaceChildren(...(c ? c.items.map((i) => i.el) : []));
  $('older').hidden = !c || !c.hasMore;
  if (!c) return;
  c.unread = 0;
  renderLists();
  scrollToEnd();
  if (!c.loaded) loadOlder(c);
  $('text').focus();
}

function nearEnd() {
  const box = $('messages');
  return box.scrollTop + box.clientHeight >= box.scrollHeight - 40;
}

function scrollToEnd() {
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
}

function messageEl(m) {
  const mine = m.userid === me.id;
  return el(document, 'li', { className: `msg${mine ? ' mine' : ''}` },
    el(document, 'div', { className: 'meta' },
      el(document, 'span', { className: 'who', attrs: { 'data-uid': m.userid }, text: nameOf(m.userid) }),
      el(document, 'time', { text: formatTime(m.createat) })),
    renderBody(document, m, location.href),
    el(document, 'span', { className: 'tick' }));
}

/** Puts an item in its place (by id) in the conversation and, if shown, the page. */
function place(c, item) {
  const key = (i) => i.id ?? Number.MAX_VALUE;
  let at = c.items.length;
  while (at > 0 && key(c.items[at - 1]) > key(item)) at--;
  c.items.splice(at, 0, item);
  if (item.id !== null) c.byId.set(item.id, item);
  if (c === current) {
    const stick = nearEnd();
    $('msg-list').insertBefore(item.el, c.items[at + 1]?.el ?? null);
    if (stick) scrollToEnd();
  }
}

function unplace(c, item) {
  const i = c.items.indexOf(item);
  if (i >= 0) c.items.splice(i, 1);
  if (item.id !== null && c.byId.get(item.id) === item) c.byId.delete(item.id);
  item.el.remove();
}

/** Adds a stored or pushed message (one JSON shape) unless it is there already. */
function addMessage(c, m) {
  if (c.byId.has(m.id)) return false;
  place(c, { id: m.id, msg: m, el: messageEl(m) });
  return true;
}

async function loadOlder(c) {
  if (c.loading) return;
  c.loading = true;
  $('older').disabled = true;
  const oldest = c.items.find((i) => i.id !== null)?.id;
  try {
    const rows = await api.history(c.peer, c.cmd, { before: oldest, limit: PAGE });
    const box = $('messages');
    const fromEnd = box.scrollHeight - box.scrollTop;
    for (const r of rows) addMessage(c, r); // newest first; each goes to its place
    c.hasMore = rows.length === PAGE;
    if (c === current) {
      // The first page shows the newest; older pages keep the view where it was.
      if (!c.loaded) scrollToEnd();
      else box.scrollTop = box.scrollHeight - fromEnd;
    }
    c.loaded = true;
  } catch (e) {
    failed('Loading history failed', e);
  } finally {
    c.loading = false;
    $('older').disabled = false;
    if (c === current) $('older').hidden = !c.hasMore;
  }
}

/** The newest page again (after a reconnect), merged into what is shown. */
async function refreshNewest(c) {
  try {
    for (const r of await api.history(c.peer, c.cmd, { limit: PAGE })) addMessage(c, r);
  } catch (e) {
    failed('Refreshing the conversation failed', e);
  }
}

function onPush(m) {
  if (m.cmd === Cmd.BROADCAST) {
    notify(`📢 ${m.content || m.url || 'announcement'}`, 'info');
    return;
  }
  let c;
  if (m.cmd === Cmd.SINGLE) {
    const peer = m.userid === me.id ? m.dstid : m.userid;
    if (!friends.has(peer)) loadContacts(); // someone befriended us
    c = conv(Cmd.SINGLE, peer);
  } else if (m.cmd === Cmd.COMMUNITY) {
    if (!communities.has(m.dstid)) loadContacts();
    c = conv(Cmd.COMMUNITY, m.dstid);
  } else {
    return;
  }
  if (addMessage(c, m) && c !== current && m.userid !== me.id) {
    c.unread += 1;
    renderLists();
  }
}

// ---------------------------------------------------------------- sending

function setTick(item, text, cls = '', retry = null) {
  const tick = item.el.querySelector('.tick');
  tick.className = `tick ${cls}`;
  tick.replaceChildren(document.createTextNode(text));
  if (retry) {
    const b = el(document, 'button', { attrs: { type: 'button' }, text: 'retry' });
    b.addEventListener('click', retry);
    tick.append(b);
  }
}

const ACK_TEXT = {
  [Cmd.SINGLE]: { delivered: '✓ delivered', stored: '✓ stored for later (offline)' },
  [Cmd.COMMUNITY]: { delivered: '✓ delivered', stored: '✓ sent (no member online)' },
};

/** Shows `fields` as sent to the open conversation and sends it. */
function send(fields) {
  const c = current;
  if (!c || !me) return;
  const m = { ...fields, cmd: c.cmd, dstid: c.peer, userid: me.id, createat: Date.now() };
  const item = { id: null, msg: m, el: messageEl(m) };
  item.el.classList.add('pending');
  place(c, item);
  scrollToEnd();
  setTick(item, 'sending…');
  const s = sock;
  if (!s) {
    setTick(item, '✗ not connected', 'error');
    return;
  }
  s.send({ cmd: c.cmd, dstid: c.peer, ...fields }).then((ack) => {
    item.el.classList.remove('pending');
    unplace(c, item);
    // Our own message may have come back (pushed) before its ack.
    let shown = c.byId.get(ack.id);
    if (!shown) {
      item.id = ack.id;
      item.msg = { ...m, id: ack.id, createat: ack.createat || m.createat };
      place(c, item);
      shown = item;
    }
    setTick(shown, ACK_TEXT[c.cmd]?.[ack.status] ?? `✓ ${ack.status}`);
  }, (e) => {
    item.el.classList.remove('pending');
    const again = () => { unplace(c, item); if (current === c) send(fields); };
    setTick(item, `✗ not sent: ${describe(e)}`, 'error', e.code === -1 || e.code === 429 || e.code === 503 ? again : null);
  });
}

function onCompose(ev) {
  ev.preventDefault();
  const text = $('text').value;
  if (!text.trim()) return;
  send(Build.text(text));
  $('text').value = '';
}

async function uploadAndSend(file, opts, build) {
  busy('uploading…');
  try {
    const url = await api.upload(file, opts);
    send(build(url));
  } catch (e) {
    failed('Upload failed', e);
  } finally {
    busy('');
  }
}

function onImage(ev) {
  const file = ev.target.files?.[0];
  ev.target.value = '';
  if (file && current) uploadAndSend(file, {}, (url) => Build.image(url));
}

/** An audio file's length in seconds, 1 if the browser cannot tell. */
function audioSeconds(file) {
  return new Promise((resolve) => {
    const a = document.createElement('audio');
    const src = URL.createObjectURL(file);
    const done = (v) => { URL.revokeObjectURL(src); resolve(Number.isFinite(v) && v > 0 ? v : 1); };
    const timer = setTimeout(() => done(1), 3000);
    a.preload = 'metadata';
    a.addEventListener('loadedmetadata', () => { clearTimeout(timer); done(a.duration); });
    a.addEventListener('error', () => { clearTimeout(timer); done(1); });
    a.src = src;
  });
}

async function onVoiceFile(ev) {
  const file = ev.target.files?.[0];
  ev.target.value = '';
  if (!file || !current) return;
  const secs = await audioSeconds(file);
  uploadAndSend(file, {}, (url) => Build.voice(url, secs));
}

let recording = null; // {recorder, stream, started, timer}

function extFor(mime) {
  if (mime.includes('ogg')) return '.ogg';
  if (mime.includes('mp4') || mime.includes('aac')) return '.m4a';
  if (mime.includes('mpeg')) return '.mp3';
  return '.webm';
}

async function onRecord() {
  const button = $('record');
  if (recording) {
    recording.recorder.stop();
    return;
  }
  if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === 'undefined') {
    notify('This browser cannot record here (recording needs https or localhost): send a voice file instead.');
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    notify(`No microphone: ${e.message}`);
    return;
  }
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  const c = current;
  const started = Date.now();
  recording = { recorder, stream };
  button.classList.add('recording');
  const tick = () => { button.textContent = `■ Stop (${Math.round((Date.now() - started) / 1000)} s)`; };
  tick();
  const timer = setInterval(tick, 500);
  recorder.addEventListener('dataavailable', (e) => { if (e.data.size) chunks.push(e.data); });
  recorder.addEventListener('stop', () => {
    clearInterval(timer);
    stream.getTracks().forEach((t) => t.stop());
    recording = null;
    button.classList.remove('recording');
    button.textContent = '🎤 Record';
    const secs = (Date.now() - started) / 1000;
    const type = recorder.mimeType || 'audio/webm';
    const blob = new Blob(chunks, { type });
    if (!blob.size || current !== c) return;
    const ext = extFor(type);
    uploadAndSend(blob, { filename: `voice${ext}`, filetype: ext }, (url) => Build.voice(url, secs));
  });
  recorder.start();
}

// ---------------------------------------------------------------- start

function boot() {
  $('ws-url').value = wsUrl();
  $('ws-url').addEventListener('change', () => {
    const v = $('ws-url').value.trim();
    if (v) localStorage.setItem(WS_KEY, v);
    else localStorage.removeItem(WS_KEY);
  });
  $('notice-close').addEventListener('click', () => { $('notice').hidden = true; });
  $('login-form').addEventListener('submit', onLogin);
  $('register-form').addEventListener('submit', onRegister);
  $('logout').addEventListener('click', () => logout());
  $('add-friend').addEventListener('submit', onAddFriend);
  $('create-community').addEventListener('submit', onCreateCommunity);
  $('join-community').addEventListener('submit', onJoinCommunity);
  $('older').addEventListener('click', () => { if (current) loadOlder(current); });
  // Scrolling up to the top loads the page before it, as the button does.
  $('messages').addEventListener('scroll', () => {
    const c = current;
    if (c && c.loaded && c.hasMore && !c.loading && $('messages').scrollTop < 40) loadOlder(c);
  }, { passive: true });
  $('composer').addEventListener('submit', onCompose);
  $('text').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) onCompose(ev);
  });
  $('emojis').replaceChildren(...EMOJI_BUTTONS.map((e) => {
    const b = el(document, 'button', { attrs: { type: 'button', title: 'send' }, text: e });
    b.addEventListener('click', () => send(Build.emoji(e)));
    return b;
  }));
  $('image-file').addEventListener('change', onImage);
  $('voice-file').addEventListener('change', onVoiceFile);
  $('record').addEventListener('click', onRecord);
  $('composer').setAttribute('aria-disabled', 'true');

  if (params.has('id') || params.has('token')) {
    fromLink(params.get('id'), params.get('token'));
    return;
  }
  let saved = null;
  try {
    saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) ?? 'null');
  } catch { /* ignore */ }
  if (saved?.token && saved?.id) loggedIn(saved);
}

/**
 * The IM seed's entry, `/chat/index.shtml?id=<id>&token=<token>` (logic
 * redirects it here with its query): signs in as that user. The token
 * leaves the address bar (and history) at once.
 */
async function fromLink(id, token) {
  params.delete('id');
  params.delete('token');
  const rest = params.toString();
  history.replaceState(null, '', `${location.pathname}${rest ? `?${rest}` : ''}${location.hash}`);
  const uid = Number(id);
  if (!Number.isSafeInteger(uid) || uid <= 0 || !token) {
    notify('This sign-in link needs a user id and a token: log in instead.');
    return;
  }
  api.token = token;
  try {
    // userid: the server refuses a token that belongs to someone else.
    const { data: user } = await api.call('/user/find', { id: uid, userid: uid });
    await loggedIn({ ...user, id: uid, token });
  } catch (e) {
    api.token = '';
    if (e instanceof ImError && e.code === LOGIN_NEEDED) notify('This sign-in link has expired or is not valid: log in again.');
    else notify(`Signing in from the link failed: ${describe(e)}`);
  }
}

boot();
