'use strict';
// Example web service for deployer: counts visits in MySQL and hits in Redis, keeps notes in MySQL.

// First, so a SIGTERM that arrives while the modules load is handled, not fatal
// (the handlers run only after this file has been evaluated).
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const mysql = require('mysql2/promise');
const { createClient } = require('redis');
const config = require('./config');

const { log, logError, describe } = config;
const PORT = config.port();
const HOST = process.env.HOST || '127.0.0.1'; // where the routers reach it: 0.0.0.0 on a fleet
const RELEASE = process.env.RELEASE || 'unknown';
const FAIL_ERRORS = process.env.FAIL_MODE === 'errors'; // a "bad release": / fails, /health passes
const PREFIX = config.redisPrefix(); // every Redis key must start with it (the ACL user allows nothing else)
const HITS_KEY = `${PREFIX}hits`;
const MAX_BODY = 16 * 1024; // notes.body is TEXT (at most 65535 bytes)
const DRAIN_MS = 5000; // in-flight requests get this long after SIGTERM
const CHECK_MS = 2000; // /health gives each backend this long to answer

const pool = mysql.createPool({ ...config.mysqlOptions(), connectionLimit: 5, enableKeepAlive: true });
pool.on('connection', (connection) => {
  // a pooled connection that dies is dropped by the pool; just report it
  connection.on('error', (err) => logError(`web: mysql connection error: ${describe(err)}`));
});

let startupDone = false;
let lastRedisError = null;
const redis = createClient({
  url: config.redisUrl(),
  disableOfflineQueue: true, // fail fast while disconnected instead of queueing
  socket: {
    connectTimeout: 3000,
    // at start-up give up after ~6 s (so a wrong password or host fails the deploy quickly);
    // once running, keep reconnecting
    reconnectStrategy: (retries, cause) =>
      !startupDone && retries >= 5 ? new Error(`cannot connect to redis: ${describe(cause)}`) : Math.min(200 * 2 ** retries, 3000),
  },
});
redis.on('error', (err) => {
  const text = describe(err);
  if (text !== lastRedisError) logError(`web: redis error: ${text}`); // once per distinct error, not per retry
  lastRedisError = text;
});
redis.on('ready', () => {
  if (lastRedisError) log('web: redis connection restored');
  lastRedisError = null;
});

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

let shuttingDown = false;

function send(res, status, body, type = 'application/json', close = false) {
  const text = type === 'application/json' ? `${JSON.stringify(body)}\n` : body;
  const headers = { 'Content-Type': `${type}; charset=utf-8`, 'Content-Length': Buffer.byteLength(text), 'Cache-Control': 'no-store' };
  if (shuttingDown || close) headers.Connection = 'close';
  res.writeHead(status, headers);
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const tooLarge = () => Object.assign(new Error(`note larger than ${MAX_BODY} bytes`), { status: 413, close: true });
    if (Number(req.headers['content-length']) > MAX_BODY) return reject(tooLarge());
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        reject(tooLarge()); // the rest is read and dropped; the connection closes after the answer
        chunks.length = 0;
      } else {
        chunks.push(chunk);
      }
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

let healthFailure = null; // logged on change only, since /health is polled

async function health(req, res) {
  const [db, cache] = await Promise.allSettled([
    withTimeout(pool.query('SELECT 1'), CHECK_MS, 'mysql'),
    withTimeout(redis.ping(), CHECK_MS, 'redis'),
  ]);
  const down = [];
  if (db.status === 'rejected') down.push(`mysql (${describe(db.reason)})`);
  if (cache.status === 'rejected') down.push(`redis (${describe(cache.reason)})`);
  const failure = down.length ? `web: unhealthy: ${down.join(', ')}` : null;
  if (failure !== healthFailure) (failure ? logError : log)(failure || 'web: healthy again');
  healthFailure = failure;
  if (down.length) return send(res, 503, `unavailable: ${down.map((d) => d.split(' ')[0]).join(', ')}\n`, 'text/plain');
  return send(res, 200, 'ok', 'text/plain');
}

