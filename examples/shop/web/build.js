'use strict';
// `npm run build`: records what was built in dist/version.json (served at GET /version).

const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

function gitCommit() {
  try {
    return execFileSync('git', ['rev-parse', 'HEAD'], {
      cwd: __dirname,
      stdio: ['ignore', 'pipe', 'ignore'],
      timeout: 5000,
    }).toString().trim() || null;
  } catch {
    return null; // not a git checkout (e.g. an exported release folder) or git missing
  }
}

const info = { commit: gitCommit(), built_at: new Date().toISOString(), node: process.version };
const dist = path.join(__dirname, 'dist');
fs.mkdirSync(dist, { recursive: true });
fs.writeFileSync(path.join(dist, 'version.json'), `${JSON.stringify(info, null, 2)}\n`);
console.log(`build: wrote dist/version.json (commit ${info.commit || 'unknown'})`);
