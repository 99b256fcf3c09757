// The MySQL pool of both processes, from the values the deployer writes (DB_HOST, DB_PORT, …).
'use strict';

const mysql = require('mysql2/promise');

function pool() {
  return mysql.createPool({
    host: process.env.DB_HOST,
    port: Number(process.env.DB_PORT || 3306),
    database: process.env.DB_NAME,
    user: process.env.DB_USER,
    password: process.env.DB_PASSWORD,
    connectionLimit: 4,
  });
}

function row(r) {
  return { id: r.job_id, text: r.text, release: r.worker_release };
}

module.exports = { pool, row, QUEUE: 'default' };
