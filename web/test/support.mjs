// Helpers shared by the Node tests: free ports, waiting on conditions with
// deadlines. (node --test also loads this file; it defines no tests.)

import net from 'node:net';

/**
 * `n` distinct free TCP ports on 127.0.0.1, from the kernel (bind port 0).
 * They are released before the server binds them; another process could
 * take one in between, which would show as a clear startup failure.
 */
export async function freePorts(n) {
  const servers = [];
  try {
    for (let i = 0; i < n; i++) {
      const s = net.createServer();
      servers.push(s);
      await new Promise((resolve, reject) => {
        s.once('error', reject);
        s.listen(0, '127.0.0.1', resolve);
      });
    }
    // Held open together so the kernel cannot hand out the same port twice.
    return servers.map((s) => s.address().port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  }
}

/** Resolves when something accepts a TCP connection on `port`, false if refused. */
export function canConnect(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    sock.once('connect', () => { sock.destroy(); resolve(true); });
    sock.once('error', () => { sock.destroy(); resolve(false); });
  });
}

export const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Re-evaluates `check` (async, returns a value or undefined) until it
 * returns something other than undefined; fails with `what` and the last
 * value seen after `ms`. For state that is only observable by asking again
 * (a port opening, a periodically refreshed count); the pause only paces
 * the polling, the deadline decides.
 */
export async function eventually(what, ms, check, pauseMs = 50) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    const r = await check((v) => { last = v; });
    if (r !== undefined) return r;
    if (Date.now() >= deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}; last seen: ${JSON.stringify(last)}`);
    await delay(pauseMs);
  }
}

/** `promise`, or a failure naming `what` after `ms`. */
export async function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}


/**
 * Follows a spawned server: keeps its last 40 output lines (for failure
 * messages; echoed to stderr when `echo`), and resolves `exited` when it
 * ends — also when the spawn itself fails, where 'exit' may never fire.
 */
export function watchChild(child, bin, echo) {
  const tail = [];
  const keep = (chunk) => {
    if (echo) process.stderr.write(chunk);
    tail.push(...chunk.toString().split('\n').filter(Boolean));
    tail.splice(0, Math.max(0, tail.length - 40));
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', (e) => resolve({ error: `cannot run ${bin}: ${e.message}` }));
  });
  return { tail, exited };
}
