// The IM chat page (web/chat.html) in headless Chromium against the
// standalone binary: register, log in (and a wrong password), add a friend,
// 1:1 chat both ways live with "delivered" / "stored" acks, emoji, an image
// upload shown as an image, a voice file shown as a player, every other
// media type (sent by another client) shown as its card, offline messages
// at the next log-in, a community with three users, older history on
// scroll and "Load older", the IM seed's entry /chat/index.shtml?id=&token=,
// and the page on a phone-sized viewport.
//
//   cd web && npm ci && CHATROOM_BIN=../target/debug/chatroom node --test test/browser-im.test.mjs
//
// Screenshots: web/screenshots/im/ (printed at the start).

import assert from 'node:assert/strict';
import { randomInt } from 'node:crypto';
import { after, before, test } from 'node:test';

import { Build, ChatSocket, Cmd, ImApi } from '../lib/im.mjs';
import { DESKTOP, PHONE, UI_MS, assertNoHorizontalScroll, guard, launchBrowser, screenshots, startServer, stopServer } from './browser.mjs';

const PW = 'secret-pw';
// A 1×1 PNG and a short WAV: uploads are checked by their first bytes.
const PNG = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==', 'base64');
function wav() {
  const b = Buffer.alloc(44 + 8000);
  b.write('RIFF', 0);
  b.writeUInt32LE(b.length - 8, 4);
  b.write('WAVEfmt ', 8);
  b.writeUInt32LE(16, 16);
  b.writeUInt16LE(1, 20);
  b.writeUInt16LE(1, 22);
  b.writeUInt32LE(8000, 24);
  b.writeUInt32LE(8000, 28);
  b.writeUInt16LE(1, 32);
  b.writeUInt16LE(8, 34);
  b.write('data', 36);
  b.writeUInt32LE(8000, 40);
  return b;
}

const run = randomInt(1e6, 1e7 - 1);
let nextMobile = 0;
const mobile = () => `15${run}${String(nextMobile++).padStart(2, '0')}`;

let server;
let browser;
let shots;
const sockets = [];
/** Users by name: {mobile, id, nickname, page?, ctx?, g?}. */
const users = {};

before(async () => {
  shots = await screenshots('im');
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  for (const s of sockets) await s.close().catch(() => {});
  await browser?.close();
  await stopServer(server);
});

const chatUrl = (extra = '') => `${server.base}/web/chat.html?ws=${encodeURIComponent(`${server.wsBase}/chat`)}${extra}`;

async function open(label, viewport = DESKTOP) {
  const ctx = await browser.newContext({ viewport });
  const page = await ctx.newPage();
  page.setDefaultTimeout(UI_MS);
  return { ctx, page, g: guard(page, label), label };
}

const visible = (page, selector, hasText) => page.locator(selector, hasText === undefined ? {} : { hasText }).first().waitFor({ timeout: UI_MS });

/** Waits for the signed-in app with the socket online; answers the user id shown. */
async function signedIn(page) {
  await visible(page, '#app');
  await page.waitForFunction(() => document.getElementById('conn').dataset.state === 'open', null, { timeout: UI_MS });
  const me = await page.textContent('#me');
  const m = me.match(/id (\d+)$/);
  assert.ok(m, `#me shows the id: ${me}`);
  return Number(m[1]);
}

async function register(u, nickname) {
  const f = u.page.locator('#register-form');
  await f.locator('[name=mobile]').fill(u.mobile);
  await f.locator('[name=passwd]').fill(PW);
  await f.locator('[name=nickname]').fill(nickname);
  await f.locator('button').click();
  u.id = await signedIn(u.page);
}

async function logIn(page, mob, pw = PW) {
  const f = page.locator('#login-form');
  await f.locator('[name=mobile]').fill(mob);
  await f.locator('[name=passwd]').fill(pw);
  await f.locator('button').click();
}

/** A new browser user, registered through the page. */
async function newUser(name, viewport) {
  const u = { ...(await open(name, viewport)), mobile: mobile(), nickname: name };
  users[name] = u;
  await u.page.goto(chatUrl());
  await register(u, name);
  return u;
}

/** Opens the conversation with friend / community `label` in the side list. */
async function pick(page, list, label) {
  await page.locator(`#${list} button`, { hasText: label }).first().click();
  await visible(page, '#chat-title', label);
}

