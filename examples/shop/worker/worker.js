'use strict';
// Example daemon for deployer: every 2 s increments ${REDIS_PREFIX}ticks and prints `tick <n>`.

// First, so a SIGTERM that arrives while the modules load is handled, not fatal
// (the handlers run only after this file has been evaluated).
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

const { createClient } = require('redis');

const INTERVAL_MS = 2000;
const secrets = []; // passwords, kept out of every log line

function line(stream, message) {
  let text = String(message).replace(/\s*\n\s*/g, ' ');
  for (const secret of secrets) text = text.split(secret).join('***');
  stream.write(`${text}\n`);
}
const log = (message) => line(process.stdout, message);
const logError = (message) => line(process.stderr, message);

function fail(message) {
  logError(message);
  process.exit(1);
}

function required(name) {
  const value = process.env[name];
  if (value === undefined || value === '') fail(`${name} is not set; the deployer provides it`);
  return value;
}

function describe(err) {
  if (!err) return 'unknown error';
  const code = err.code && !String(err.message).includes(err.code) ? `${err.code}: ` : '';
  return `${code}${err.message || err}`;
}

const PREFIX = required('REDIS_PREFIX'); // every key must start with it (the ACL user allows nothing else)
const TICKS_KEY = `${PREFIX}ticks`;
let url;
try {
  url = new URL(required('REDIS_URL'));
} catch {
  fail('REDIS_URL is not a valid URL'); // never echo the value: it holds a password
}
try {
  if (url.password) secrets.push(url.password, decodeURIComponent(url.password));
} catch {
  fail('REDIS_URL has a badly percent-encoded password');
}
if (url.protocol !== 'redis:' && url.protocol !== 'rediss:') fail('REDIS_URL must start with redis:// or rediss://');

let started = false;
let lastError = null;
const redis = createClient({
  url: url.href,
  disableOfflineQueue: true, // a tick while disconnected fails at once instead of piling up
  socket: {
    connectTimeout: 3000,
    // at start-up give up after ~6 s so a broken deploy exits instead of looking healthy
    reconnectStrategy: (retries, cause) =>
      !started && retries >= 5 ? new Error(`cannot connect to redis: ${describe(cause)}`) : Math.min(200 * 2 ** retries, 3000),
  },
});
redis.on('error', (err) => {
  const text = describe(err);
  if (text !== lastError) logError(`worker: redis error: ${text}`); // once per distinct error, not per retry
  lastError = text;
});
redis.on('ready', () => {
  if (lastError && started) log('worker: redis connection restored');
  lastError = null;
});

let stopping = false;
let timer = null;
let inFlight = null;

async function tick() {
  timer = null;
  try {
    log(`tick ${await redis.incr(TICKS_KEY)}`);
  } catch (err) {
    logError(`worker: tick failed: ${describe(err)}`);
  }
}

function schedule() {
  if (stopping) return;
  timer = setTimeout(() => {
    inFlight = tick().finally(() => {
      inFlight = null;
      schedule();
    });
  }, INTERVAL_MS);
}

async function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  log(`worker: ${signal} received, stopping`);
  if (timer) clearTimeout(timer);
  const hardStop = setTimeout(() => {
    logError('worker: shutdown took too long, exiting anyway');
    process.exit(0);
  }, 5000);
  hardStop.unref();
  try {
    if (inFlight) await inFlight; // let the current tick finish
    if (redis.isOpen) await redis.close();
  } catch (err) {
    logError(`worker: error while closing redis: ${describe(err)}`);
    redis.destroy();
  }
  log('worker: stopped');
  process.exit(0);
}

async function main() {
  try {
    await redis.connect();
  } catch (err) {
    if (stopping) return; // SIGTERM arrived while connecting; shutdown() exits
    fail(`worker: not starting: ${describe(err)}`);
  }
  started = true;
  if (stopping) return;
  let first;
  try {
    // the first tick runs at once: if the key is off limits (wrong prefix), fail the deploy now
    first = await redis.incr(TICKS_KEY);
  } catch (err) {
    if (stopping) return;
    fail(`worker: not starting: cannot increment ${TICKS_KEY}: ${describe(err)}`);
  }
  log(`worker: started, incrementing ${TICKS_KEY} every ${INTERVAL_MS / 1000} s`);
  log(`tick ${first}`);
  schedule();
}

main();
