'use strict';
// Reads the settings the deployer hands to a service (see docs/spec-format.md) and keeps the
// passwords they contain out of the logs.

const secrets = new Set();

function log(message) {
  process.stdout.write(`${redact(message)}\n`);
}

function logError(message) {
  process.stderr.write(`${redact(message)}\n`);
}

// Replace every known password (plain and URL-encoded) with "***", and flatten to one line.
function redact(message) {
  let text = String(message);
  for (const secret of secrets) text = text.split(secret).join('***');
  return text.replace(/\s*\n\s*/g, ' ');
}

// One-line description of an error (no stack traces in the logs).
function describe(err) {
  if (!err) return 'unknown error';
  // MySQL server errors: the number is reliable (mysql2 names some MariaDB-only numbers wrongly)
  if (err.sqlState && err.errno) return `mysql error ${err.errno}: ${err.message}`;
  const code = err.code && !String(err.message).includes(err.code) ? `${err.code}: ` : '';
  return `${code}${err.message || err}`;
}

function fail(message) {
  logError(message);
  process.exit(1);
}

function required(name) {
  const value = process.env[name];
  if (value === undefined || value === '') fail(`${name} is not set; the deployer provides it`);
  return value;
}

function rememberSecret(raw) {
  if (!raw) return;
  secrets.add(raw);
  try {
    secrets.add(decodeURIComponent(raw));
  } catch {
    // not valid percent-encoding: the raw form is enough
  }
}

function parseUrl(name, protocols) {
  const raw = required(name);
  let url;
  try {
    url = new URL(raw);
  } catch {
    fail(`${name} is not a valid URL`); // never echo the value: it holds a password
  }
  rememberSecret(url.password);
  if (!protocols.includes(url.protocol)) fail(`${name} must start with ${protocols.join(' or ')}//`);
  return url;
}

function decode(name, part, value) {
  try {
    return decodeURIComponent(value);
  } catch {
    return fail(`${name} has a badly percent-encoded ${part}`);
  }
}

function port() {
  const raw = required('PORT');
  const value = Number(raw);
  if (!/^\d+$/.test(raw) || value < 1 || value > 65535) fail(`PORT must be a TCP port number, got ${JSON.stringify(raw)}`);
  return value;
}

// mysql://USER:PASSWORD@HOST:PORT/NAME → options for mysql2
function mysqlOptions() {
  const url = parseUrl('DATABASE_URL', ['mysql:']);
  const database = decode('DATABASE_URL', 'database name', url.pathname.replace(/^\//, ''));
  if (!database) fail('DATABASE_URL has no database name');
  return {
    host: url.hostname || '127.0.0.1',
    port: url.port ? Number(url.port) : 3306,
    user: decode('DATABASE_URL', 'user', url.username),
    password: decode('DATABASE_URL', 'password', url.password),
    database,
    charset: 'utf8mb4',
    connectTimeout: 3000,
  };
}

// redis://USER:PASSWORD@HOST:PORT (USER is an ACL user) → URL string for node-redis
function redisUrl() {
  const url = parseUrl('REDIS_URL', ['redis:', 'rediss:']);
  decode('REDIS_URL', 'user', url.username); // node-redis decodes them; fail here with a clear message
  decode('REDIS_URL', 'password', url.password);
  return url.href;
}

function redisPrefix() {
  return required('REDIS_PREFIX');
}

module.exports = { log, logError, describe, fail, redact, port, mysqlOptions, redisUrl, redisPrefix };
