// The Bull worker: takes jobs from the "default" queue on REDIS_URL and writes a row for each,
// with the release of the worker that ran it (run twice, a job keeps one row): node worker.js
'use strict';

const Queue = require('bull');
const { pool, QUEUE } = require('./db');

const db = pool();
const queue = new Queue(QUEUE, process.env.REDIS_URL);
const release = process.env.RELEASE || '?';

queue.process(async (job) => {
  await db.execute('INSERT IGNORE INTO done (job_id, text, worker_release) VALUES (?, ?, ?)',
    [String(job.id), String(job.data.text), release]);
  return { id: String(job.id) };
});

queue.on('completed', (job) => console.log(`bulljobs worker: job ${job.id} done`));
queue.on('failed', (job, err) => console.error(`bulljobs worker: job ${job.id} failed: ${err.message}`));
queue.on('error', (err) => console.error(`bulljobs worker: ${err.message}`));

queue.isReady().then(() => console.log(`bulljobs worker: release ${release}, waiting for jobs on "${QUEUE}"`));

// On stop, let the job at hand finish and be marked done before leaving.
let stopping = false;
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, async () => {
    if (stopping) return;
    stopping = true;
    try {
      await queue.close();
      await db.end();
    } finally {
      process.exit(0);
    }
  });
}
