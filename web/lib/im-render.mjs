// How the IM page shows a message, one element tree per media type.
//
// Everything a user sent goes into the page as text nodes or as attribute
// values checked here (links and media sources must be http(s), or one of
// our uploads): never as HTML. The document is a parameter so the same code
// runs against a stand-in in the Node tests.

import { Media } from './im.mjs';

/** The emoji buttons of the composer (sent as media 6 with the emoji as content). */
export const EMOJI_BUTTONS = Object.freeze(['😀', '😂', '😍', '😢', '😡', '👍', '🎉', '❤️']);

/** Emoji sent by name, as the seed's pages do (`{"media":6,"content":"cry"}`). */
export const EMOJI_NAMES = Object.freeze({
  smile: '😊', laugh: '😂', cry: '😢', angry: '😡', love: '😍', like: '👍', ok: '👌',
  heart: '❤️', party: '🎉', sad: '😞', wow: '😮', kiss: '😘', cool: '😎', thanks: '🙏',
});

/**
 * `url` as an absolute http(s) or blob URL (relative ones resolved against
 * `base`, the page), or null for anything else (javascript:, data:, ...).
 */
export function safeUrl(url, base) {
  if (typeof url !== 'string' || url.trim() === '') return null;
  let u;
  try {
    u = new URL(url.trim(), base);
  } catch {
    return null;
  }
  return ['http:', 'https:', 'blob:'].includes(u.protocol) ? u.href : null;
}

/** Cents (fen) as yuan: 300 -> "¥3.00". */
export function yuan(cents) {
  const n = Number(cents);
  if (!Number.isFinite(n)) return '¥?';
  const sign = n < 0 ? '-' : '';
  const abs = Math.abs(Math.trunc(n));
  return `${sign}¥${Math.floor(abs / 100)}.${String(abs % 100).padStart(2, '0')}`;
}

/** A message time (ms since the epoch): "14:05" today, else "2024-05-01 14:05". */
export function formatTime(ms, now = Date.now()) {
  const n = Number(ms);
  if (!Number.isFinite(n) || n <= 0) return '';
  const d = new Date(n);
  const pad = (x) => String(x).padStart(2, '0');
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return new Date(now).toDateString() === d.toDateString()
    ? hm
    : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${hm}`;
}

/**
 * An element: `props` may hold `className`, `text` (a text node), `attrs`
 * (set with setAttribute: callers pass only checked values); children are
 * nodes or strings (text nodes).
 */
export function el(doc, tag, props = {}, ...children) {
  const e = doc.createElement(tag);
  if (props.className) e.className = props.className;
  for (const [k, v] of Object.entries(props.attrs ?? {})) {
    if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? '' : String(v));
  }
  if (props.text !== undefined) e.append(doc.createTextNode(String(props.text)));
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    e.append(typeof c === 'string' ? doc.createTextNode(c) : c);
  }
  return e;
}

/** A link that opens elsewhere and tells the target nothing about us. */
function link(doc, href, ...children) {
  return el(doc, 'a', { attrs: { href, target: '_blank', rel: 'noopener noreferrer' } }, ...children);
}

const str = (v) => (v === undefined || v === null ? '' : String(v));

/** What a user-defined (100) content looks like: pretty JSON if it is JSON. */
function prettyJson(text) {
  try {
    const v = JSON.parse(text);
    if (v !== null && typeof v === 'object') return JSON.stringify(v, null, 2);
  } catch { /* plain text */ }
  return text;
}

/**
 * The body of message `m` for its media type. `base` resolves relative
 * URLs (our uploads, `/attach/files/...`).
 */
export function renderBody(doc, m, base) {
  const content = str(m.content);
  const memo = str(m.memo);
  const url = safeUrl(m.url, base);
  const pic = safeUrl(m.pic, base);
  const media = Number(m.media);
  const badUrl = () => el(doc, 'span', { className: 'bad', text: `[unsafe or missing link: ${str(m.url).slice(0, 80)}]` });
  switch (media) {
    case Media.TEXT:
      return el(doc, 'p', { className: 'm-text', text: content });
    case Media.NEWS: {
      const card = el(doc, 'div', { className: 'm-news' },
        pic ? el(doc, 'img', { attrs: { src: pic, alt: '', loading: 'lazy', referrerpolicy: 'no-referrer' } }) : null,
        el(doc, 'strong', { text: content }),
        memo ? el(doc, 'span', { text: memo }) : null);
      return url ? link(doc, url, card) : el(doc, 'div', {}, card, badUrl());
    }
    case Media.VOICE: {
      const secs = Number(m.amount) > 0 ? `${Math.round(Number(m.amount))}″` : '';
      return el(doc, 'div', { className: 'm-voice' },
        el(doc, 'span', { text: `🎤 ${secs}` }),
        url ? el(doc, 'audio', { attrs: { controls: true, preload: 'none', src: url } }) : badUrl());
    }
    case Media.IMAGE:
      return url
        ? link(doc, url, el(doc, 'img', { className: 'm-image', attrs: { src: url, alt: 'image', loading: 'lazy', referrerpolicy: 'no-referrer' } }))
        : badUrl();
    case Media.RED_PACKET:
      return el(doc, 'div', { className: 'm-redpacket' },
        el(doc, 'span', { className: 'amount', text: `🧧 ${yuan(m.amount)}` }),
        el(doc, 'span', { text: memo || '恭喜发财' }),
        url ? link(doc, url, 'open') : null);
    case Media.EMOJI:
      return el(doc, 'span', { className: 'm-emoji', attrs: { title: content }, text: EMOJI_NAMES[content] ?? content });
    case Media.LINK:
      return url ? el(doc, 'p', { className: 'm-link' }, link(doc, url, content || url)) : badUrl();
    case Media.VIDEO:
      return url
        ? el(doc, 'video', { className: 'm-video', attrs: { controls: true, preload: 'none', src: url, poster: pic } })
        : badUrl();
    case Media.CONTACT:
      return el(doc, 'div', { className: 'm-contact' },
        pic ? el(doc, 'img', { attrs: { src: pic, alt: '', loading: 'lazy', referrerpolicy: 'no-referrer' } }) : null,
        el(doc, 'strong', { text: memo || 'contact' }),
        el(doc, 'span', { text: `ID ${content}` }));
    case Media.USER_DEFINED:
      return el(doc, 'div', { className: 'm-custom' },
        content ? el(doc, 'pre', { text: prettyJson(content) }) : null,
        url ? link(doc, url, url) : null);
    default:
      return el(doc, 'pre', { className: 'm-unknown', text: `[media ${str(m.media)}] ${JSON.stringify(m)}` });
  }
}