async function home(req, res) {
  if (FAIL_ERRORS) {
    logError('web: GET / failed on purpose (FAIL_MODE=errors)');
    return send(res, 500, { error: 'this release is broken on purpose (FAIL_MODE=errors)' });
  }
  const [[result], hits] = await Promise.all([
    // one atomic statement; LAST_INSERT_ID(expr) hands the new value back as insertId
    pool.query('INSERT INTO visits (id, n) VALUES (1, LAST_INSERT_ID(1)) ON DUPLICATE KEY UPDATE n = LAST_INSERT_ID(n + 1)'),
    redis.incr(HITS_KEY),
  ]);
  return send(res, 200, { service: 'web', release: RELEASE, visits: Number(result.insertId), hits: Number(hits) });
}

async function listNotes(req, res) {
  const [rows] = await pool.query('SELECT id, body, created_at FROM notes ORDER BY id');
  return send(res, 200, { notes: rows.map((r) => ({ id: Number(r.id), text: r.body, created_at: r.created_at })) });
}

async function addNote(req, res) {
  const text = await readBody(req);
  if (!text.trim()) return send(res, 400, { error: 'send the note as the request body' });
  const [result] = await pool.query('INSERT INTO notes (body) VALUES (?)', [text]);
  return send(res, 201, { id: Number(result.insertId), text });
}

function version(req, res) {
  try {
    const info = JSON.parse(fs.readFileSync(path.join(__dirname, 'dist', 'version.json'), 'utf8'));
    return send(res, 200, { release: RELEASE, pid: process.pid, cwd: process.cwd(), ...info });
  } catch {
    return send(res, 404, { error: 'not built (run npm run build)' });
  }
}

const ROUTES = {
  '/': { GET: home },
  '/health': { GET: health },
  '/notes': { GET: listNotes, POST: addNote },
  '/version': { GET: version },
};

const server = http.createServer(async (req, res) => {
  const { pathname } = new URL(req.url, 'http://localhost');
  const methods = ROUTES[pathname];
  if (!methods) return send(res, 404, { error: 'not found' });
  const method = req.method === 'HEAD' ? 'GET' : req.method;
  const handler = methods[method];
  if (!handler) {
    res.setHeader('Allow', Object.keys(methods).join(', '));
    return send(res, 405, { error: 'method not allowed' });
  }
  try {
    await handler(req, res);
  } catch (err) {
    if (err.status) return send(res, err.status, { error: err.message }, 'application/json', err.close);
    logError(`web: ${req.method} ${pathname} failed: ${describe(err)}`);
    if (!res.headersSent) send(res, 500, { error: 'internal error' });
    else res.destroy();
  }
});

async function closeBackends() {
  await Promise.allSettled([
    withTimeout(pool.end(), 2000, 'mysql pool close'),
    withTimeout(redis.isOpen ? redis.close() : Promise.resolve(), 2000, 'redis close').catch((err) => {
      redis.destroy();
      throw err;
    }),
  ]);
}

function shutdown(signal) {
  if (shuttingDown) return;
  shuttingDown = true;
  log(`web: ${signal} received, finishing in-flight requests`);
  const force = setTimeout(() => {
    logError(`web: requests still running after ${DRAIN_MS} ms, closing them`);
    server.closeAllConnections();
  }, DRAIN_MS);
  server.close(async () => {
    clearTimeout(force);
    await closeBackends();
    log('web: stopped');
    process.exit(0);
  });
  server.closeIdleConnections();
}

async function waitForMysql() {
  for (let attempt = 1; ; attempt += 1) {
    try {
      await pool.query('SELECT 1');
      return;
    } catch (err) {
      if (attempt >= 5) throw new Error(`cannot connect to mysql: ${describe(err)}`);
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

async function main() {
  try {
    await Promise.all([redis.connect(), waitForMysql()]);
  } catch (err) {
    if (shuttingDown) return; // SIGTERM arrived while connecting; shutdown() exits
    config.fail(`web: not starting: ${describe(err)}`);
  }
  startupDone = true;
  if (shuttingDown) return; // SIGTERM arrived while connecting; the server was never opened
  server.on('error', (err) => config.fail(`web: cannot listen on ${HOST}:${PORT}: ${describe(err)}`));
  server.listen(PORT, HOST, () => {
    let commit = '';
    try {
      commit = JSON.parse(fs.readFileSync(path.join(__dirname, 'dist', 'version.json'), 'utf8')).commit || '';
    } catch {
      // not built
    }
    log(`web: listening on http://${HOST}:${PORT} (release ${RELEASE}${commit ? `, commit ${commit.slice(0, 12)}` : ''}` +
      `, redis prefix ${PREFIX}${FAIL_ERRORS ? ', FAIL_MODE=errors' : ''})`);
  });
}

main();
