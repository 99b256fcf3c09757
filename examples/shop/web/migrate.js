'use strict';
// Idempotent schema set-up; the deployer runs it (`node migrate.js`) before switching releases.

const mysql = require('mysql2/promise');
const { log, describe, fail, mysqlOptions } = require('./config');

const STATEMENTS = [
  `CREATE TABLE IF NOT EXISTS visits (
     id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
     n BIGINT UNSIGNED NOT NULL DEFAULT 0
   ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`,
  // the single counter row; keeps its value when the migration runs again
  'INSERT IGNORE INTO visits (id, n) VALUES (1, 0)',
  `CREATE TABLE IF NOT EXISTS notes (
     id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
     body TEXT NOT NULL,
     created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
   ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`,
];

async function main() {
  const options = mysqlOptions();
  let connection;
  try {
    connection = await mysql.createConnection(options);
    for (const sql of STATEMENTS) await connection.query(sql);
    log(`migrate: tables visits and notes ready in database ${options.database}`);
  } catch (err) {
    fail(`migrate: failed: ${describe(err)}`);
  } finally {
    if (connection) await connection.end().catch(() => {});
  }
}

main();
