// Creates the table the worker writes and the web service reads: node migrate.js
'use strict';

const { pool } = require('./db');

async function main() {
  const db = pool();
  await db.query(`CREATE TABLE IF NOT EXISTS done (
    id INT AUTO_INCREMENT PRIMARY KEY,
    job_id VARCHAR(64) NOT NULL UNIQUE,
    text VARCHAR(200) NOT NULL,
    worker_release VARCHAR(20) NOT NULL
  ) CHARACTER SET utf8mb4`);
  await db.end();
  console.log('bulljobs: tables ready');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
