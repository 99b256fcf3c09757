// The web service on 127.0.0.1:$PORT: it queues jobs for the worker and reads what it did.
//   GET /health     200 once MySQL answers SELECT 1 and Redis a PING
//   GET /version    {"release": RELEASE, "pid": …}
//   POST /jobs?text=…   202 {"id": …}
//   GET /jobs/<id>  the worker's row, 404 until it has written it
//   GET /done       every row, in the order written
'use strict';

const crypto = require('crypto');
const http = require('http');
const Queue = require('bull');
const { pool, row, QUEUE } = require('./db');

const db = pool();
const queue = new Queue(QUEUE, process.env.REDIS_URL);

function answer(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) });
  res.end(data);
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://localhost');
  if (req.method === 'GET' && url.pathname === '/health') {
    await db.query('SELECT 1');
    await queue.client.ping();
    return answer(res, 200, { ok: true });
  }
  if (req.method === 'GET' && url.pathname === '/version') {
    return answer(res, 200, { release: process.env.RELEASE || '?', pid: process.pid, cwd: process.cwd() });
  }
  if (req.method === 'GET' && url.pathname === '/done') {
    const [rows] = await db.query('SELECT job_id, text, worker_release FROM done ORDER BY id');
    return answer(res, 200, { done: rows.map(row) });
  }
  if (req.method === 'GET' && url.pathname.startsWith('/jobs/')) {
    const id = decodeURIComponent(url.pathname.slice('/jobs/'.length));
    const [rows] = await db.execute('SELECT job_id, text, worker_release FROM done WHERE job_id = ?', [id]);
    if (rows.length === 0) return answer(res, 404, { error: 'not done', id });
    return answer(res, 200, row(rows[0]));
  }
  if (req.method === 'POST' && url.pathname === '/jobs') {
    // An id of its own: Bull's counter lives in Redis, and the rows outlive a Redis emptied.
    const job = await queue.add({ text: url.searchParams.get('text') || '' }, { jobId: crypto.randomUUID() });
    return answer(res, 202, { id: String(job.id) });
  }
  return answer(res, 404, { error: 'not found' });
}

const server = http.createServer((req, res) => {
  req.resume(); // a request body, if any, is not used
  handle(req, res).catch((err) => answer(res, 500, { error: err.message }));
});

server.listen(Number(process.env.PORT), '127.0.0.1', () => {
  console.log(`bulljobs: listening on port ${process.env.PORT}`);
});
