// web/vendor/protobuf.min.js is what logic compiles in and serves to the
// room page; it must be the browser build of the protobuf.js version that
// package-lock.json pins (and that the Node tests run), byte for byte.

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { test } from 'node:test';

const here = (rel) => new URL(rel, import.meta.url);

test('the vendored protobuf.js is the pinned npm build', async () => {
  const lock = JSON.parse(await readFile(here('../package-lock.json'), 'utf8'));
  const pinned = lock.packages['node_modules/protobufjs'].version;
  const vendored = await readFile(here('../vendor/protobuf.min.js'));
  const npm = await readFile(here('../node_modules/protobufjs/dist/protobuf.min.js'));
  assert.match(vendored.subarray(0, 200).toString(), new RegExp(`protobuf\\.js v${pinned.replace(/\./g, '\\.')} `));
  assert.ok(vendored.equals(npm), `web/vendor/protobuf.min.js differs from protobufjs ${pinned}'s dist/protobuf.min.js: copy it again`);
  const license = await readFile(here('../vendor/protobuf.LICENSE'), 'utf8');
  assert.equal(license, await readFile(here('../node_modules/protobufjs/LICENSE'), 'utf8'));
});