async function type(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

/** The message element of the open conversation holding `text`. */
const msg = (page, text) => page.locator('#msg-list li.msg', { hasText: text }).first();

async function tick(page, text, status) {
  await msg(page, text).locator('.tick', { hasText: status }).waitFor({ timeout: UI_MS });
}

test('IM page: accounts, friends, live chat with every media type, offline messages, communities, history', async () => {
  // "open http://127.0.0.1:8081/" leads to the chat page's log-in.
  const first = await open('first-visit');
  await first.page.goto(`${server.base}/`);
  assert.match(first.page.url(), /\/web\/chat\.html$/);
  await visible(first.page, '#login-form');
  await shots.shot(first.page, 'home-login');
  first.g.check();
  await first.ctx.close();

  const ann = await newUser('Ann');
  await shots.shot(ann.page, 'ann-registered');

  // Log out, a wrong password (a clear message), then the right one.
  await ann.page.click('#logout');
  await visible(ann.page, '#auth');
  await ann.g.expect(/\/user\/login/, async () => {
    await logIn(ann.page, ann.mobile, 'wrong-password');
    await visible(ann.page, '#notice-text', 'Log-in failed');
  });
  assert.match(await ann.page.textContent('#notice-text'), /code 401/);
  await shots.shot(ann.page, 'wrong-password');
  await logIn(ann.page, ann.mobile);
  assert.equal(await signedIn(ann.page), ann.id);
  assert.equal(await ann.page.isVisible('#notice'), false, 'the failure notice goes once logged in');

  const bob = await newUser('Bob');

  // Ann adds Bob; 1:1 both ways, live.
  await ann.page.fill('#add-friend input', String(bob.id));
  await ann.page.click('#add-friend button');
  await visible(ann.page, '#friends button', 'Bob');
  await visible(ann.page, '#chat-title', 'Bob');
  await type(ann.page, 'hi bob');
  await tick(ann.page, 'hi bob', 'delivered');
  // Bob's list learns of Ann from the push, with an unread badge.
  await visible(bob.page, '#friends button .badge');
  await pick(bob.page, 'friends', 'Ann');
  await visible(bob.page, '#msg-list li.msg', 'hi bob');
  await type(bob.page, 'hi ann');
  await tick(bob.page, 'hi ann', 'delivered');
  await visible(ann.page, '#msg-list li.msg:not(.mine)', 'hi ann');
  await shots.shot(ann.page, 'ann-bob-chat');

  // Emoji.
  const emoji = await ann.page.locator('#emojis button').first().textContent();
  await ann.page.locator('#emojis button').first().click();
  await visible(bob.page, '#msg-list .m-emoji', emoji);

  // An image upload, shown as a loaded image on both sides.
  await ann.page.setInputFiles('#image-file', { name: 'dot.png', mimeType: 'image/png', buffer: PNG });
  for (const p of [ann.page, bob.page]) {
    await visible(p, '#msg-list img.m-image');
    await p.waitForFunction(() => [...document.querySelectorAll('#msg-list img.m-image')].some((i) => i.complete && i.naturalWidth > 0), null, { timeout: UI_MS });
  }
  const imageUrl = await bob.page.locator('#msg-list img.m-image').first().getAttribute('src');
  assert.match(imageUrl, /\/attach\/files\//);

  // A voice file, shown as a player.
  await bob.page.setInputFiles('#voice-file', { name: 'hello.wav', mimeType: 'audio/wav', buffer: wav() });
  await visible(ann.page, '#msg-list .m-voice audio');
  assert.match(await ann.page.locator('#msg-list .m-voice audio').first().getAttribute('src'), /\/attach\/files\//);
  assert.ok(await ann.page.locator('#msg-list .m-voice audio').first().evaluate((a) => a.controls));
  await shots.shot(ann.page, 'emoji-image-voice');

  // Every other media type, from another client of Bob's: each as its card.
  const bobApi = new ImApi({ base: server.base });
  const bobMe = await bobApi.login(bob.mobile, PW);
  const bobSock = new ChatSocket({ url: `${server.wsBase}/chat`, id: bob.id, token: bobMe.token });
  sockets.push(bobSock);
  await bobSock.connect();
  const cards = [
    Build.news('Release notes', 'https://example.com/news', { pic: imageUrl, memo: 'what changed' }),
    Build.redPacket(300, 'for tea'),
    Build.link('https://example.com/docs', 'the docs'),
    Build.video(imageUrl.replace(/\.png$/, '.mp4')),
    Build.contact(ann.id, 'Ann', imageUrl),
  ];
  for (const fields of cards) {
    const ack = await bobSock.send({ cmd: Cmd.SINGLE, dstid: ann.id, ...fields });
    assert.equal(ack.status, 'delivered');
  }
  await visible(ann.page, '#msg-list .m-news', 'Release notes');
  await visible(ann.page, '#msg-list .m-redpacket', '¥3.00');
  await visible(ann.page, '#msg-list .m-link a', 'the docs');
  assert.equal(await ann.page.locator('#msg-list .m-link a').first().getAttribute('href'), 'https://example.com/docs');
  await visible(ann.page, '#msg-list video.m-video');
  await visible(ann.page, '#msg-list .m-contact', `ID ${ann.id}`);
  await shots.shot(ann.page, 'media-cards');

  // Cat has never been online: Ann's message is stored, and shown at Cat's
  // first log-in.
  const cat = { ...(await open('Cat')), mobile: mobile(), nickname: 'Cat' };
  users.Cat = cat;
  const catApi = new ImApi({ base: server.base });
  cat.id = (await catApi.register({ mobile: cat.mobile, passwd: PW, nickname: 'Cat' })).id;
  await ann.page.fill('#add-friend input', String(cat.id));
  await ann.page.click('#add-friend button');
  await visible(ann.page, '#chat-title', 'Cat');
  await type(ann.page, 'while you were out');
  await tick(ann.page, 'while you were out', 'stored for later');
  await shots.shot(ann.page, 'stored-ack');
  await cat.page.goto(chatUrl());
  await logIn(cat.page, cat.mobile);
  assert.equal(await signedIn(cat.page), cat.id);
  await visible(cat.page, '#friends button .badge');
  await pick(cat.page, 'friends', 'Ann');
  await visible(cat.page, '#msg-list li.msg', 'while you were out');
  await shots.shot(cat.page, 'offline-message-at-login');

  // A community of three.
  await ann.page.fill('#create-community input', 'Book club');
  await ann.page.click('#create-community button');
  await visible(ann.page, '#notice-text', 'Book club');
  const cid = Number((await ann.page.textContent('#notice-text')).match(/id is (\d+)/)[1]);
  for (const u of [bob, cat]) {
    await u.page.fill('#join-community input', String(cid));
    await u.page.click('#join-community button');
    await visible(u.page, '#chat-title', 'Book club');
  }
  await pick(ann.page, 'communities', 'Book club');
  await type(ann.page, 'welcome to the club');
  await tick(ann.page, 'welcome to the club', 'delivered');
  await visible(bob.page, '#msg-list li.msg', 'welcome to the club');
  await visible(cat.page, '#msg-list li.msg', 'welcome to the club');
  await type(cat.page, 'glad to be here');
  await visible(ann.page, '#msg-list li.msg', 'glad to be here');
  await visible(bob.page, '#msg-list li.msg', 'glad to be here');
  await shots.shot(bob.page, 'community-of-three');

  // History: many more messages than a page; Ann opens the conversation
  // afresh (a reload: the session is kept), scrolls up, then clicks.
  for (let i = 1; i <= 45; i++) {
    await bobSock.send({ cmd: Cmd.SINGLE, dstid: ann.id, ...Build.text(`old-${String(i).padStart(2, '0')}`) });
  }
  await ann.page.reload();
  assert.equal(await signedIn(ann.page), ann.id);
  await pick(ann.page, 'friends', 'Bob');
  await visible(ann.page, '#msg-list li.msg', 'old-45');
  const count = () => ann.page.locator('#msg-list li.msg').count();
  assert.equal(await count(), 20, 'the newest page');
  assert.equal(await ann.page.isVisible('#older'), true);
  await ann.page.locator('#messages').evaluate((box) => { box.scrollTop = 0; });
  await visible(ann.page, '#msg-list li.msg', 'old-06');
  assert.equal(await count(), 40, 'scrolling to the top loaded the page before');
  await shots.shot(ann.page, 'history-scrolled');
  await ann.page.locator('#messages').evaluate((box) => { box.scrollTop = 0; });
  await visible(ann.page, '#msg-list li.msg', 'hi bob');
  await ann.page.waitForFunction(() => document.getElementById('older').hidden, null, { timeout: UI_MS });
  const texts = await ann.page.$$eval('#msg-list li.msg', (ls) => ls.map((l) => l.textContent));
  assert.match(texts[0], /hi bob/, 'the oldest message first');
  assert.match(texts.at(-1), /old-45/);
  await shots.shot(ann.page, 'history-all');

  for (const u of [ann, bob, cat]) u.g.check();
});

test('Load older fetches the page before the oldest shown', async () => {
  // Its own conversation, so that the click (not a scroll) is what loads.
  const dan = await newUser('Dan');
  const eveApi = new ImApi({ base: server.base });
  const eveMobile = mobile();
  const eve = await eveApi.register({ mobile: eveMobile, passwd: PW, nickname: 'Eve' });
  const eveMe = await eveApi.login(eveMobile, PW);
  await eveApi.addFriend(dan.id);
  const eveSock = new ChatSocket({ url: `${server.wsBase}/chat`, id: eve.id, token: eveMe.token });
  sockets.push(eveSock);
  await eveSock.connect();
  for (let i = 1; i <= 25; i++) await eveSock.send({ cmd: Cmd.SINGLE, dstid: dan.id, ...Build.text(`eve-${String(i).padStart(2, '0')}`) });
  await dan.page.reload();
  await signedIn(dan.page);
  await pick(dan.page, 'friends', 'Eve');
  await visible(dan.page, '#msg-list li.msg', 'eve-25');
  assert.equal(await dan.page.locator('#msg-list li.msg').count(), 20);
  await dan.page.click('#older');
  await visible(dan.page, '#msg-list li.msg', 'eve-01');
  assert.equal(await dan.page.locator('#msg-list li.msg').count(), 25);
  await dan.page.waitForFunction(() => document.getElementById('older').hidden, null, { timeout: UI_MS });
  dan.g.check();
  await dan.ctx.close();
});

test("the IM seed's entry /chat/index.shtml?id=&token= opens the chat signed in", async () => {
  const ann = users.Ann;
  const tok = (await new ImApi({ base: server.base }).login(ann.mobile, PW)).token;
  const u = await open('seed-entry');
  await u.page.goto(`${server.base}/chat/index.shtml?id=${ann.id}&token=${encodeURIComponent(tok)}&ws=${encodeURIComponent(`${server.wsBase}/chat`)}`);
  assert.equal(await signedIn(u.page), ann.id);
  assert.doesNotMatch(u.page.url(), /token=/, 'the token leaves the address bar');
  assert.match(u.page.url(), /\/web\/chat\.html\?ws=/);
  await visible(u.page, '#friends button', 'Bob');
  await shots.shot(u.page, 'seed-entry-signed-in');
  u.g.check();

  // Someone else's token for Ann's id: refused, with a message.
  const bobTok = (await new ImApi({ base: server.base }).login(users.Bob.mobile, PW)).token;
  const v = await open('seed-entry-mismatch');
  await v.g.expect(/\/user\/find/, async () => {
    await v.page.goto(`${server.base}/chat/index.shtml?id=${ann.id}&token=${encodeURIComponent(bobTok)}`);
    await visible(v.page, '#notice-text', 'Signing in from the link failed');
  });
  assert.equal(await v.page.isVisible('#auth'), true);
  await shots.shot(v.page, 'seed-entry-refused');
  v.g.check();
  await u.ctx.close();
  await v.ctx.close();
});

test('the IM page on a phone-sized viewport: no horizontal scrolling, friends and conversation reachable', async () => {
  const bob = users.Bob;
  const u = await open('phone', PHONE);
  await u.page.goto(chatUrl());
  await assertNoHorizontalScroll(u.page, 'log-in screen');
  await logIn(u.page, bob.mobile);
  assert.equal(await signedIn(u.page), bob.id);
  await assertNoHorizontalScroll(u.page, 'signed in');
  const friend = u.page.locator('#friends button', { hasText: 'Ann' }).first();
  await friend.scrollIntoViewIfNeeded();
  assert.ok(await friend.isVisible(), 'the friend list is reachable');
  await shots.shot(u.page, 'phone-friends');
  await friend.click();
  await visible(u.page, '#msg-list li.msg', 'old-45');
  const last = msg(u.page, 'old-45');
  await last.scrollIntoViewIfNeeded();
  assert.ok(await last.isVisible(), 'the conversation is reachable');
  await u.page.locator('#text').scrollIntoViewIfNeeded();
  await type(u.page, 'from my phone');
  await tick(u.page, 'from my phone', 'delivered');
  await visible(users.Ann.page, '#msg-list li.msg', 'from my phone');
  await assertNoHorizontalScroll(u.page, 'in a conversation');
  // With a long conversation open, the friend list is still there to
  // switch conversations, and the page stays one screen (the messages scroll).
  await friend.scrollIntoViewIfNeeded();
  const box = await friend.boundingBox();
  assert.ok(await friend.isVisible() && box && box.height >= 20, `the friend list is reachable in a conversation: ${JSON.stringify(box)}`);
  const heights = await u.page.evaluate(() => ({ page: document.documentElement.scrollHeight, view: window.innerHeight }));
  assert.ok(heights.page <= heights.view, `the page fits the screen, the messages scroll inside it: ${JSON.stringify(heights)}`);
  await shots.shot(u.page, 'phone-conversation');
  u.g.check();
  await u.ctx.close();
});
